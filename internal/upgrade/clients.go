package upgrade

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/hashi"
)

// runClients upgrades the client machines in place, pool by pool, at
// most Parallelism machines of a pool at once. It stops after the pool in
// which a machine failed.
func (u *Upgrader) runClients(ctx context.Context) error {
	u.mu.Lock()
	var pools []string
	byPool := map[string][]int{}
	for i, s := range u.st.Steps {
		if s.Kind != KindClient || s.Status == StatusDone {
			continue
		}
		if _, ok := byPool[s.Pool]; !ok {
			pools = append(pools, s.Pool)
		}
		byPool[s.Pool] = append(byPool[s.Pool], i)
	}
	par := u.st.Clients.Parallelism
	u.mu.Unlock()
	for _, pool := range pools {
		sem := make(chan struct{}, par)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var errs []error
		for _, i := range byPool[pool] {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
			mu.Lock()
			stop := len(errs) > 0
			mu.Unlock()
			if stop {
				break
			}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := u.client(ctx, i); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("upgrade interrupted in pool %s: %w", pool, err)
		}
	}
	return nil
}

// client upgrades one client machine in place: ineligible and drained
// (when its Nomad changes), daemons replaced, back on the new versions,
// eligible again. Resumed on a machine already on the target versions, it
// only verifies and makes it eligible.
func (u *Upgrader) client(ctx context.Context, i int) error {
	var s Step
	var prev StepStatus
	u.update(i, func(st *Step) {
		prev = st.Status
		st.Resumed = st.Resumed || st.Status == StatusRunning
		st.Status = StatusRunning
		st.Attempts++
		st.Error = ""
		if st.Started.IsZero() {
			st.Started = time.Now()
		}
		s = *st
	})
	err := u.clientSteps(ctx, i, s, prev)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("upgrade interrupted in %s: %w", s.ID, err)
		}
		return u.fail(i, fmt.Errorf("%s: %w", s.ID, err))
	}
	return u.update(i, func(st *Step) {
		st.Status = StatusDone
		st.Finished = time.Now()
	})
}

func (u *Upgrader) clientSteps(ctx context.Context, i int, s Step, prev StepStatus) error {
	want := u.cfg.Target
	_, nomadToo := want[Nomad]
	state, err := u.clientState(ctx, s)
	if err != nil {
		return err
	}
	switch {
	case prev == StatusRunning && hasPhase(s.Phases, "restart"):
		u.update(i, func(st *Step) {
			st.Note = joinNote(st.Note, "interrupted after its restart: verified, not restarted again")
		})
	case state.on(want):
		u.update(i, func(st *Step) { st.Note = joinNote(st.Note, "found on the target versions: verified, not restarted") })
	default:
		if nomadToo {
			if state.node == nil {
				return fmt.Errorf("%s is not a Nomad node", s.Machine)
			}
			var res hashi.DrainResult
			err := u.phase(i, "drain", func() error {
				return anyServer(ctx, u, "", u.cfg.APIs.Nomad, 0, func(ctx context.Context, c *nomadapi.Client) (err error) {
					res, err = hashi.DrainNode(ctx, c, state.node.ID, u.st.Clients.DrainDeadline)
					return err
				})
			})
			if err != nil {
				return err
			}
			u.update(i, func(st *Step) { st.Drained = max(st.Drained, res.Allocs) })
		}
		err := u.phase(i, "restart", func() error { return u.cfg.Machines.Upgrade(ctx, s.Machine, want) })
		if err != nil {
			return fmt.Errorf("upgrade %s: %w", s.Machine, err)
		}
	}
	err = u.phase(i, "back", func() error {
		gctx, cancel := context.WithTimeout(ctx, u.cfg.Gate.Timeout)
		defer cancel()
		tick := time.NewTicker(u.cfg.Gate.Interval)
		defer tick.Stop()
		for {
			state, err := u.clientState(gctx, s)
			var problem string
			switch {
			case err != nil:
				problem = err.Error()
			case !state.on(want):
				problem = fmt.Sprintf("runs %s", state)
			case nomadToo && state.node.Status != nomadapi.NodeStatusReady:
				problem = "nomad node is " + state.node.Status
			default:
				return nil
			}
			select {
			case <-gctx.Done():
				return fmt.Errorf("%s not back on %s within %v: %s", s.Machine, describe(want), u.cfg.Gate.Timeout, problem)
			case <-tick.C:
			}
		}
	})
	if err != nil || !nomadToo {
		return err
	}
	return u.phase(i, "eligible", func() error {
		return anyServer(ctx, u, "", u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) error {
			return hashi.SetNodeEligibility(ctx, c, state.node.ID, true)
		})
	})
}

// clientState is what a client machine runs.
type clientState struct {
	consul *hashi.Member
	node   *hashi.NomadNode
}

func (c clientState) on(want map[string]string) bool {
	if v, ok := want[Consul]; ok && (c.consul == nil || !c.consul.Alive || c.consul.Version != v) {
		return false
	}
	if v, ok := want[Nomad]; ok && (c.node == nil || c.node.Version != v) {
		return false
	}
	return true
}

func (c clientState) String() string {
	s := "consul (none)"
	if c.consul != nil {
		s = fmt.Sprintf("consul %s (%s)", c.consul.Version, c.consul.Status)
	}
	if c.node != nil {
		s += fmt.Sprintf(", nomad %s (%s)", c.node.Version, c.node.Status)
	}
	return s
}

func (u *Upgrader) clientState(ctx context.Context, s Step) (clientState, error) {
	var st clientState
	if _, ok := u.cfg.Target[Consul]; ok {
		var ms []hashi.Member
		err := anyServer(ctx, u, "", u.cfg.APIs.Consul, queryLimit, func(ctx context.Context, c *consulapi.Client) (err error) {
			ms, err = hashi.ConsulMemberVersions(ctx, c)
			return err
		})
		if err != nil {
			return st, err
		}
		if j := slices.IndexFunc(ms, func(m hashi.Member) bool { return m.Addr == s.Address && !m.Server }); j >= 0 {
			st.consul = &ms[j]
		}
	}
	if _, ok := u.cfg.Target[Nomad]; ok {
		var nodes []hashi.NomadNode
		err := anyServer(ctx, u, "", u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) (err error) {
			nodes, err = hashi.NomadNodes(ctx, c)
			return err
		})
		if err != nil {
			return st, err
		}
		st.node = nodeNamed(nodes, s.Machine)
	}
	return st, nil
}
