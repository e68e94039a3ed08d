// Package hashitest runs a real, secured Consul and Nomad cluster for
// tests: the machines of a cluster.Plan, rendered as an agent would, each
// machine's daemons under a real supervise.Supervisor of its own, on its
// own loopback address. It exists so that packages above hashi (upgrade)
// test against real binaries; it is imported only by tests.
package hashitest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/render"
	"github.com/steppe/steppe/internal/testenv"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/supervise"
)

// Binary finds a daemon built into the artifact cache. Outside CI a
// missing binary skips the test with the reason; in CI (which builds them
// first with `make artifacts`) it fails.
func Binary(t testing.TB, product, version string) string {
	t.Helper()
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	p, err := artifact.BinaryPath(cache, product, version)
	if err != nil {
		testenv.Lacks(t, "%v", err)
	}
	return p
}

// Addrs returns n loopback addresses in a /24 of 127/8 picked at random,
// so that concurrent test runs (several engineers, go test ./...) do not
// collide on ports.
func Addrs(n int) []string {
	a, b := 2+rand.IntN(250), 1+rand.IntN(254)
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("127.%d.%d.%d", a, b, 10+i)
	}
	return out
}

// Cluster is a planned cluster whose machines run on this host.
type Cluster struct {
	t        testing.TB
	Spec     *cluster.Spec
	State    *cluster.State
	Op       hashi.TLSFiles // the operator's certificate
	Machines []*Machine     // servers first, as Spec.MachineList
	Servers  []cluster.Machine
	root     string
	cgParent string
	// nomadCgroups are the cgroups below Nomad's parents that existed
	// before the cluster: the ones created since are its clients'.
	nomadCgroups []string
}

// Machine is one machine: its rendered files and secrets, and a
// supervisor running its daemons.
type Machine struct {
	cluster.Machine
	Dir      string // root of its directories
	plan     cluster.RolePlan
	tags     map[string]string
	sup      *supervise.Supervisor
	binaries map[string]string // product → binary path
	running  []string          // services applied, in plan order
}

// New plans spec with the machines at addrs (one per machine of
// spec.MachineList, servers first), renders every machine's files and
// writes its secrets. Nothing runs yet: see Start. Everything the
// cluster starts is stopped, and its cgroups removed, at the test's end.
func New(t testing.TB, spec *cluster.Spec, addrs []string) *Cluster {
	t.Helper()
	ms := spec.MachineList()
	if len(addrs) != len(ms) {
		t.Fatalf("hashitest: %d addresses for %d machines", len(addrs), len(ms))
	}
	for i := range ms {
		ms[i].Address = addrs[i]
	}
	st, err := cluster.OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	op, err := st.OperatorCert()
	if err != nil {
		t.Fatal(err)
	}
	c := &Cluster{t: t, Spec: spec, State: st, Servers: ms[:spec.Servers.Count],
		Op: hashi.TLSFiles{CAFile: st.CAFile(), CertFile: op.CertFile, KeyFile: op.KeyFile}}
	// Notify sockets live below the supervisor's state directory, whose
	// path must stay short (108 bytes for a unix socket).
	c.root, err = os.MkdirTemp("", "ht")
	if err != nil {
		t.Fatal(err)
	}
	c.cgParent = fmt.Sprintf("steppe-test/hashitest-%d", rand.IntN(1e9))
	c.nomadCgroups = nomadCgroups()
	t.Cleanup(c.cleanup)
	plans, err := cluster.Plan(spec, c.Servers)
	if err != nil {
		t.Fatal(err)
	}
	planOf := map[string]cluster.RolePlan{}
	for _, p := range plans {
		planOf[p.Role] = p
	}
	for i, m := range ms {
		mc := &Machine{Machine: m, Dir: filepath.Join(c.root, fmt.Sprint(i)), plan: planOf[cluster.RoleName(m)], binaries: map[string]string{}}
		c.install(mc)
		c.Machines = append(c.Machines, mc)
	}
	return c
}

func (c *Cluster) install(m *Machine) {
	t := c.t
	bundle, data, secrets := filepath.Join(m.Dir, "b"), filepath.Join(m.Dir, "d"), filepath.Join(m.Dir, "s")
	for _, p := range []string{bundle, data, secrets} {
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	m.tags = map[string]string{cluster.TagDataDir: data, cluster.TagSecretsDir: secrets, cluster.TagConfigDir: bundle}
	for name, src := range m.plan.Files {
		if err := os.WriteFile(filepath.Join(bundle, strings.TrimSuffix(name, ".tmpl")), []byte(m.render(t, name, string(src))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sec, err := cluster.MachineSecrets(c.Spec, c.State, m.Machine, secrets)
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range sec {
		if err := os.WriteFile(filepath.Join(secrets, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// render renders a planned template through the agent's own renderer (its
// allow-list of functions included), as the agent would.
func (m *Machine) render(t testing.TB, name, src string) string {
	t.Helper()
	b, err := render.Execute(name, src, render.Facts{Name: m.Name, Address: m.Address, Tags: m.tags}, m.plan.Vars)
	if err != nil {
		t.Fatalf("template %s: %v", name, err)
	}
	return string(b)
}

// spec turns the plan's service into the supervisor's, as the agent does.
func (m *Machine) spec(t testing.TB, def cluster.ServiceDef) supervise.Spec {
	bin, ok := m.binaries[def.Artifact]
	if !ok {
		t.Fatalf("machine %s: no binary for %s", m.Name, def.Artifact)
	}
	s := supervise.Spec{
		Name: def.Name, Command: bin, Env: append(slices.Clone(def.Env), "HOME="+m.Dir, "PATH=/usr/bin:/bin"),
		After:      slices.DeleteFunc(slices.Clone(def.After), func(a string) bool { return !slices.Contains(m.running, a) }),
		StopSignal: def.StopSignal, StopTimeout: def.StopTimeout, StopMode: supervise.StopMode(def.StopMode),
		ReloadSignal: def.ReloadSignal, Restart: supervise.RestartPolicy(def.Restart),
		BackoffMin: 200 * time.Millisecond,
	}
	for i, a := range def.Args {
		s.Args = append(s.Args, m.render(t, fmt.Sprintf("%s-arg%d", def.Name, i), a))
	}
	if r := def.Ready; r != nil {
		s.Ready = &supervise.Readiness{Notify: r.Notify, TCP: r.TCP, HTTP: r.HTTP, Command: r.Command, Timeout: r.Timeout, Interval: r.Interval}
	}
	return s
}

func (m *Machine) apply(ctx context.Context, t testing.TB) error {
	var specs []supervise.Spec
	for _, def := range m.plan.Services {
		if slices.Contains(m.running, def.Name) {
			specs = append(specs, m.spec(t, def))
		}
	}
	return m.sup.Apply(ctx, specs)
}

// Start starts the named services of machine m with the given binary of
// their product (product → path; nil keeps the binaries it ran), under
// m's supervisor, and waits until they are ready.
func (c *Cluster) Start(ctx context.Context, m *Machine, binaries map[string]string, services ...string) error {
	t := c.t
	if m.sup == nil {
		sup, err := supervise.New(ctx, supervise.Options{StateDir: filepath.Join(m.Dir, "sv"), CgroupParent: c.cgParent + "/" + m.Name})
		if err != nil {
			return fmt.Errorf("supervisor of %s: %w", m.Name, err)
		}
		m.sup = sup
	}
	for p, b := range binaries {
		m.binaries[p] = b
	}
	for _, s := range services {
		if !slices.Contains(m.running, s) {
			m.running = append(m.running, s)
		}
	}
	if err := m.apply(ctx, t); err != nil {
		return fmt.Errorf("start %v on %s: %w", services, m.Name, err)
	}
	// Apply leaves a service that was stopped (Stop) stopped.
	for _, s := range services {
		if err := m.sup.Start(ctx, s); err != nil {
			return fmt.Errorf("start %s on %s: %w", s, m.Name, err)
		}
	}
	if err := m.sup.WaitReady(ctx, services...); err != nil {
		return fmt.Errorf("%s: %w\n%s", m.Name, err, m.Logs(services...))
	}
	return nil
}

// StartAll starts the named services on the machines ms at once (as
// Start does for one), since Consul's servers are ready only once they
// found each other, and waits until all are ready.
func (c *Cluster) StartAll(ctx context.Context, ms []*Machine, binaries map[string]string, services ...string) error {
	errs := make(chan error, len(ms))
	for _, m := range ms {
		go func() { errs <- c.Start(ctx, m, binaries, services...) }()
	}
	var first error
	for range ms {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// SetBinary swaps product's binary on m: the supervisor restarts the
// service with the new command (a real restart on the real binary, as an
// agent's new bundle would cause), and SetBinary waits until the new
// process is ready.
func (c *Cluster) SetBinary(ctx context.Context, m *Machine, product, path string) error {
	if m.binaries[product] == path {
		return nil
	}
	m.binaries[product] = path
	var svc string
	for _, def := range m.plan.Services {
		if def.Artifact == product && slices.Contains(m.running, def.Name) {
			svc = def.Name
		}
	}
	if svc == "" {
		return nil
	}
	before := m.status(svc)
	if err := m.apply(ctx, c.t); err != nil {
		return fmt.Errorf("restart %s on %s with %s: %w", svc, m.Name, path, err)
	}
	for {
		st := m.status(svc)
		if st.PID != 0 && st.PID != before.PID && st.Ready {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s on %s: not ready on %s: %w (state %s, last error %q)\n%s", svc, m.Name, path, ctx.Err(), st.State, st.LastError, m.Logs(svc))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Binary is the binary m runs for product.
func (m *Machine) Binary(product string) string { return m.binaries[product] }

// Stop stops a service of m (the supervisor will not restart it).
func (c *Cluster) Stop(ctx context.Context, m *Machine, service string) error {
	return m.sup.Stop(ctx, service)
}

func (m *Machine) status(svc string) supervise.Status {
	for _, s := range m.sup.Status() {
		if s.Name == svc {
			return s
		}
	}
	return supervise.Status{}
}

// Plan is the role plan m was rendered from.
func (m *Machine) Plan() cluster.RolePlan { return m.plan }

// LogFiles are the files holding all a service of m wrote (its
// supervisor's log and the copies rotated from it), for checks of a
// daemon's whole output.
func (m *Machine) LogFiles(service string) []string {
	log := filepath.Join(m.Dir, "sv", service, "log")
	rotated, _ := filepath.Glob(log + ".*")
	return append([]string{log}, rotated...)
}

// Logs is the tail of the named services' logs on m, for failure messages.
func (m *Machine) Logs(services ...string) string {
	var b strings.Builder
	if m.sup == nil {
		fmt.Fprintf(&b, "--- %s: nothing started ---\n", m.Name)
		return b.String()
	}
	for _, s := range services {
		lines, err := m.sup.Logs(s, 30)
		fmt.Fprintf(&b, "--- %s/%s log (tail) ---\n", m.Name, s)
		if err != nil {
			fmt.Fprintf(&b, "(%v)\n", err)
		}
		for _, l := range lines {
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// Logs is the tail of the named services' logs on every machine that
// runs any, for failure messages.
func (c *Cluster) Logs(services ...string) string {
	var b strings.Builder
	for _, m := range c.Machines {
		if m.sup != nil {
			b.WriteString(m.Logs(services...))
		}
	}
	return b.String()
}

// ServerMachines are the machines of the servers.
func (c *Cluster) ServerMachines() []*Machine { return c.Machines[:c.Spec.Servers.Count] }

// ConsulClient is a client of machine m's Consul HTTPS API.
func (c *Cluster) ConsulClient(m *Machine, token cluster.Secret) *consulapi.Client {
	cl, err := hashi.ConsulClient(fmt.Sprintf("%s:%d", m.Address, cluster.ConsulHTTPSPort), c.Op, token)
	if err != nil {
		c.t.Fatal(err)
	}
	return cl
}

// NomadClient is a client of machine m's Nomad HTTPS API.
func (c *Cluster) NomadClient(m *Machine, token cluster.Secret) *nomadapi.Client {
	cl, err := hashi.NomadClient(fmt.Sprintf("%s:%d", m.Address, cluster.NomadHTTPPort), c.Op, token)
	if err != nil {
		c.t.Fatal(err)
	}
	return cl
}

// StartConsul starts Consul on the given machines (nil: all) with bin,
// bootstraps its ACLs and applies the plan's policies and tokens for every
// machine of the spec (so that spare machines can join later); it returns
// the management token.
func (c *Cluster) StartConsul(ctx context.Context, bin string, ms []*Machine) (cluster.Secret, error) {
	if ms == nil {
		ms = c.Machines
	}
	if err := c.StartAll(ctx, ms, map[string]string{cluster.ConsulProduct: bin}, "consul"); err != nil {
		return "", err
	}
	anon := c.ConsulClient(c.Machines[0], "")
	if _, err := hashi.WaitConsulLeader(ctx, anon); err != nil {
		return "", err
	}
	mgmt, err := hashi.BootstrapConsulACL(ctx, anon, c.State)
	if err != nil {
		return "", err
	}
	var all []cluster.Machine
	for _, m := range c.Machines {
		all = append(all, m.Machine)
	}
	plan, err := cluster.ConsulACL(c.Spec, c.State, all)
	if err != nil {
		return "", err
	}
	if err := hashi.ApplyConsulACL(ctx, c.ConsulClient(c.Machines[0], mgmt), plan); err != nil {
		return "", err
	}
	for _, m := range c.ServerMachines() {
		if err := hashi.WaitConsulToken(ctx, c.ConsulClient(m, mgmt)); err != nil {
			return "", fmt.Errorf("%s: %w", m.Name, err)
		}
	}
	if _, err := hashi.WaitConsulHealthy(ctx, c.ConsulClient(c.Machines[0], mgmt), c.Spec.Servers.Count); err != nil {
		return "", err
	}
	return mgmt, nil
}

// StartNomad starts Nomad on the given machines (after Consul is up on
// them) with bin, bootstraps its ACLs and returns the management token.
func (c *Cluster) StartNomad(ctx context.Context, bin string, ms []*Machine) (cluster.Secret, error) {
	if err := c.StartAll(ctx, ms, map[string]string{cluster.NomadProduct: bin}, "nomad"); err != nil {
		return "", err
	}
	anon := c.NomadClient(c.Machines[0], "")
	if _, err := hashi.WaitNomadLeader(ctx, anon); err != nil {
		return "", err
	}
	mgmt, err := hashi.BootstrapNomadACL(ctx, anon, c.State)
	if err != nil {
		return "", err
	}
	// Followers know the token once they applied its raft entry.
	for _, m := range c.ServerMachines() {
		if err := hashi.WaitNomadToken(ctx, c.NomadClient(m, mgmt)); err != nil {
			return "", fmt.Errorf("%s: %w", m.Name, err)
		}
	}
	admin := c.NomadClient(c.Machines[0], mgmt)
	if _, err := hashi.WaitNomadHealthy(ctx, admin, c.Spec.Servers.Count); err != nil {
		return "", err
	}
	return mgmt, nil
}

func (c *Cluster) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Nomad first, everywhere, while Consul still has its quorum: a Nomad
	// agent deregisters its services from its local Consul on the way
	// out, and the last Consul server, once alone, can take its whole
	// stop timeout to go.
	for _, m := range slices.Backward(c.Machines) {
		if m.sup != nil && slices.Contains(m.running, "nomad") {
			if err := m.sup.Stop(ctx, "nomad"); err != nil {
				c.t.Logf("stop nomad on %s: %v", m.Name, err)
			}
		}
	}
	for _, m := range slices.Backward(c.Machines) {
		if m.sup == nil {
			continue
		}
		if err := m.sup.Shutdown(ctx); err != nil {
			c.t.Logf("shutdown %s: %v", m.Name, err)
		}
		m.sup.Close()
	}
	c.cleanupNomadClients()
	removeCgroups(c.t, c.cgParent)
	if err := os.RemoveAll(c.root); err != nil {
		c.t.Logf("remove %s: %v", c.root, err)
	}
}

// removeCgroups kills what is left in the cgroups below parent (on the
// cgroup v2 mount) and removes them, deepest first.
func removeCgroups(t testing.TB, parent string) {
	v2 := cgroup2Mount()
	if v2 == "" {
		return
	}
	top := filepath.Join(v2, parent)
	var dirs []string
	filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	slices.SortFunc(dirs, func(a, b string) int { return len(b) - len(a) })
	for _, d := range dirs {
		os.WriteFile(filepath.Join(d, "cgroup.kill"), []byte("1"), 0)
		var err error
		for range 50 {
			if err = syscall.Rmdir(d); err == nil || os.IsNotExist(err) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil && !os.IsNotExist(err) {
			t.Logf("remove cgroup %s: %v", d, err)
		}
	}
	syscall.Rmdir(filepath.Dir(top)) // the shared steppe-test, if empty
}

func cgroup2Mount() string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ... mountpoint ... - fstype source options
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		if fs := strings.Fields(post); len(fs) > 0 && fs[0] == "cgroup2" {
			if f := strings.Fields(pre); len(f) > 4 {
				return f[4]
			}
		}
	}
	return ""
}

// cleanupNomadClients removes what Nomad clients leave on the host once
// they are stopped: task executors and tasks (which outlive the agent by
// design), the mounts below the cluster's directory (task secrets tmpfs)
// and the cgroups of its allocations below Nomad's cgroup v1 parents.
func (c *Cluster) cleanupNomadClients() {
	// Only the cgroups of this cluster's allocations, named
	// <alloc id>.<task>: other tests may run Nomad clients meanwhile.
	allocs := map[string]bool{}
	dirs, _ := filepath.Glob(filepath.Join(c.root, "*", "d", "nomad", "alloc", "*"))
	for _, d := range dirs {
		allocs[filepath.Base(d)] = true
	}
	var created []string
	for _, d := range nomadCgroups() {
		id, _, _ := strings.Cut(filepath.Base(d), ".")
		if !slices.Contains(c.nomadCgroups, d) && allocs[id] {
			created = append(created, d)
		}
	}
	for _, pid := range leftovers(c.root, created) {
		c.t.Logf("killing leftover process %d", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if len(created) > 0 {
		time.Sleep(200 * time.Millisecond)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		var mounts []string
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasPrefix(f[4], c.root+"/") {
				mounts = append(mounts, f[4])
			}
		}
		slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
		for _, m := range mounts {
			if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
				c.t.Logf("unmount %s: %v", m, err)
			}
		}
	}
	slices.SortFunc(created, func(a, b string) int { return len(b) - len(a) })
	for _, d := range created {
		if err := syscall.Rmdir(d); err != nil && !os.IsNotExist(err) {
			c.t.Logf("remove cgroup %s: %v", d, err)
		}
	}
}

// nomadCgroups lists the cgroup directories below Nomad's parents (v1
// "nomad" in every hierarchy, v2 "nomad.slice").
func nomadCgroups() []string {
	var out []string
	for _, pattern := range []string{"/sys/fs/cgroup/*/nomad", "/sys/fs/cgroup/nomad.slice", "/sys/fs/cgroup/unified/nomad.slice"} {
		tops, _ := filepath.Glob(pattern)
		for _, top := range tops {
			filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					out = append(out, p)
				}
				return nil
			})
		}
	}
	return out
}

// leftovers are the processes in the given cgroups, or whose command
// line names root.
func leftovers(root string, cgroups []string) []int {
	var pids []int
	seen := map[int]bool{}
	add := func(pid int) {
		if pid > 1 && pid != os.Getpid() && !seen[pid] {
			seen[pid] = true
			pids = append(pids, pid)
		}
	}
	for _, d := range cgroups {
		for _, f := range []string{"cgroup.procs", "tasks"} {
			b, err := os.ReadFile(filepath.Join(d, f))
			if err != nil {
				continue
			}
			for _, l := range strings.Fields(string(b)) {
				var pid int
				if _, err := fmt.Sscan(l, &pid); err == nil {
					add(pid)
				}
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(root+"/")) {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(filepath.Base(filepath.Dir(p)), &pid); err == nil {
			add(pid)
		}
	}
	return pids
}

// ClientMachines are the machines of the pools.
func (c *Cluster) ClientMachines() []*Machine { return c.Machines[c.Spec.Servers.Count:] }
