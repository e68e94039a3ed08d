package supervise

import (
	"context"
	"fmt"
)

// KillLeftovers kills every process left in the cgroup of a stopped
// service: the task executors a Nomad client (StopMode main) leaves behind
// on purpose, once the state that would have let it re-attach to them is
// gone. It returns how many there were. A running service is refused;
// without a cgroup (fallback isolation) the leftovers cannot be told.
func (s *Supervisor) KillLeftovers(ctx context.Context, name string) (int, error) {
	svc, err := s.get(name)
	if err != nil {
		return 0, err
	}
	n := svc.processCount()
	if err := svc.call(ctx, ctlMsg{op: ctlKillLeft}); err != nil {
		return 0, err
	}
	return n, nil
}

// killLeftovers is KillLeftovers in the actor, which must know of the kill:
// the next start needs a fresh cgroup (see renewCgroup).
func (a *service) killLeftovers() error {
	switch a.phase {
	case StateStarting, StateRunning, StateStopping:
		return fmt.Errorf("service %q is %s: stop it first", a.name, a.phase)
	}
	if a.cg == "" {
		return fmt.Errorf("service %q has no cgroup (isolation %s): what it left cannot be found", a.name, a.sup.isolation())
	}
	if a.processCount() == 0 {
		return nil
	}
	a.cgKilled = true
	if err := cgKill(a.cg); err != nil {
		return fmt.Errorf("service %q: %w", a.name, err)
	}
	return nil
}
