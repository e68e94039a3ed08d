package deploy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/supervise"
)

// SteppeUpgradeOptions are Options plus what `steppe upgrade -steppe V`
// is asked.
type SteppeUpgradeOptions struct {
	Options
	// Version is the steppe version the agents move to.
	Version string
	// Source is a steppe binary of Version to publish into the cluster's
	// own artifact store when the store lacks it; "" means this process's
	// binary, if it is that version.
	Source string
	// Parallel is how many machines move at once (1 when 0).
	Parallel int
	// MachineTimeout bounds each machine's move; 0 means 2 minutes.
	MachineTimeout time.Duration
}

// UpgradeSteppe moves every machine's agent to another steppe binary
// without restarting any daemon: each machine's bundle is published with
// the steppe artifact of the version (agent/selfupgrade.go: the agent
// verifies it, replaces its own binary and execs it, adopting every
// service), then the machine is watched until its agent reports the
// version under the same pid, with every daemon under the same pid and
// restart count. The steppe binary being published into a signed store
// like the daemons' binaries, an agent trusts it as it trusts them. A
// machine whose new agent is rolled back stops the upgrade: its bundle
// names its previous steppe again, and the error names the machine.
func UpgradeSteppe(ctx context.Context, opts SteppeUpgradeOptions) error {
	start := time.Now()
	ver := strings.TrimPrefix(opts.Version, "v")
	if ver == "" {
		return errors.New("upgrade -steppe: no version given")
	}
	if opts.MachineTimeout == 0 {
		opts.MachineTimeout = 2 * time.Minute
	}
	o, release, err := openFleet(opts.Options, "upgrade", opts.MachineTimeout)
	if err != nil {
		return err
	}
	defer release()
	o.printf("steppe upgrade: cluster %s to steppe %s (state %s)", o.spec.Name, ver, o.stateDir)

	// Refused like the other products' upgrades: a cluster that is not
	// healthy is not touched.
	st, err := GetStatus(ctx, opts.Options)
	if err != nil {
		return err
	}
	if !st.Healthy {
		return fmt.Errorf("upgrade -steppe refused: cluster %s is not healthy: %s (steppe status says more)", o.spec.Name, strings.Join(st.Problems, "; "))
	}
	if pending, err := pendingUpgrade(o.stateDir); err == nil && pending != nil {
		return fmt.Errorf("upgrade -steppe refused: an upgrade of the daemons is unfinished: finish it first (steppe upgrade)")
	}

	o.printf("==> artifact steppe %s", ver)
	if err := o.ensureSteppe(ctx, ver, opts.Source); err != nil {
		return err
	}

	have, err := o.provisioned(ctx)
	if err != nil {
		return err
	}
	o.mu.Lock()
	fms := append(o.fleet.machines(cluster.RoleServer, ""), o.fleet.machines(cluster.RoleClient, "")...)
	o.mu.Unlock()
	self, _ := os.Executable()
	var todo []provider.Machine
	for _, fm := range fms {
		m, ok := have[fm.Name]
		if !ok {
			return fmt.Errorf("machine %s of the cluster does not exist: run steppe up to make it again first", fm.Name)
		}
		a := statusOf(st, fm.Name)
		if a == nil || !a.Running {
			return fmt.Errorf("machine %s: its agent does not run", fm.Name)
		}
		if a.Steppe == ver && fm.Versions[agent.SteppeProduct] == ver {
			continue
		}
		// An agent replaces the file it runs from: never the operator's.
		if bin := agentBinary(ctx, m); bin != "" && (sameFile(bin, self) || sameFile(bin, o.opts.Binary)) {
			return fmt.Errorf("machine %s: its agent runs steppe from %s, the operator's own binary (the machine was started by an older steppe): stop its agent and run steppe up, which starts it from a copy of its own, then upgrade", fm.Name, bin)
		}
		todo = append(todo, m)
	}
	if len(todo) == 0 {
		o.printf("every agent of cluster %s runs steppe %s already", o.spec.Name, ver)
		return o.withFleet(func(f *fleet) { f.Versions[agent.SteppeProduct] = ver })
	}

	o.printf("==> agents, %d at a time: each verifies steppe %s, replaces its binary and re-executes itself, adopting every daemon", max(1, opts.Parallel), ver)
	servers, err := o.serverMachines(ctx)
	if err != nil {
		return err
	}
	par := max(1, opts.Parallel)
	var done []string
	for i := 0; i < len(todo); i += par {
		batch := todo[i:min(len(todo), i+par)]
		errs := make([]error, len(batch))
		var wg sync.WaitGroup
		for j, m := range batch {
			wg.Go(func() { errs[j] = o.moveSteppe(ctx, m, ver, servers) })
		}
		wg.Wait()
		for j, m := range batch {
			if errs[j] == nil {
				done = append(done, m.Name)
			}
		}
		if err := errors.Join(errs...); err != nil {
			moved := "none"
			if len(done) > 0 {
				moved = strings.Join(done, ", ")
			}
			return fmt.Errorf("upgrade -steppe stopped: %w (machines on steppe %s: %s; the others keep their steppe)", err, ver, moved)
		}
	}
	if err := o.withFleet(func(f *fleet) { f.Versions[agent.SteppeProduct] = ver }); err != nil {
		return err
	}
	o.printf("cluster %s runs steppe %s on %d machines, no daemon restarted (%s)", o.spec.Name, ver, len(fms), time.Since(start).Round(100*time.Millisecond))
	return nil
}

// ensureSteppe makes sure steppe ver is in the artifact store, verified.
// The cluster's own store gets it from source (or this binary); a store
// the spec names must hold it.
func (o *fleetOps) ensureSteppe(ctx context.Context, ver, source string) error {
	if len(o.spec.ArtifactKeys) == 0 {
		store := artifact.DefaultStoreDir(o.cacheDir)
		// A binary given is published (again: the same binary rewrites
		// nothing); without one, this binary when the store lacks ver.
		if _, err := os.Stat(filepath.Join(store, agent.SteppeProduct, ver)); err != nil || source != "" {
			if source == "" {
				self, err := os.Executable()
				if err != nil {
					return err
				}
				if agent.CheckVersion(ctx, self, ver) != nil {
					return fmt.Errorf("steppe %s is not in the artifact store %s, and this steppe is %s: give the binary (-steppe-binary FILE) or publish it (steppe artifact publish steppe@%s FILE)", ver, store, ownVersion(ctx, self), ver)
				}
				source = self
			}
			if err := agent.CheckVersion(ctx, source, ver); err != nil {
				return fmt.Errorf("steppe binary %s: %w", source, err)
			}
			pub, err := artifact.Publish(o.cacheDir, store, agent.SteppeProduct, ver, source)
			if err != nil {
				return err
			}
			o.printf("    steppe %s published from %s (sha256 %s)", ver, source, pub.ArchiveSHA256)
		}
	}
	return o.ensureArtifacts(ctx, map[string][]string{agent.SteppeProduct: {ver}})
}

func ownVersion(ctx context.Context, bin string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "version").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimPrefix(strings.TrimSpace(string(out)), "steppe ")
}

// moveSteppe moves one machine to steppe ver and checks that its agent
// came back under the same pid, with every daemon untouched.
func (o *fleetOps) moveSteppe(ctx context.Context, m provider.Machine, ver string, servers []cluster.Machine) error {
	t := o.task(m.Name, "steppe "+ver)
	start := time.Now()
	client := agent.NewClient(m.Socket)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	before, err := client.Status(sctx)
	cancel()
	if err != nil {
		err = fmt.Errorf("machine %s: agent status: %w", m.Name, err)
		t.Fail(err)
		return err
	}
	fm, _ := o.fleetMachine(m.Name)
	prev, hadPrev := fm.Versions[agent.SteppeProduct]
	setSteppe := func(v string, ok bool) error {
		return o.withFleet(func(f *fleet) {
			if fm := f.machine(m.Name); fm != nil {
				if ok {
					fm.Versions[agent.SteppeProduct] = v
				} else {
					delete(fm.Versions, agent.SteppeProduct)
				}
			}
		})
	}
	if err := setSteppe(ver, true); err != nil {
		t.Fail(err)
		return err
	}
	pub, err := o.publish(ctx, m.Name, servers)
	if err != nil {
		t.Fail(err)
		return err
	}
	t.Phase("bundle %d published, waiting for the agent on steppe %s", pub.Version, ver)
	wctx, cancel := context.WithTimeout(ctx, o.machineTimeout)
	defer cancel()
	var last agent.StatusReport
	var lastErr error
	for {
		st, err := client.Status(wctx)
		if err == nil {
			last, lastErr = st, nil
			su := st.Agent.SelfUpgrade
			// A record of this run, not one an earlier run left (the agent
			// does not try a rolled-back binary again: that one times out
			// below, saying so).
			fresh := su != nil && (before.Agent.SelfUpgrade == nil || !su.At.Equal(before.Agent.SelfUpgrade.At))
			if fresh && su.Version == ver && su.State == agent.TrialRolledBack {
				err := fmt.Errorf("machine %s: steppe %s was rolled back: %s", m.Name, ver, su.Error)
				t.Fail(err)
				return errors.Join(err, o.revertSteppe(ctx, m, servers, prev, hadPrev, setSteppe))
			}
			moved := before.Agent.Version == ver || (fresh && su.Version == ver && su.State == agent.TrialCommitted)
			if st.Agent.Version == ver && st.Bundle != nil && st.Bundle.Version >= pub.Version && moved {
				if err := untouched(m.Name, before, st); err != nil {
					t.Fail(err)
					return err
				}
				t.Done(fmt.Sprintf("    %-24s steppe %s → %s in %s: agent pid %d kept, %d daemons untouched", m.Name, before.Agent.Version, ver, time.Since(start).Round(10*time.Millisecond), st.Agent.PID, len(st.Services)))
				return nil
			}
		} else {
			lastErr = err
		}
		select {
		case <-wctx.Done():
			why := ""
			if su := last.Agent.SelfUpgrade; su != nil && su.State == agent.TrialRolledBack {
				why = fmt.Sprintf("; its last self-upgrade, to steppe %s, was rolled back at %s (%s), and a rolled-back binary is not tried again", su.Version, su.At.Format(time.RFC3339), su.Error)
			}
			err := fmt.Errorf("machine %s: its agent did not report steppe %s within %s (it reports %q; last error %v%s)\n%s", m.Name, ver, o.machineTimeout, last.Agent.Version, lastErr, why, provider.TailFile(m.Log, 20))
			t.Fail(err)
			return errors.Join(err, o.revertSteppe(ctx, m, servers, prev, hadPrev, setSteppe))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// revertSteppe publishes the machine's bundle with its previous steppe
// again, so that nothing asks for the version that failed.
func (o *fleetOps) revertSteppe(ctx context.Context, m provider.Machine, servers []cluster.Machine, prev string, hadPrev bool, set func(string, bool) error) error {
	if err := set(prev, hadPrev); err != nil {
		return err
	}
	pub, err := o.publish(ctx, m.Name, servers)
	if err != nil {
		return fmt.Errorf("machine %s: publish its previous steppe again: %w", m.Name, err)
	}
	wctx, cancel := context.WithTimeout(ctx, o.machineTimeout)
	defer cancel()
	return o.waitMachine(wctx, m, pub.Version)
}

// untouched fails naming the daemon a self-upgrade restarted, or the
// agent whose pid changed.
func untouched(name string, before, after agent.StatusReport) error {
	if before.Agent.PID != after.Agent.PID {
		return fmt.Errorf("machine %s: the agent's pid changed from %d to %d", name, before.Agent.PID, after.Agent.PID)
	}
	var bad []string
	for _, b := range before.Services {
		i := slices.IndexFunc(after.Services, func(s supervise.Status) bool { return s.Name == b.Name })
		if i < 0 {
			bad = append(bad, b.Name+" is gone")
			continue
		}
		a := after.Services[i]
		if a.PID != b.PID || a.Restarts != b.Restarts {
			bad = append(bad, fmt.Sprintf("%s restarted (pid %d → %d, restarts %d → %d)", b.Name, b.PID, a.PID, b.Restarts, a.Restarts))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("machine %s: the self-upgrade touched daemons: %s", name, strings.Join(bad, "; "))
	}
	return nil
}

func statusOf(st *Status, machine string) *AgentStatus {
	for i := range st.Agents {
		if st.Agents[i].Machine == machine {
			return &st.Agents[i]
		}
	}
	return nil
}

// agentBinary is the file the machine's agent says it runs from.
func agentBinary(ctx context.Context, m provider.Machine) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := agent.NewClient(m.Socket).Status(ctx)
	if err != nil {
		return ""
	}
	return st.Agent.Binary
}

func sameFile(a, b string) bool {
	sa, err := os.Stat(a)
	if err != nil {
		return false
	}
	sb, err := os.Stat(b)
	return err == nil && os.SameFile(sa, sb)
}
