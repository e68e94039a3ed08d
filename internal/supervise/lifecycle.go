package supervise

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/backoff"
)

// restartNow stops the service if it runs and starts it again; from a
// backoff or a wait it starts at once.
func (a *service) restartNow() {
	a.crashes = 0
	switch a.phase {
	case StateStarting, StateRunning:
		if a.goal == goalRun {
			a.setGoal(goalRestart)
		}
		a.beginStop("restart")
	case StateStopping:
		if a.goal == goalRun {
			a.setGoal(goalRestart)
		}
	default:
		stopTimer(&a.backoffT)
		a.nextStart = time.Time{}
		a.begin()
	}
}

// begin starts the service once its dependencies are ready.
func (a *service) begin() {
	a.cancelDeps()
	a.runGen++
	if deps := a.spec.After; len(deps) > 0 {
		g := a.runGen
		ctx, cancel := context.WithCancel(context.Background())
		a.depsCancel = cancel
		a.transition(StateWaiting, "started: waiting for "+strings.Join(deps, ", "))
		a.replyStarts(nil)
		go func() {
			err := a.sup.WaitReady(ctx, deps...)
			a.send(event{kind: evDeps, gen: g, err: err})
		}()
		return
	}
	a.launch()
}

func (a *service) cancelDeps() {
	if a.depsCancel != nil {
		a.depsCancel()
		a.depsCancel = nil
	}
}

func (a *service) cancelProbe() {
	if a.probeCancel != nil {
		a.probeCancel()
		a.probeCancel = nil
	}
}

// launch spawns the main process, unless something of the service still
// runs, which it adopts instead.
func (a *service) launch() {
	a.cancelDeps()
	if a.occupiedForStart() {
		rec, err := readRecord(a.dir)
		if a.adopt(rec, err == nil) {
			a.replyStarts(nil)
			return
		}
	}
	a.runGen++
	if a.cgKilled {
		if err := a.renewCgroup(); err != nil {
			a.startFailed(err)
			return
		}
	}
	if a.spec.Ready != nil && a.spec.Ready.Notify {
		if err := a.openNotify(); err != nil {
			a.startFailed(err)
			return
		}
	}
	if a.spec.StopMode == StopMain && a.cg != "" {
		if err := a.markSpawn(); err != nil {
			a.startFailed(err)
			return
		}
	}
	p, err := a.spawn()
	a.spawnTick = 0
	if err != nil {
		a.startFailed(err)
		return
	}
	if h := a.sup.afterSpawn; h != nil {
		h(a.name, p.pid)
	}
	a.adopted, a.failed = false, false
	a.startedAt = time.Now()
	a.transition(StateStarting, "spawned")
	a.setMain(p)
	a.log.agentf("started %s (pid %d)", a.spec.Command, p.pid)
	a.replyStarts(nil)
	if a.spec.Ready == nil {
		a.markReady()
		return
	}
	a.saveRecord()
	a.startProbe()
}

// renewCgroup replaces the service's empty cgroup by a fresh one. Linux
// (seen on 6.18) kills every process cloned with CLONE_INTO_CGROUP into a
// cgroup that was once the target of cgroup.kill: the child is checked
// against the cgroup's kill sequence number, which a kill increments and
// nothing resets. A fresh cgroup starts at zero.
func (a *service) renewCgroup() error {
	a.sup.unwatchCgroup(a)
	if err := cgRemove(a.cg); err != nil {
		return err
	}
	if err := os.Mkdir(a.cg, 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	a.cgKilled = false
	return a.sup.watchCgroup(a)
}

func (a *service) startFailed(err error) {
	a.lastErr = "start: " + err.Error()
	a.log.agentf("start failed: %v", err)
	a.sup.log.Error("start failed", "service", a.name, "err", err)
	a.replyStarts(fmt.Errorf("service %q: start: %w", a.name, err))
	a.failed = true
	a.afterEnd()
}

func (a *service) startProbe() {
	ctx, cancel := context.WithCancel(context.Background())
	a.probeCancel = cancel
	g, r := a.runGen, a.spec.Ready
	go func() {
		err := probe(ctx, r)
		if ctx.Err() != nil && err != nil && !strings.HasPrefix(err.Error(), "readiness") {
			return
		}
		a.send(event{kind: evProbe, gen: g, err: err})
	}()
}

func (a *service) markReady() {
	a.cancelProbe()
	a.lastErr = ""
	a.transition(StateRunning, "ready")
	a.saveRecord()
}

// beginStop signals the service to stop, for the reason why; ended()
// follows when it has.
func (a *service) beginStop(why string) {
	a.cancelDeps()
	a.cancelProbe()
	stopTimer(&a.backoffT)
	a.nextStart = time.Time{}
	a.transition(StateStopping, why)
	sig := a.spec.StopSignal
	switch {
	case a.main != nil:
		if err := a.main.signal(sig); err != nil {
			a.sup.log.Warn("stop signal", "service", a.name, "err", err)
		}
	case a.spec.StopMode == StopMain && a.cg != "":
		a.ended()
		return
	default:
		a.signalAll(sig)
		a.armPoll(10 * time.Millisecond)
	}
	if a.cg == "" {
		a.armPoll(10 * time.Millisecond)
	}
	stopTimer(&a.stopT)
	a.stopT = time.NewTimer(a.spec.StopTimeout)
}

func (a *service) stopTimedOut() {
	if a.phase != StateStopping {
		return
	}
	if a.spec.StopMode == StopMain && a.cg != "" {
		if a.main != nil {
			a.log.agentf("stop timeout (%v): killing the main process", a.spec.StopTimeout)
			_ = a.main.signal(syscall.SIGKILL)
		}
	} else {
		a.log.agentf("stop timeout (%v): killing all processes", a.spec.StopTimeout)
		a.killAll()
	}
	a.stopT = time.NewTimer(5 * time.Second)
}

func (a *service) signalAll(sig syscall.Signal) {
	if a.cg != "" {
		_ = cgSignal(a.cg, sig)
		return
	}
	for _, p := range a.members() {
		_ = unix.Kill(p, sig)
	}
}

func (a *service) killAll() {
	if a.cg != "" {
		a.cgKilled = true
		if err := cgKill(a.cg); err != nil {
			a.sup.log.Error("kill", "service", a.name, "err", err)
		}
		return
	}
	if a.main != nil {
		_ = a.main.signal(syscall.SIGKILL)
		_ = unix.Kill(-a.main.pid, syscall.SIGKILL)
	}
	for _, p := range a.members() {
		_ = unix.Kill(p, syscall.SIGKILL)
	}
}

// ended runs when the service has no process left (for StopMain: its main
// process ended).
func (a *service) ended() {
	a.cancelProbe()
	stopTimer(&a.stopT)
	stopTimer(&a.pollT)
	if a.main != nil {
		a.main.close()
		a.main = nil
	}
	a.afterEnd()
}

// afterEnd decides what follows the end of a run: stopped, started again
// (a requested restart, or the restart policy after a crash), or failed.
func (a *service) afterEnd() {
	switch a.goal {
	case goalStop, goalRemove:
		a.toStopped()
		return
	case goalRestart:
		a.setGoal(goalRun)
		a.replyStops(nil)
		a.begin()
		return
	}
	failed := a.failed
	a.failed = false
	policy := a.spec.Restart
	if policy == RestartNever || (policy == RestartOnFailure && !failed) {
		if failed {
			a.transition(StateFailed, "ended in failure; restart = "+string(policy))
		} else {
			a.transition(StateStopped, "ended; restart = "+string(policy))
		}
		a.setGoal(goalStop)
		a.saveRecord()
		return
	}
	if !a.startedAt.IsZero() && time.Since(a.startedAt) >= a.spec.HealthyAfter {
		a.crashes = 0
	}
	delay := restartDelay(a.spec, a.crashes)
	a.crashes++
	a.restarts++
	a.saveRecord()
	if delay <= 0 {
		a.begin()
		return
	}
	a.transition(StateBackoff, "ended: restart in "+delay.Round(time.Millisecond).String())
	a.nextStart = time.Now().Add(delay)
	a.log.agentf("restarting in %v", delay.Round(time.Millisecond))
	a.backoffT = time.NewTimer(delay)
}

func (a *service) backoffFired() {
	a.nextStart = time.Time{}
	switch a.phase {
	case StateBackoff, StateWaiting:
		a.begin()
	}
}

// restartDelay is the delay before restart number n (0-based) of a crash
// loop: BackoffMin first (0: at once), then doubling from twice BackoffMin
// (100ms when BackoffMin is 0, 200ms when it is below 100ms), capped at
// BackoffMax, with jitter that takes up to a quarter off so that services
// crashing together do not restart in lockstep. The delays still grow: a
// quarter off the double is more than the single.
func restartDelay(s Spec, n int) time.Duration {
	if n == 0 {
		return s.BackoffMin
	}
	first := max(s.BackoffMin, 100*time.Millisecond)
	if s.BackoffMin > 0 {
		first *= 2
	}
	return backoff.Policy{Min: first, Max: s.BackoffMax, Factor: 2, Jitter: 0.25}.Delay(n - 1)
}

func (a *service) toStopped() {
	a.cancelDeps()
	a.cancelProbe()
	stopTimer(&a.backoffT)
	stopTimer(&a.stopT)
	stopTimer(&a.pollT)
	a.nextStart = time.Time{}
	a.transition(StateStopped, "stopped")
	a.replyStops(nil)
	a.saveRecord()
	if a.goal == goalRemove {
		a.finishRemove()
	}
}

func (a *service) finishRemove() {
	var errs []error
	a.closeNotify()
	a.sup.unwatchCgroup(a)
	if a.cg != "" {
		if err := cgRemove(a.cg); err != nil {
			errs = append(errs, err)
		}
	}
	if a.memcg != "" || a.sup.memV1 != "" {
		_ = unix.Rmdir(filepath.Join(a.sup.memV1, a.name))
	}
	_ = os.Remove(filepath.Join(a.dir, "record.json"))
	_ = os.Remove(filepath.Join(a.dir, "lock"))
	a.sup.mu.Lock()
	if a.sup.svcs[a.name] == a {
		delete(a.sup.svcs, a.name)
	}
	a.sup.mu.Unlock()
	a.log.close()
	err := errors.Join(errs...)
	for _, c := range a.removeWaiters {
		a.answer(c, err)
	}
	a.removeWaiters = nil
	a.setGoal(goalGone)
}

// detach lets go of the service without touching its processes.
func (a *service) detach() {
	a.cancelDeps()
	a.cancelProbe()
	stopTimer(&a.backoffT)
	stopTimer(&a.stopT)
	stopTimer(&a.pollT)
	if a.main != nil {
		a.main.close()
	}
	a.closeNotify()
	a.sup.unwatchCgroup(a)
	err := fmt.Errorf("service %q: supervisor closed", a.name)
	a.replyStarts(err)
	a.replyStops(err)
	for _, c := range a.removeWaiters {
		a.answer(c, err)
	}
	a.log.close()
	a.setGoal(goalGone)
}

func (a *service) reload() error {
	sig := a.spec.ReloadSignal
	if a.main != nil {
		if err := a.main.signal(sig); err != nil {
			return fmt.Errorf("service %q: reload: %w", a.name, err)
		}
		a.log.agentf("sent %s to pid %d (reload)", signalName(sig), a.main.pid)
		return nil
	}
	if (a.phase == StateRunning || a.phase == StateStarting) && a.spec.StopMode == StopCgroup && a.occupied() {
		a.signalAll(sig)
		return nil
	}
	return fmt.Errorf("service %q: reload: not running", a.name)
}

// update applies a new spec: in place, or with a restart when what the
// process was started with changed. The answer comes once the new process
// is started.
func (a *service) update(spec Spec, reply chan error) {
	old := a.spec
	a.mu.Lock()
	a.spec = spec
	a.mu.Unlock()
	a.configure()
	if execHash(old) == execHash(spec) {
		if a.phase != StateStopped && a.phase != StateFailed {
			a.saveRecord()
		}
		if a.phase == StateWaiting && !slices.Equal(old.After, spec.After) {
			a.begin() // wait for the new dependencies instead
		}
		a.answer(reply, nil)
		return
	}
	switch a.phase {
	case StateStopped, StateFailed:
		a.answer(reply, nil)
		return
	}
	a.log.agentf("configuration changed: restarting")
	a.startWaiters = append(a.startWaiters, reply)
	a.restartNow()
}
