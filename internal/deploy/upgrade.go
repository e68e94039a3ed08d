package deploy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/upgrade"
)

// UpgradeOptions are Options plus what `steppe upgrade` is asked.
type UpgradeOptions struct {
	Options
	// Target maps products to versions ("nomad" → "1.10.5"). Empty means
	// the spec's versions where they differ from the cluster's, or, when
	// an upgrade was interrupted, its target.
	Target map[string]string
	// Force skips the version policy (downgrades, jumps of more than one
	// minor version); never the health checks.
	Force   bool
	Clients upgrade.ClientStrategy
	// Gate is what each server must show before the next is touched.
	Gate upgrade.Gate
	// MachineTimeout bounds how long a machine may take to run a new
	// release healthy; 0 means 5 minutes.
	MachineTimeout time.Duration
}

// Upgrade rolls the cluster to new Consul and Nomad versions, one
// machine at a time behind health gates (internal/upgrade), each machine
// moved by publishing its own bundle on the new versions. Killed, it
// resumes where it stopped when run again.
func Upgrade(ctx context.Context, opts UpgradeOptions) (*upgrade.State, error) {
	start := time.Now()
	o, release, err := openFleet(opts.Options, "upgrade", opts.MachineTimeout)
	if err != nil {
		return nil, err
	}
	defer release()
	target, err := o.upgradeTarget(opts.Target)
	if err != nil {
		return nil, err
	}
	o.printf("steppe upgrade: cluster %s to %s (state %s)", o.spec.Name, upgrade.DescribeVersions(target), o.stateDir)
	o.printf("==> artifacts")
	need := map[string][]string{}
	for p, v := range target {
		need[p] = []string{v}
	}
	if err := o.ensureArtifacts(ctx, need); err != nil {
		return nil, err
	}
	servers, clients, err := o.upgradeMachines(ctx)
	if err != nil {
		return nil, err
	}
	steps := newStepTasks(o.env)
	cfg := upgrade.Config{
		StateDir:       o.stateDir,
		Target:         target,
		Servers:        servers,
		Clients:        clients,
		Force:          opts.Force,
		APIs:           o,
		Machines:       o,
		Pools:          o,
		Artifacts:      o,
		Unsealer:       o,
		Gate:           opts.Gate,
		ClientStrategy: opts.Clients,
		Progress:       steps.event,
		Log:            slog.New(slog.DiscardHandler),
	}
	u, err := upgrade.New(cfg)
	if err != nil {
		return nil, err
	}
	if prev, err := pendingUpgrade(o.stateDir); err == nil && prev != nil && maps.Equal(prev.Target, target) {
		done := 0
		for _, s := range prev.Steps {
			if s.Status == upgrade.StatusDone {
				done++
			}
		}
		o.printf("resuming the upgrade to %s where it stopped: %d of %d steps done", upgrade.DescribeVersions(target), done, len(prev.Steps))
	}
	o.printf("==> preflight, snapshots, servers one at a time (Consul, Nomad, Vault; the leader last), then clients")
	st, err := u.Run(ctx)
	steps.end(err)
	if st != nil {
		writeUpgradeReport(o.out, st, time.Since(start))
	}
	if err != nil {
		return st, fmt.Errorf("upgrade: %w", err)
	}
	if err := o.withFleet(func(f *fleet) { maps.Copy(f.Versions, target) }); err != nil {
		return st, err
	}
	o.printf("cluster %s runs %s (%s)", o.spec.Name, upgrade.DescribeVersions(target), time.Since(start).Round(100*time.Millisecond))
	return st, nil
}

// openFleet opens an established cluster for a command that changes it,
// under the cluster's lock.
func openFleet(opts Options, what string, machineTimeout time.Duration) (*fleetOps, func(), error) {
	e, err := open(opts)
	if err != nil {
		return nil, nil, err
	}
	if err := e.needState(); err != nil {
		return nil, nil, err
	}
	release, err := lockState(e.stateDir, what)
	if err != nil {
		return nil, nil, err
	}
	f, err := loadFleet(e.stateDir)
	if err == nil && (f == nil || !f.Established) {
		err = fmt.Errorf("cluster %s has not come up healthy yet: run steppe up first", e.spec.Name)
	}
	if err != nil {
		release()
		return nil, nil, err
	}
	if machineTimeout == 0 {
		machineTimeout = 5 * time.Minute
	}
	o := &fleetOps{env: e, machineTimeout: machineTimeout, fleet: f}
	if err := o.loadSecrets(); err != nil {
		release()
		return nil, nil, err
	}
	return o, release, nil
}

// upgradeTarget is what to upgrade to: as asked; else an interrupted
// upgrade's target; else the spec's versions that differ from the
// cluster's.
func (o *fleetOps) upgradeTarget(asked map[string]string) (map[string]string, error) {
	for p := range asked {
		switch p {
		case cluster.ConsulProduct, cluster.NomadProduct:
		case cluster.VaultProduct:
			if o.spec.Versions.Vault == "" {
				return nil, fmt.Errorf("vault: cluster %s runs no Vault (its spec has vault { enabled = false }), so there is none to upgrade", o.spec.Name)
			}
		default:
			return nil, fmt.Errorf("cannot upgrade %q (consul, nomad and vault can be)", p)
		}
	}
	if len(asked) > 0 {
		return maps.Clone(asked), nil
	}
	prev, err := upgrade.LoadState(o.stateDir)
	if err != nil {
		return nil, err
	}
	if prev != nil && !prev.Done {
		o.printf("resuming the interrupted upgrade to %s", upgrade.DescribeVersions(prev.Target))
		return maps.Clone(prev.Target), nil
	}
	target := map[string]string{}
	for p, v := range specVersions(o.spec) {
		if o.fleet.Versions[p] != v {
			target[p] = v
		}
	}
	if len(target) == 0 {
		return nil, fmt.Errorf("nothing to upgrade: cluster %s runs %s, as its spec says (give -nomad V and/or -consul V, or change the spec's versions)", o.spec.Name, upgrade.DescribeVersions(o.fleet.Versions))
	}
	return target, nil
}

// upgradeMachines are the fleet's servers and clients with their
// addresses. A surge's replacement in flight is not a client to upgrade:
// the interrupted upgrade's record knows it.
func (o *fleetOps) upgradeMachines(ctx context.Context) ([]upgrade.Server, []upgrade.Client, error) {
	have, err := o.provisioned(ctx)
	if err != nil {
		return nil, nil, err
	}
	o.mu.Lock()
	fs, fc := o.fleet.machines(cluster.RoleServer, ""), o.fleet.machines(cluster.RoleClient, "")
	o.mu.Unlock()
	addr := func(m fleetMachine) (provider.Machine, error) {
		pm, ok := have[m.Name]
		if !ok {
			return pm, fmt.Errorf("machine %s of the cluster does not exist: run steppe up to make it again first", m.Name)
		}
		return pm, nil
	}
	var servers []upgrade.Server
	var clients []upgrade.Client
	for _, m := range fs {
		pm, err := addr(m)
		if err != nil {
			return nil, nil, err
		}
		servers = append(servers, upgrade.Server{Machine: m.Name, Address: pm.Address})
	}
	for _, m := range fc {
		if m.Replaces != "" {
			continue
		}
		pm, err := addr(m)
		if err != nil {
			return nil, nil, err
		}
		clients = append(clients, upgrade.Client{Machine: m.Name, Address: pm.Address, Pool: m.Pool})
	}
	return servers, clients, nil
}

// writeUpgradeReport prints, per step, what it did: from → to, how long,
// allocations drained, and its phases.
func writeUpgradeReport(w io.Writer, st *upgrade.State, total time.Duration) {
	fmt.Fprintf(w, "\nupgrade report (%s → %s), %s so far:\n", upgrade.DescribeVersions(st.From), upgrade.DescribeVersions(st.Target), total.Round(100*time.Millisecond))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tSTATUS\tFROM\tTO\tTOOK\tDRAINED\tPHASES")
	byPhase := map[string]float64{}
	var phaseOrder []string
	for _, s := range st.Steps {
		var ps []string
		for _, p := range s.Phases {
			ps = append(ps, fmt.Sprintf("%s %.1fs", p.Name, p.Seconds))
			if _, ok := byPhase[p.Name]; !ok {
				phaseOrder = append(phaseOrder, p.Name)
			}
			byPhase[p.Name] += p.Seconds
		}
		note := strings.Join(ps, ", ")
		if s.Note != "" {
			note += " (" + s.Note + ")"
		}
		if s.Error != "" {
			note += " error: " + s.Error
		}
		drained := "-"
		if s.Kind == upgrade.KindClient {
			drained = fmt.Sprint(s.Drained)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.Status, dash(s.From), dash(s.To), s.Duration().Round(100*time.Millisecond), drained, note)
	}
	tw.Flush()
	var sums []string
	for _, p := range phaseOrder {
		sums = append(sums, fmt.Sprintf("%s %.1fs", p, byPhase[p]))
	}
	if len(sums) > 0 {
		fmt.Fprintf(w, "time by phase: %s\n", strings.Join(sums, ", "))
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// pending is the upgrade a state directory has not finished, nil if none.
func pendingUpgrade(stateDir string) (*upgrade.State, error) {
	st, err := upgrade.LoadState(stateDir)
	if err != nil || st == nil || st.Done {
		return nil, err
	}
	return st, nil
}
