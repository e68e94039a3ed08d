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
		if u.st.Clients.Surge {
			idx := byPool[pool]
			for len(idx) > 0 {
				n := min(par, len(idx))
				if err := u.surge(ctx, pool, idx[:n]); err != nil {
					return err
				}
				idx = idx[n:]
			}
			continue
		}
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
	return u.runRecorded(ctx, i, func(s Step, prev StepStatus) error {
		return u.clientSteps(ctx, i, s, prev)
	})
}

func (u *Upgrader) clientSteps(ctx context.Context, i int, s Step, prev StepStatus) error {
	want := u.cfg.Target
	_, nomadToo := want[Nomad]
	state, err := u.clientState(ctx, s)
	if err != nil {
		return err
	}
	// A restart phase is recorded only once it completed (see phase), so
	// a step cut short before that is restarted again; one cut short
	// after it goes on to wait for the daemons to report the target.
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
	err = u.phase(i, "back", func() error { return u.waitClient(ctx, s.Machine, s.Address) })
	if err != nil || !nomadToo {
		return err
	}
	return u.phase(i, "eligible", func() error {
		return anyServer(ctx, u, "", u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) error {
			return hashi.SetNodeEligibility(ctx, c, state.node.ID, true)
		})
	})
}

// waitClient waits until the client machine runs the target versions,
// its Nomad node ready, for at most Gate.Timeout.
func (u *Upgrader) waitClient(ctx context.Context, machine, addr string) error {
	want := u.cfg.Target
	_, nomadToo := want[Nomad]
	ctx, cancel := context.WithTimeout(ctx, u.cfg.Gate.Timeout)
	defer cancel()
	tick := time.NewTicker(u.cfg.Gate.Interval)
	defer tick.Stop()
	for {
		state, err := u.clientState(ctx, Step{Machine: machine, Address: addr})
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
		case <-ctx.Done():
			return fmt.Errorf("%s not on %s within %v: %s", machine, DescribeVersions(want), u.cfg.Gate.Timeout, problem)
		case <-tick.C:
		}
	}
}

// surge replaces the client machines of steps idx (one pool): as many
// new machines on the target versions, ready; then each old one drained
// and destroyed, and its Nomad node purged.
func (u *Upgrader) surge(ctx context.Context, pool string, idx []int) error {
	var need []int
	for _, i := range idx {
		u.update(i, func(st *Step) {
			st.Resumed = st.Resumed || st.Status == StatusRunning
			st.Status = StatusRunning
			st.Attempts++
			st.Error = ""
			if st.Started.IsZero() {
				st.Started = time.Now()
			}
			if st.Replacement == "" {
				need = append(need, i)
			}
		})
	}
	failAll := func(err error) error {
		if ctx.Err() != nil {
			return fmt.Errorf("upgrade interrupted in a surge of pool %s: %w", pool, err)
		}
		for _, i := range idx {
			u.fail(i, err)
		}
		return err
	}
	if len(need) > 0 {
		start := time.Now()
		old := make([]string, len(need))
		for k, i := range need {
			old[k] = u.step(i).Machine
		}
		created, err := u.cfg.Pools.Create(ctx, pool, old, u.cfg.Target)
		if err == nil && len(created) != len(need) {
			err = fmt.Errorf("asked for %d machines, got %d", len(need), len(created))
		}
		if err != nil {
			return failAll(fmt.Errorf("surge of pool %s: create %d machines: %w", pool, len(need), err))
		}
		for k, i := range need {
			u.update(i, func(st *Step) { st.Replacement, st.ReplacementAddress = created[k].Machine, created[k].Address })
			u.record(i, "create", time.Since(start))
		}
	}
	for _, i := range idx {
		s := u.step(i)
		if err := u.phase(i, "ready", func() error { return u.waitClient(ctx, s.Replacement, s.ReplacementAddress) }); err != nil {
			return failAll(fmt.Errorf("%s: replacement %s: %w", s.ID, s.Replacement, err))
		}
	}
	_, nomadToo := u.cfg.Target[Nomad]
	for _, i := range idx {
		s := u.step(i)
		var node *hashi.NomadNode
		if nomadToo {
			state, err := u.clientState(ctx, s)
			if err != nil {
				return failAll(fmt.Errorf("%s: %w", s.ID, err))
			}
			node = state.node
		}
		if node != nil && node.Status == nomadapi.NodeStatusReady {
			var res hashi.DrainResult
			err := u.phase(i, "drain", func() error {
				return anyServer(ctx, u, "", u.cfg.APIs.Nomad, 0, func(ctx context.Context, c *nomadapi.Client) (err error) {
					res, err = hashi.DrainNode(ctx, c, node.ID, u.st.Clients.DrainDeadline)
					return err
				})
			})
			if err != nil {
				return failAll(fmt.Errorf("%s: %w", s.ID, err))
			}
			u.update(i, func(st *Step) { st.Drained = max(st.Drained, res.Allocs) })
		}
		if err := u.phase(i, "destroy", func() error { return u.cfg.Pools.Destroy(ctx, s.Machine) }); err != nil {
			return failAll(fmt.Errorf("%s: destroy %s: %w", s.ID, s.Machine, err))
		}
		if node != nil {
			err := anyServer(ctx, u, "", u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) error {
				return hashi.PurgeNode(ctx, c, node.ID)
			})
			if err != nil {
				return failAll(fmt.Errorf("%s: %w", s.ID, err))
			}
		}
		u.update(i, func(st *Step) {
			st.Status = StatusDone
			st.Finished = time.Now()
			st.Note = joinNote(st.Note, "replaced by "+st.Replacement)
		})
	}
	return nil
}

func (u *Upgrader) step(i int) Step {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.st.Steps[i]
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
