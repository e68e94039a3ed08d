package deploy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/progress"
	"github.com/steppe/steppe/internal/upgrade"
)

// ScaleOptions are Options plus what `steppe scale POOL COUNT` asks.
type ScaleOptions struct {
	Options
	Pool  string
	Count int
	// DrainDeadline bounds the drain of each machine removed: jobs
	// migrate as their migrate blocks say, and what is left is stopped at
	// the deadline; 0 means 5 minutes.
	DrainDeadline time.Duration
	// MachineTimeout bounds how long a new machine may take to become
	// healthy; 0 means 5 minutes.
	MachineTimeout time.Duration
}

// ScaleResult is what scale did.
type ScaleResult struct {
	Pool    string         `json:"pool"`
	From    int            `json:"from"`
	To      int            `json:"to"`
	Created []string       `json:"created,omitempty"`
	Removed []string       `json:"removed,omitempty"`
	Drained map[string]int `json:"drained,omitempty"` // machine → allocations it ran when its drain began
	Took    time.Duration  `json:"took"`
}

// Scale sets the number of machines of a client pool: it grows by making
// machines (ready Nomad clients before it returns) and shrinks by
// draining the highest-numbered ones, all at once and each within the
// deadline, then removing them. The new size is recorded first, so a
// scale that was interrupted finishes when run again.
func Scale(ctx context.Context, opts ScaleOptions) (*ScaleResult, error) {
	start := time.Now()
	if opts.Count < 0 {
		return nil, fmt.Errorf("scale: count %d: want 0 or more", opts.Count)
	}
	if opts.DrainDeadline == 0 {
		opts.DrainDeadline = 5 * time.Minute
	}
	o, release, err := openFleet(opts.Options, "scale", opts.MachineTimeout)
	if err != nil {
		return nil, err
	}
	defer release()
	if st, err := pendingUpgrade(o.stateDir); err != nil {
		return nil, err
	} else if st != nil {
		return nil, fmt.Errorf("scale: an upgrade to %s is in progress: run steppe upgrade to finish it first", upgrade.DescribeVersions(st.Target))
	}
	o.mu.Lock()
	_, ok := o.fleet.Pools[opts.Pool]
	pools := slices.Sorted(maps.Keys(o.fleet.Pools))
	members := o.fleet.machines(cluster.RoleClient, opts.Pool)
	o.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("scale: cluster %s has no pool %q (pools: %s)", o.spec.Name, opts.Pool, strings.Join(pools, ", "))
	}
	res := &ScaleResult{Pool: opts.Pool, From: len(members), To: opts.Count, Drained: map[string]int{}}
	o.printf("steppe scale: pool %s of cluster %s from %d to %d machines", opts.Pool, o.spec.Name, len(members), opts.Count)
	// The artifacts the pool's machines run must be in the store (a new
	// machine fetches them).
	if err := o.ensureArtifacts(ctx, fleetVersions(o.fleet)); err != nil {
		return nil, err
	}
	if len(members) > opts.Count {
		var keep, gone []string
		for i, m := range members {
			if i < opts.Count {
				keep = append(keep, m.Name)
			} else {
				gone = append(gone, m.Name)
			}
		}
		if err := o.readyToTakeOver(ctx, keep); err != nil {
			return res, fmt.Errorf("scale: not draining %s: %w", strings.Join(gone, ", "), err)
		}
	}
	var names []string
	err = o.withFleet(func(f *fleet) {
		f.Pools[opts.Pool] = opts.Count
		for range opts.Count - len(members) {
			names = append(names, f.add(o.spec.Name, cluster.RoleClient, opts.Pool, f.Versions, "").Name)
		}
	})
	if err != nil {
		return nil, err
	}
	switch {
	case len(names) > 0:
		o.printf("==> creating %s", strings.Join(names, ", "))
		if _, err := o.grow(ctx, names); err != nil {
			return res, fmt.Errorf("scale: %w", err)
		}
		o.printf("==> waiting for their Nomad clients")
		if err := o.waitNodesReady(ctx, names); err != nil {
			return res, fmt.Errorf("scale: %w", err)
		}
		res.Created = names
	case len(members) > opts.Count:
		victims := members[opts.Count:]
		for _, v := range victims {
			names = append(names, v.Name)
		}
		o.printf("==> draining and removing %s", strings.Join(names, ", "))
		if err := o.shrink(ctx, names, opts.DrainDeadline, res); err != nil {
			return res, fmt.Errorf("scale: %w", err)
		}
		res.Removed = names
	default:
		o.printf("pool %s has %d machines already", opts.Pool, opts.Count)
	}
	res.Took = time.Since(start)
	o.printf("pool %s: %d machines (%s)", opts.Pool, opts.Count, res.Took.Round(100*time.Millisecond))
	return res, nil
}

// notReady says, of the machines named, which are not ready, eligible
// Nomad clients and why; empty when all are.
func (o *fleetOps) notReady(ctx context.Context, names []string) (string, error) {
	var nodes []hashi.NomadNode
	err := anyServer(ctx, o, o.Nomad, func(c *nomadapi.Client) (err error) {
		nodes, err = hashi.NomadNodes(ctx, c)
		return err
	})
	if err != nil {
		return "", err
	}
	var bad []string
	for _, n := range names {
		i := slices.IndexFunc(nodes, func(nd hashi.NomadNode) bool { return nd.Name == n })
		switch {
		case i < 0:
			bad = append(bad, n+" is not a Nomad node")
		case nodes[i].Status != nomadapi.NodeStatusReady || !nodes[i].Eligible:
			bad = append(bad, fmt.Sprintf("%s is %s, eligible %v", n, nodes[i].Status, nodes[i].Eligible))
		}
	}
	return strings.Join(bad, "; "), nil
}

// readyToTakeOver checks that the machines that stay are ready, eligible
// Nomad clients: what the drains move must have somewhere to go.
func (o *fleetOps) readyToTakeOver(ctx context.Context, keep []string) error {
	problem, err := o.notReady(ctx, keep)
	if err != nil {
		return err
	}
	if problem != "" {
		return fmt.Errorf("the machines that stay must be ready to take their work: %s", problem)
	}
	return nil
}

// waitNodesReady waits until the machines named are ready, eligible
// Nomad clients.
func (o *fleetOps) waitNodesReady(ctx context.Context, names []string) error {
	ctx, cancel := context.WithTimeout(ctx, o.machineTimeout)
	defer cancel()
	tasks := make([]*progress.Task, len(names))
	for i, n := range names {
		tasks[i] = o.task(n, "waiting for its Nomad client to be ready and eligible")
	}
	for {
		problem, err := o.notReady(ctx, names)
		if err == nil && problem == "" {
			for i, n := range names {
				tasks[i].Done(fmt.Sprintf("    %-24s ready, eligible", n))
			}
			return nil
		}
		if err != nil {
			problem = err.Error()
		}
		select {
		case <-ctx.Done():
			err := fmt.Errorf("nomad clients not ready: %s", problem)
			for _, t := range tasks {
				t.Fail(err)
			}
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// shrink drains the machines named (all ineligible first, so that what
// leaves one is not placed on another about to go), then removes them
// and purges their Nomad nodes.
func (o *fleetOps) shrink(ctx context.Context, names []string, deadline time.Duration, res *ScaleResult) error {
	var nodes []hashi.NomadNode
	err := anyServer(ctx, o, o.Nomad, func(c *nomadapi.Client) (err error) {
		nodes, err = hashi.NomadNodes(ctx, c)
		return err
	})
	if err != nil {
		return err
	}
	nodeOf := map[string]hashi.NomadNode{}
	for _, n := range names {
		if i := slices.IndexFunc(nodes, func(nd hashi.NomadNode) bool { return nd.Name == n }); i >= 0 {
			nodeOf[n] = nodes[i]
		}
	}
	for _, n := range names {
		nd, ok := nodeOf[n]
		if !ok || nd.Status != nomadapi.NodeStatusReady {
			continue
		}
		err := anyServer(ctx, o, o.Nomad, func(c *nomadapi.Client) error { return hashi.SetNodeEligibility(ctx, c, nd.ID, false) })
		if err != nil {
			return err
		}
	}
	errs := make([]error, len(names))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Go(func() {
			t := time.Now()
			task := o.task(n, "draining")
			defer func() {
				if errs[i] != nil {
					task.Fail(errs[i])
				}
			}()
			if nd, ok := nodeOf[n]; ok && nd.Status == nomadapi.NodeStatusReady {
				var dr hashi.DrainResult
				err := anyServer(ctx, o, o.Nomad, func(c *nomadapi.Client) (err error) {
					dr, err = hashi.DrainNode(ctx, c, nd.ID, deadline)
					return err
				})
				if err != nil {
					errs[i] = fmt.Errorf("drain %s: %w", n, err)
					return
				}
				mu.Lock()
				res.Drained[n] = dr.Allocs
				mu.Unlock()
				o.printf("    %-24s drained (%d allocations) in %s", n, dr.Allocs, dr.Duration.Round(10*time.Millisecond))
			}
			task.Phase("removing")
			if err := o.Destroy(ctx, n); err != nil {
				errs[i] = fmt.Errorf("remove %s: %w", n, err)
				return
			}
			if nd, ok := nodeOf[n]; ok {
				err := anyServer(ctx, o, o.Nomad, func(c *nomadapi.Client) error { return hashi.PurgeNode(ctx, c, nd.ID) })
				if err != nil {
					errs[i] = err
					return
				}
			}
			task.Done(fmt.Sprintf("    %-24s removed in %s", n, time.Since(t).Round(10*time.Millisecond)))
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
