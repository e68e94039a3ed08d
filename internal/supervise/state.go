package supervise

import "time"

// The life of a service is a state machine: its State (what Status shows)
// changes only through transition, which checks the move against allowed
// and logs it; what follows the end of a run is decided by its goal.
//
//	from                      to        when
//	stopped, failed, backoff  waiting   started, dependencies not ready yet
//	  waiting                 starting  started (or adopted): main process spawned
//	                          backoff   the start failed, retried later
//	                          failed    the start failed, not to be retried
//	                          stopped   stopped; the start failed, not retried
//	starting                  running   ready (readiness passed, or none asked)
//	starting, running         stopping  stop, restart, changed spec; readiness
//	                                    failed; main failed leaving processes
//	starting, running,        starting  ended: started again at once
//	  stopping                waiting   ended: started again, dependencies first
//	                          backoff   ended: started again after a delay
//	                          failed    ended in failure, not to be restarted
//	                          stopped   ended and not to be restarted, or stopped
//
// Only a starting service becomes running, and only a running one (starting
// or running) stopping: a service waiting or in backoff has no process to
// stop, so a stop takes it straight to stopped.

// allowed reports whether a service in state from may go to state to: the
// table above.
func allowed(from, to State) bool {
	switch to {
	case StateRunning:
		return from == StateStarting
	case StateStopping:
		return from == StateStarting || from == StateRunning
	case StateWaiting, StateStarting, StateBackoff, StateFailed, StateStopped:
		return true
	}
	return false
}

// transition moves the service to state to, for the reason why: the one
// place where its State changes. Each move is logged (at debug level); one
// the table does not allow is logged as an error, since it is a bug, and
// made anyway, so that the service goes on.
func (a *service) transition(to State, why string) {
	from := a.phase
	if from == to {
		return
	}
	if !allowed(from, to) {
		a.sup.log.Error("illegal state transition", "service", a.name, "from", from, "to", to, "why", why)
	}
	a.phase, a.since = to, time.Now()
	a.sup.log.Debug("state", "service", a.name, "from", from, "to", to, "why", why)
}

// goal is what the service is meant to do: it decides what follows the end
// of a run (afterEnd), and whether the actor goes on.
type goal int

const (
	goalStop    goal = iota // not meant to run: a run that ends leaves it stopped
	goalRun                 // meant to run: after a run ends, its restart policy decides
	goalRestart             // meant to run, and to start again as soon as it has stopped
	goalRemove              // to be stopped, its cgroup and record removed, its actor ended
	goalGone                // removed or detached: the actor ends
)

func (g goal) String() string {
	switch g {
	case goalStop:
		return "stop"
	case goalRun:
		return "run"
	case goalRestart:
		return "restart"
	case goalRemove:
		return "remove"
	case goalGone:
		return "gone"
	}
	return "unknown"
}

// setGoal changes what the service is meant to do. A removal stands: a
// stop, start or restart asked for meanwhile does not cancel it.
func (a *service) setGoal(g goal) {
	if a.goal == g || a.goal == goalRemove && g != goalGone || a.goal == goalGone {
		return
	}
	a.sup.log.Debug("goal", "service", a.name, "from", a.goal, "to", g)
	a.goal = g
}
