package supervise

import (
	"time"

	"golang.org/x/sys/unix"
)

func (a *service) setMain(p *proc) {
	a.main = p
	a.gen++
	g := a.gen
	go func() {
		ws, known, err := p.wait()
		if err != nil {
			return // closed: the actor let go of it
		}
		a.send(event{kind: evExit, gen: g, ws: ws, known: known})
	}()
}

// mainExited handles the end of the main process.
func (a *service) mainExited(ws unix.WaitStatus, known bool) {
	pid := a.main.pid
	a.main.close()
	a.main = nil
	desc, failed := "unknown (not our child)", true
	if known {
		desc = describeExit(ws)
		failed = !(ws.Exited() && ws.ExitStatus() == 0)
	}
	if a.killedByOOM(pid, ws, known) {
		desc, failed = "oom", true
		a.log.agentf("main process %d was killed by the kernel's OOM killer: %s", pid, a.oomCause())
		a.sup.log.Error("killed: out of memory", "service", a.name, "pid", pid, "limit", a.spec.MemoryMax, "oom_kills", a.oomKills)
	}
	if a.phase != StateStopping || known {
		a.lastExit = desc
	}
	a.log.agentf("main process %d ended: %s", pid, desc)
	if a.spec.StopMode == StopMain && a.cg != "" {
		a.failed = a.failed || failed
		a.ended()
		return
	}
	if !a.occupied() {
		a.failed = a.failed || failed
		a.ended()
		return
	}
	switch {
	case a.phase == StateStopping:
		// The main process has had its say; what it left behind (workers,
		// a child it did not reap) gets the stop signal now rather than
		// cgroup.kill when the timeout runs out.
		a.log.agentf("main process gone: stop signal to the processes it left (%d)", a.processCount())
		a.signalAll(a.spec.StopSignal)
		a.armPoll(10 * time.Millisecond)
	case !failed:
		// A daemon that forked and let its parent exit: still running. Its
		// sole remaining process becomes the main one when found.
		a.log.agentf("main process exited 0 leaving processes behind: following them as a daemon")
		a.pollDelay = 0
		a.armPoll(2 * time.Millisecond)
		a.saveRecord()
	default:
		a.log.agentf("main process failed leaving processes behind: killing them")
		a.failed = true
		a.transition(StateStopping, "main process failed leaving processes behind")
		a.cancelProbe()
		a.killAll()
		a.armPoll(10 * time.Millisecond)
	}
}

func (a *service) cgroupChanged() {
	if a.main != nil {
		return // the main process's exit event will tell
	}
	switch a.phase {
	case StateStarting, StateRunning, StateStopping:
		if !a.occupied() {
			a.failed = a.failed || a.phase != StateStopping
			if a.phase != StateStopping {
				a.lastExit = "unknown (all processes ended)"
			}
			a.ended()
		}
	}
}

// armPoll schedules a check of the processes: to find the main process of
// a daemon, and in fallback mode (no cgroup events) to see them end.
func (a *service) armPoll(d time.Duration) {
	stopTimer(&a.pollT)
	a.pollDelay = d
	a.pollT = time.NewTimer(d)
}

func (a *service) poll() {
	switch a.phase {
	case StateStarting, StateRunning, StateStopping:
	default:
		return
	}
	if a.main != nil {
		return
	}
	if !a.occupied() {
		a.cgroupChanged()
		return
	}
	if a.phase != StateStopping {
		if pids := a.members(); len(pids) == 1 {
			if p, err := openProc(pids[0], 0); err == nil {
				a.setMain(p)
				a.log.agentf("following pid %d as the main process", p.pid)
				a.saveRecord()
				return
			}
		}
	}
	a.armPoll(min(2*a.pollDelay, time.Second))
}
