package supervise

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// members lists the service's processes: its cgroup's, or in fallback
// mode those holding its lock file, plus the main process.
func (a *service) members() []int {
	if a.cg != "" {
		pids, _ := cgProcsAll(a.cg)
		return pids
	}
	pids := lockHolders(filepath.Join(a.dir, "lock"))
	if pid := a.snapshot().PID; pid > 0 && !slices.Contains(pids, pid) && alive(pid, 0) {
		pids = append(pids, pid)
	}
	return pids
}

// processCount is len(a.members()), without building the list where the
// cgroup can be counted in place (status polls ask for it every time).
func (a *service) processCount() int {
	if a.cg != "" {
		n, _ := cgCount(a.cg)
		return n
	}
	return len(a.members())
}

func (a *service) record() record {
	r := record{
		Restarts:    a.restarts,
		Hash:        execHash(a.spec),
		Ready:       a.ready(),
		Since:       a.startedAt,
		OOMKills:    a.oomKills,
		StopSignal:  a.spec.StopSignal,
		StopTimeout: a.spec.StopTimeout,
		StopMode:    a.spec.StopMode,
	}
	if a.main != nil {
		r.PID, r.StartTime = a.main.pid, a.main.startTime
	} else {
		r.Spawning = a.spawnTick
	}
	return r
}

// saveRecord persists the record when it changed: creating a file is the
// dearest step of adopting a service that has not changed.
func (a *service) saveRecord() {
	if a.stray {
		return
	}
	data, err := json.Marshal(a.record())
	if err == nil && bytes.Equal(data, a.saved) {
		return
	}
	if err == nil {
		err = writeRecordData(a.dir, data)
	}
	if err != nil {
		a.sup.log.Error("persist service state", "service", a.name, "err", err)
		return
	}
	a.saved = data
}

// initial adopts the service if it is found running, else starts it. The
// answer comes once it is adopted, started, or waiting for dependencies.
func (a *service) initial(reply chan error) {
	rec, recErr := readRecord(a.dir)
	if recErr == nil {
		a.restarts, a.oomKills = rec.Restarts, rec.OOMKills
		a.saved, _ = json.Marshal(rec)
	}
	a.oomBase = a.oomCount()
	a.markSysOOM()
	if a.adopt(rec, recErr == nil) {
		if recErr == nil && rec.Hash != execHash(a.spec) && !a.stray {
			a.log.agentf("the spec changed while the agent was away: restarting")
			a.sup.log.Info("spec changed while the agent was away: restarting", "service", a.name)
			a.setGoal(goalRun)
			a.startWaiters = append(a.startWaiters, reply)
			a.restartNow()
			return
		}
		a.answer(reply, nil)
		return
	}
	if a.stray {
		a.toStopped()
		a.answer(reply, nil)
		return
	}
	a.setGoal(goalRun)
	a.startWaiters = append(a.startWaiters, reply)
	a.begin()
}

// adopt takes over a service found running: never a second copy. It
// reports whether it did.
func (a *service) adopt(rec record, haveRec bool) bool {
	var main *proc
	if haveRec && rec.PID > 0 && alive(rec.PID, rec.StartTime) && a.isMember(rec.PID) {
		main, _ = openProc(rec.PID, rec.StartTime)
	}
	if haveRec && rec.PID == 0 && rec.Spawning > 0 && a.cg != "" {
		// The agent before died between a clone and recording its pid.
		if main = a.findSpawned(rec.Spawning); main != nil {
			a.log.agentf("found pid %d, spawned by an agent that died before recording it", main.pid)
		}
	}
	running := main != nil
	if a.spec.StopMode != StopMain || a.cg == "" {
		// Whole-cgroup services run as long as any process is left.
		running = running || a.occupied()
		if main == nil && running {
			if pids := a.members(); len(pids) == 1 {
				main, _ = openProc(pids[0], 0)
			}
		}
	}
	if !running {
		return false
	}
	switch {
	case a.stray:
		a.setGoal(goalStop) // to be stopped once adopted
	case a.goal == goalStop:
		a.setGoal(goalRun)
	}
	a.adopted = true
	a.startedAt = rec.Since
	if rec.Since.IsZero() {
		a.startedAt = time.Now()
	}
	a.runGen++
	if main != nil {
		a.setMain(main)
	} else {
		a.armPoll(10 * time.Millisecond)
	}
	pid := 0
	if main != nil {
		pid = main.pid
	}
	a.log.agentf("adopted running service (main pid %d)", pid)
	a.sup.log.Info("adopted running service", "service", a.name, "pid", pid)
	a.transition(StateStarting, "adopted")
	if r := a.spec.Ready; r != nil && r.Notify && !a.stray {
		// Same path as before the agent restart: the daemon's later
		// notifications (STATUS=, RELOADING=1) still arrive.
		if err := a.openNotify(); err != nil {
			a.lastErr = err.Error()
		}
	}
	if a.stray || (haveRec && rec.Ready) || a.spec.Ready == nil {
		a.markReady()
		a.since = a.startedAt // running since it was started, not adopted
	} else {
		a.startProbe()
	}
	a.saveRecord()
	return true
}

// isMember reports whether pid belongs to the service (its cgroup, or in
// fallback mode its lock).
func (a *service) isMember(pid int) bool {
	if a.cg != "" {
		data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
		if err != nil {
			return false
		}
		rel := strings.TrimPrefix(a.cg, a.sup.v2Mount)
		for line := range strings.Lines(string(data)) {
			if strings.HasPrefix(line, "0::") {
				return strings.TrimSpace(line[3:]) == rel
			}
		}
		return false
	}
	return true // fallback: the pid record with its start time is the evidence
}

// occupied reports whether any process of the service is left.
func (a *service) occupied() bool {
	if a.cg != "" {
		ok, err := cgPopulated(a.cg)
		return ok || err != nil // when in doubt, never start a second copy
	}
	return lockHeld(filepath.Join(a.dir, "lock")) || (a.main != nil && alive(a.main.pid, a.main.startTime))
}

// spawnWindow bounds, in clock ticks after the mark, when the main process
// of a marked spawn started: markSpawn clones within half of it.
const spawnWindow = 2 * userHZ

// markSpawn records, durably and before the clone, that a main process is
// about to be spawned, and the tick from which on it starts. A StopMain
// service's cgroup holds processes while its main process does not run (a
// Nomad client's tasks), so a populated cgroup does not tell the next agent
// that the main process runs: if this agent dies between the clone and
// recording the pid, the next one finds the process by this mark
// (findSpawned) instead of starting a second copy.
func (a *service) markSpawn() error {
	a.startedAt = time.Now()
	for range 5 {
		a.spawnTick = a.firstNewTick()
		data, err := json.Marshal(a.record())
		if err == nil {
			err = writeRecordData(a.dir, data)
		}
		if err != nil {
			a.spawnTick = 0
			return fmt.Errorf("record the start before it: %w", err)
		}
		a.saved = data
		if bootTick() < a.spawnTick+spawnWindow/2 {
			return nil
		}
		// The write took so long that the clone could fall outside the
		// window findSpawned looks in: mark again.
	}
	a.spawnTick = 0
	return fmt.Errorf("record the start before it: writing %s takes longer than %v", filepath.Join(a.dir, "record.json"), time.Second*spawnWindow/userHZ/2)
}

// firstNewTick returns now as a tick after the start of every process in
// the cgroup, so that of its processes only those started from now on
// start at or after it: when one started within the current tick, it
// waits for the next one.
func (a *service) firstNewTick() uint64 {
	pids, _ := cgProcs(a.cg)
	t := bootTick()
	for _, pid := range pids {
		if st, err := readProcStat(pid); err == nil && st.startTime >= t {
			time.Sleep(time.Second / userHZ)
			return bootTick()
		}
	}
	return t
}

// findSpawned finds the main process of a spawn marked at tick among the
// cgroup's processes: one that leads its own session (the main process is
// spawned with setsid; its children inherit its session), started within
// spawnWindow of the mark, and whose parent (the agent, now gone) is not in
// the cgroup. Of several (a child that made its own session and lost its
// parent), the one that started first.
func (a *service) findSpawned(tick uint64) *proc {
	pids, err := cgProcs(a.cg)
	if err != nil {
		return nil
	}
	best, bestSt := 0, procStat{}
	for _, pid := range pids {
		st, err := readProcStat(pid)
		if err != nil || st.state == 'Z' || st.sid != pid || st.startTime < tick || st.startTime >= tick+spawnWindow || slices.Contains(pids, st.ppid) {
			continue
		}
		if best == 0 || st.startTime < bestSt.startTime || st.startTime == bestSt.startTime && pid < best {
			best, bestSt = pid, st
		}
	}
	if best == 0 {
		return nil
	}
	p, err := openProc(best, bestSt.startTime)
	if err != nil {
		return nil
	}
	return p
}

// occupiedForStart: for a whole-cgroup service any process left counts;
// for StopMain only the main process (the rest, a Nomad client's tasks,
// legitimately outlives it).
func (a *service) occupiedForStart() bool {
	if a.spec.StopMode == StopMain && a.cg != "" {
		return false
	}
	return a.occupied()
}
