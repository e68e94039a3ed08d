package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/upgrade"
)

// UpOptions are Options plus the deadlines of `up`.
type UpOptions struct {
	Options
	// Timeout bounds the whole of up; 0 means 15 minutes (a cold build of
	// the binaries is not counted: it has its own progress).
	Timeout time.Duration
	// MachineTimeout bounds how long a machine may take to run its
	// release healthy; 0 means 5 minutes.
	MachineTimeout time.Duration
}

// Phase is one step of up and how long it took.
type Phase struct {
	Name string        `json:"name"`
	Took time.Duration `json:"took"`
}

// UpResult is what up did.
type UpResult struct {
	Cluster  string             `json:"cluster"`
	StateDir string             `json:"state_dir"`
	Machines []provider.Machine `json:"machines"`
	Phases   []Phase            `json:"phases"`
	Total    time.Duration      `json:"total"`
	// Started are the machines whose agents this run started; empty when
	// the cluster was already up.
	Started []string `json:"started"`
	// Published are the roles whose bundle this run published.
	Published []string `json:"published"`
}

// Up creates or converges the cluster: artifacts, secrets, machines,
// bundles, then Consul and Nomad ACLs and workload identity, waiting for
// each to be healthy. Run again, it changes nothing that is as it should
// be.
func Up(ctx context.Context, opts UpOptions) (*UpResult, error) {
	e, err := open(opts.Options)
	if err != nil {
		return nil, err
	}
	if opts.Timeout == 0 {
		opts.Timeout = 15 * time.Minute
	}
	if opts.MachineTimeout == 0 {
		opts.MachineTimeout = 5 * time.Minute
	}
	// The state directory is marked as a cluster's before anything goes
	// in it, so that down may remove whatever an up cut short left; a
	// directory that holds something else is not taken over.
	if !e.exists() {
		if ents, err := os.ReadDir(e.stateDir); err == nil && len(ents) > 0 {
			return nil, fmt.Errorf("state directory %s is not empty and is not a steppe cluster's (no %s): give another with -state", e.stateDir, markerFile)
		}
	}
	release, err := lockState(e.stateDir, "up")
	if err != nil {
		return nil, err
	}
	defer release()
	if err := os.WriteFile(filepath.Join(e.stateDir, markerFile), []byte("a steppe cluster's state directory; steppe down removes it\n"), 0o600); err != nil {
		return nil, err
	}
	if st, err := pendingUpgrade(e.stateDir); err != nil {
		return nil, err
	} else if st != nil {
		return nil, fmt.Errorf("an upgrade to %s is in progress: run steppe upgrade to finish it first (%s)", upgrade.DescribeVersions(st.Target), filepath.Join(e.stateDir, upgrade.StateFile))
	}
	f, err := loadFleet(e.stateDir)
	if err != nil {
		return nil, err
	}
	var drift []string
	if f == nil || !f.Established {
		// Until the cluster has come up once, the spec alone says what it is.
		f = newFleet(e.spec)
	} else {
		drift = f.reconcile(e.spec)
	}
	u := &upRun{
		fleetOps: &fleetOps{env: e, machineTimeout: opts.MachineTimeout, fleet: f},
		opts:     opts,
		res:      &UpResult{Cluster: e.spec.Name, StateDir: e.stateDir},
	}
	start := time.Now()
	for _, w := range e.spec.Warnings {
		e.printf("warning: %s", w)
	}
	e.printf("steppe up: cluster %s (%d servers, %d clients, nomad %s, consul %s) in %s",
		e.spec.Name, len(f.machines(cluster.RoleServer, "")), len(f.machines(cluster.RoleClient, "")), f.Versions[cluster.NomadProduct], f.Versions[cluster.ConsulProduct], e.stateDir)
	for _, w := range drift {
		e.printf("note: %s", w)
	}

	// The binaries first, outside the deadline: a cold build takes minutes
	// and reports its own progress.
	if err := u.phase("artifacts", func(ctx context.Context) error { return u.ensureArtifacts(ctx, fleetVersions(f)) }, ctx); err != nil {
		return u.res, err
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	type step struct {
		name string
		f    func(context.Context) error
	}
	steps := []step{
		{"secrets", u.secrets},
		{"machines", u.createMachines},
		{"bundles", u.publishBundles},
		{"agents healthy", u.agentsHealthy},
		{"consul ACLs", u.consulACL},
		{"nomad ACLs", u.nomadACL},
		{"workload identity", u.workloadIdentity},
		{"nomad clients ready", u.clientsReady},
	}
	if e.spec.Versions.Vault != "" {
		steps = slices.Insert(steps, 4, step{"vault", u.vault})
		steps = slices.Insert(steps, 8, step{"vault setup", u.vaultSetup})
	}
	for _, s := range steps {
		if err := u.phase(s.name, s.f, ctx); err != nil {
			return u.res, err
		}
	}
	if err := u.withFleet(func(f *fleet) { f.Established = true }); err != nil {
		return u.res, err
	}
	u.res.Total = time.Since(start)
	if ms, err := e.local.List(ctx); err == nil {
		u.res.Machines = ms
	}
	u.summary()
	return u.res, nil
}

// upRun is one run of Up.
type upRun struct {
	*fleetOps
	opts UpOptions
	res  *UpResult

	machines []provider.Machine // of the fleet, servers first
	versions map[string]uint64  // machine -> published bundle version

	consul *consulapi.Client // management
	nomad  *nomadapi.Client  // management
	leader string
}

func (u *upRun) phase(name string, f func(context.Context) error, ctx context.Context) error {
	t := time.Now()
	u.printf("==> %s", name)
	task := u.task("steppe up", name)
	err := f(ctx)
	took := time.Since(t)
	u.res.Phases = append(u.res.Phases, Phase{Name: name, Took: took})
	if err != nil {
		task.Fail(err)
		return fmt.Errorf("%s: %w", name, err)
	}
	task.Done(fmt.Sprintf("    %s: %s", name, took.Round(10*time.Millisecond)))
	return nil
}

// indent prefixes every line written through it.
type indent struct {
	w      io.Writer
	prefix string
}

func (i indent) Write(p []byte) (int, error) {
	for _, l := range strings.SplitAfter(string(p), "\n") {
		if l == "" {
			continue
		}
		if _, err := io.WriteString(i.w, i.prefix+l); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (u *upRun) secrets(ctx context.Context) error {
	if _, err := cluster.OpenState(u.stateDir); err != nil {
		return err
	}
	if u.opts.SpecPath != "" {
		if err := os.WriteFile(filepath.Join(u.stateDir, specCopy), u.specSrc, 0o600); err != nil {
			return err
		}
	}
	if err := u.loadSecrets(); err != nil {
		return err
	}
	if err := u.storeVaultTransit(); err != nil {
		return err
	}
	if err := u.saveFleet(); err != nil {
		return err
	}
	u.printf("    CA, gossip keys, tokens and bundle signing key in %s (0700)", u.stateDir)
	return nil
}

func (u *upRun) createMachines(ctx context.Context) error {
	u.mu.Lock()
	want := u.fleet.list()
	u.mu.Unlock()
	existing, err := u.local.List(ctx)
	if err != nil {
		return err
	}
	for _, m := range existing {
		if !slices.ContainsFunc(want, func(w cluster.Machine) bool { return w.Name == m.Name }) {
			u.printf("    warning: machine %s is not in the cluster's fleet and is left as it is", m.Name)
		}
	}
	made, err := u.create(ctx, want)
	if err != nil {
		return err
	}
	u.machines = made
	for _, pm := range made {
		how := "running"
		if pm.SecretsChanged {
			how = "running, new secrets"
		}
		if !slices.ContainsFunc(existing, func(x provider.Machine) bool { return x.Name == pm.Name && x.Running }) {
			how = "started"
			u.res.Started = append(u.res.Started, pm.Name)
		}
		u.printf("    %-24s %-15s %-16s agent pid %d (%s)", pm.Name, pm.Address, cluster.RoleName(pm.Cluster()), pm.PID, how)
	}
	return u.restartForSecrets(ctx)
}

// restartForSecrets has the daemons of running machines whose secrets
// changed (a certificate reissued for a new address or after expiry)
// load them as steppe rotate does: a reload, one machine at a time, each
// serving its new certificate (and servers healthy) before the next. No
// restart, so no server goes down without the upgrade gates.
func (u *upRun) restartForSecrets(ctx context.Context) error {
	for _, m := range u.machines {
		if !m.SecretsChanged {
			continue
		}
		if err := u.reloadSecrets(ctx, m); err != nil {
			return err
		}
		u.printf("    %-24s consul and nomad reloaded their new secrets", m.Name)
	}
	return nil
}

func (u *upRun) servers() []cluster.Machine {
	var out []cluster.Machine
	for _, m := range u.machines {
		if m.Role == cluster.RoleServer {
			out = append(out, m.Cluster())
		}
	}
	return out
}

func (u *upRun) publishBundles(ctx context.Context) error {
	u.versions = map[string]uint64{}
	for _, m := range u.machines {
		pub, err := u.publish(ctx, m.Name, u.servers())
		if err != nil {
			return err
		}
		u.versions[m.Name] = pub.Version
		if pub.Changed {
			u.res.Published = append(u.res.Published, m.Name)
			u.printf("    %-24s version %d published (signed)", m.Name, pub.Version)
		} else {
			u.printf("    %-24s version %d unchanged", m.Name, pub.Version)
		}
	}
	return nil
}

// agentsHealthy waits until every machine runs its published release
// with every service ready.
func (u *upRun) agentsHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, u.opts.MachineTimeout)
	defer cancel()
	errs := make([]error, len(u.machines))
	var wg sync.WaitGroup
	for i, m := range u.machines {
		wg.Go(func() { errs[i] = u.waitMachine(ctx, m, u.versions[m.Name]) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func machineHealthy(st agent.StatusReport, version uint64) bool {
	if st.Bundle == nil || st.Bundle.Version < version || st.Bundle.Pending != 0 || len(st.Services) == 0 {
		return false
	}
	for _, s := range st.Services {
		if !s.Ready {
			return false
		}
	}
	return true
}

// failingCheck says what a machine is waiting for.
func failingCheck(st agent.StatusReport, err error, version uint64) string {
	if err != nil {
		return "its agent does not answer: " + err.Error()
	}
	var why []string
	switch b := st.Bundle; {
	case b == nil:
		why = append(why, "the agent pulls no bundle")
	case b.Version < version:
		s := fmt.Sprintf("runs release %d, not %d", b.Version, version)
		if b.LastError != "" {
			s += " (last error: " + b.LastError + ")"
		}
		if b.FailedError != "" {
			s += fmt.Sprintf(" (release %d failed: %s)", b.Failed, b.FailedError)
		}
		why = append(why, s)
	}
	for _, s := range st.Services {
		if !s.Ready {
			w := fmt.Sprintf("service %s is %s, not ready", s.Name, s.State)
			if s.LastError != "" {
				w += ": " + s.LastError
			} else if s.LastExit != "" {
				w += " (last exit " + s.LastExit + ")"
			}
			why = append(why, w)
		}
	}
	if len(why) == 0 {
		return "no service ready yet"
	}
	return strings.Join(why, "; ")
}

// machineLogs is the end of a machine's agent log and of the log of each
// service that is not ready.
func machineLogs(m provider.Machine, st agent.StatusReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "--- %s: agent log (%s), last lines ---\n%s\n", m.Name, m.Log, provider.TailFile(m.Log, 10))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range st.Services {
		if s.Ready {
			continue
		}
		lines, err := agent.NewClient(m.Socket).Logs(ctx, s.Name, 15)
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "--- %s: %s log, last lines ---\n%s\n", m.Name, s.Name, strings.Join(lines, "\n"))
	}
	return b.String()
}

// serviceLogs is the end of one service's log on each of ms.
func serviceLogs(ms []provider.Machine, service string, n int) string {
	var b strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, m := range ms {
		lines, err := agent.NewClient(m.Socket).Logs(ctx, service, n)
		if err != nil {
			fmt.Fprintf(&b, "--- %s: %s log: %v\n", m.Name, service, err)
			continue
		}
		fmt.Fprintf(&b, "--- %s: %s log, last lines ---\n%s\n", m.Name, service, strings.Join(lines, "\n"))
	}
	return b.String()
}

func (u *upRun) serverMachines() []provider.Machine {
	var out []provider.Machine
	for _, m := range u.machines {
		if m.Role == cluster.RoleServer {
			out = append(out, m)
		}
	}
	return out
}

func (u *upRun) consulACL(ctx context.Context) error {
	srv := u.servers()
	anon, err := hashi.ConsulClient(fmt.Sprintf("%s:%d", srv[0].Address, cluster.ConsulHTTPSPort), u.opFiles, "")
	if err != nil {
		return err
	}
	leader, err := hashi.WaitConsulLeader(ctx, anon)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, serviceLogs(u.serverMachines(), "consul", 10))
	}
	mgmt, err := hashi.BootstrapConsulACL(ctx, anon, u.st)
	if err != nil {
		return err
	}
	if u.consul, err = hashi.ConsulClient(fmt.Sprintf("%s:%d", srv[0].Address, cluster.ConsulHTTPSPort), u.opFiles, mgmt); err != nil {
		return err
	}
	var ms []cluster.Machine
	for _, m := range u.machines {
		ms = append(ms, m.Cluster())
	}
	plan, err := cluster.ConsulACL(u.spec, u.st, ms)
	if err != nil {
		return err
	}
	if err := hashi.ApplyConsulACL(ctx, u.consul, plan); err != nil {
		return err
	}
	u.printf("    leader %s; ACLs default-deny, %d policies and %d tokens as planned", leader, len(plan.Policies), len(plan.Tokens))
	return nil
}

func (u *upRun) nomadACL(ctx context.Context) error {
	srv := u.servers()
	addr := fmt.Sprintf("%s:%d", srv[0].Address, cluster.NomadHTTPPort)
	anon, err := hashi.NomadClient(addr, u.opFiles, "")
	if err != nil {
		return err
	}
	if u.leader, err = hashi.WaitNomadLeader(ctx, anon); err != nil {
		return fmt.Errorf("%w\n%s", err, serviceLogs(u.serverMachines(), "nomad", 10))
	}
	mgmt, err := hashi.BootstrapNomadACL(ctx, anon, u.st)
	if err != nil {
		return err
	}
	if u.nomad, err = hashi.NomadClient(addr, u.opFiles, mgmt); err != nil {
		return err
	}
	if err := hashi.WaitNomadToken(ctx, u.nomad); err != nil {
		return err
	}
	if _, err := hashi.WaitNomadHealthy(ctx, u.nomad, len(srv)); err != nil {
		return fmt.Errorf("%w\n%s", err, serviceLogs(u.serverMachines(), "nomad", 10))
	}
	var pools []string
	for _, p := range u.spec.Pools {
		pools = append(pools, p.Name)
	}
	if err := hashi.EnsureNodePools(ctx, u.nomad, pools); err != nil {
		return err
	}
	u.printf("    leader %s; %d healthy voting servers; ACLs bootstrapped", u.leader, len(srv))
	return nil
}

func (u *upRun) workloadIdentity(ctx context.Context) error {
	if err := hashi.SetupConsulWorkloadIdentity(ctx, u.consul, u.nomad, u.st.CACertPEM(), []string{"default"}); err != nil {
		return err
	}
	u.printf("    Consul trusts Nomad's workload identities (auth method %s)", hashi.ConsulAuthMethod)
	return nil
}

func (u *upRun) clientsReady(ctx context.Context) error {
	n := len(u.machines) - len(u.servers())
	nodes, err := hashi.WaitNomadClients(ctx, u.nomad, n)
	if err != nil {
		var clients []provider.Machine
		for _, m := range u.machines {
			if m.Role == cluster.RoleClient {
				clients = append(clients, m)
			}
		}
		return fmt.Errorf("%w\n%s", err, serviceLogs(clients, "nomad", 10))
	}
	for _, nd := range nodes {
		u.printf("    %-24s %s, eligible", nd.Name, nd.Status)
	}
	return nil
}

func (u *upRun) summary() {
	var b bytes.Buffer
	fmt.Fprintf(&b, "\ncluster %s is up in %s: %d Nomad servers (leader %s), %d Nomad clients ready, Consul on all %d machines, ACLs and TLS everywhere\n",
		u.spec.Name, u.res.Total.Round(100*time.Millisecond), len(u.servers()), u.leader, len(u.machines)-len(u.servers()), len(u.machines))
	var phases []string
	for _, p := range u.res.Phases {
		phases = append(phases, fmt.Sprintf("%s %s", p.Name, p.Took.Round(10*time.Millisecond)))
	}
	fmt.Fprintf(&b, "phases: %s\n", strings.Join(phases, ", "))
	flag := ""
	if u.opts.StateDir != "" {
		flag = " -state " + u.stateDir
	}
	fmt.Fprintf(&b, "\nuse the real CLIs:\n  eval \"$(steppe env%s)\"\n  nomad server members\n  nomad node status\n  consul members\n", flag)
	fmt.Fprintf(&b, "and: steppe status%s, steppe down%s\n", flag, flag)
	if srv := u.servers(); len(srv) > 0 {
		// The UIs need no client certificate; a browser must trust the
		// cluster's CA, and each UI asks for a token (steppe env has them).
		fmt.Fprintf(&b, "\nthe web UIs (log in with NOMAD_TOKEN and CONSUL_HTTP_TOKEN from steppe env):\n  Nomad   https://%s:%d/ui/\n  Consul  https://%s:%d/ui/\n",
			srv[0].Address, cluster.NomadHTTPPort, srv[0].Address, cluster.ConsulHTTPSPort)
		fmt.Fprintf(&b, "trust the cluster CA %s in the browser first, for example:\n  certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n steppe-%s -i %s\n", u.st.CAFile(), u.spec.Name, u.st.CAFile())
	}
	u.out.Write(b.Bytes())
}
