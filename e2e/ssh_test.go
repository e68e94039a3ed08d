package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/supervise"
)

// sshBundles serves signed bundles to the test hosts from the bridge's
// address, as an operator's bundle server would.
type sshBundles struct {
	t       testing.TB
	store   string
	key     bundle.PrivateKey
	pubFile string
	url     string
	version uint64
}

func newSSHBundles(t testing.TB) *sshBundles {
	t.Helper()
	b := &sshBundles{t: t, store: t.TempDir()}
	var err error
	if b.key, err = bundle.GenerateKey(); err != nil {
		t.Fatal(err)
	}
	if _, b.pubFile, err = bundle.WriteKeyPair(filepath.Join(t.TempDir(), "bundle"), b.key); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", sshSubnetPrefix+"1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: bundle.NewServer(b.store, bundle.ServerOptions{}).Handler()}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	b.url = "http://" + ln.Addr().String()
	return b
}

// publish a bundle of role web whose one service is a real long-running
// process of the host's own (/bin/sleep).
func (b *sshBundles) publish() {
	b.t.Helper()
	dir := b.t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "services"), 0o755); err != nil {
		b.t.Fatal(err)
	}
	svc := "service \"sleeper\" {\n  command = \"/bin/sleep\"\n  args    = [\"100000\"]\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "services", "steppe.hcl"), []byte(svc), 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.version++
	now := time.Now()
	var buf bytes.Buffer
	if _, err := bundle.Build(&buf, dir, bundle.Manifest{Cluster: "c1", Role: "web", Version: b.version,
		Created: now.Add(-time.Hour), Expires: now.Add(time.Hour)}, &b.key); err != nil {
		b.t.Fatal(err)
	}
	if _, err := bundle.NewDirStore(b.store).Publish(context.Background(), &buf, bundle.PublishOptions{}); err != nil {
		b.t.Fatal(err)
	}
}

func (b *sshBundles) agentConfig() provider.AgentConfig {
	return provider.AgentConfig{Cluster: "c1", Region: "global", Datacenter: "dc1", BundleRole: "web",
		BundleStore: b.url, BundleKeys: []string{b.pubFile}, HealthTimeout: 20 * time.Second}
}

func sshRequest(name string, a provider.AgentConfig) provider.CreateRequest {
	return provider.CreateRequest{
		Machine: cluster.Machine{Name: name, Role: cluster.RoleClient, Pool: "default"},
		Agent:   a,
		Secrets: func(m cluster.Machine, dir string) (map[string][]byte, error) {
			return map[string][]byte{"token": []byte("s3cret-" + m.Name)}, nil
		},
	}
}

// waitService waits until the machine's agent runs service with a pid and
// returns the status.
func waitService(t *testing.T, p *provider.SSH, machine, service string, timeout time.Duration, ok func(supervise.Status) bool) supervise.Status {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cl, done, err := p.Client(ctx, machine)
		if err == nil {
			st, serr := cl.Status(ctx)
			done()
			err = serr
			if serr == nil {
				for _, s := range st.Services {
					if s.Name == service && ok(s) {
						cancel()
						return s
					}
				}
				last = fmt.Sprintf("%+v", st.Services)
			}
		}
		cancel()
		if err != nil {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("machine %s: service %s not as wanted within %v; last: %s", machine, service, timeout, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestSSHProvider: the ssh provider installs the agent on a runit host and
// an OpenRC host through SSH only; each init runs it, and restarts it
// after a SIGKILL, and the new agent adopts the daemon the old one ran
// (same pid, no restart); Destroy leaves each host's files and processes
// as they were.
func TestSSHProvider(t *testing.T) {
	lab := newSSHLab(t)
	hosts := []*testHost{lab.start("h-runit", "runit"), lab.start("h-openrc", "openrc")}
	bundles := newSSHBundles(t)
	bundles.publish()
	var specHosts []provider.SSHHost
	before := map[string][]string{}
	procsBefore := map[string][]string{}
	for _, h := range hosts {
		specHosts = append(specHosts, provider.SSHHost{Address: h.addr, Key: lab.keyFile, HostKey: h.hostKey})
		before[h.name] = h.tree(t)
		procsBefore[h.name] = h.procs(t)
	}
	p, err := provider.NewSSH(provider.SSHOptions{Dir: t.TempDir(), Hosts: specHosts, Binary: steppeBinary(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, h := range hosts {
		name := "m-" + h.init
		start := time.Now()
		req := sshRequest(name, bundles.agentConfig())
		req.Machine.Address = h.addr
		m, err := p.Create(ctx, req)
		if err != nil {
			t.Fatalf("create %s on %s: %v\n%s", name, h.name, err, h.logs())
		}
		t.Logf("%s: agent up under %s in %v", name, h.init, time.Since(start).Round(time.Millisecond))
		if !m.Running || m.Address != h.addr {
			t.Fatalf("%s: %+v", name, m)
		}
	}
	// The secrets: 0700 directory, 0600 files, on the host.
	for _, h := range hosts {
		for p, want := range map[string]os.FileMode{provider.SSHSecretsDir: 0o700 | os.ModeDir, provider.SSHSecretsDir + "/token": 0o600, provider.SSHConfig: 0o600, provider.SSHBinary: 0o755} {
			st, err := os.Stat(h.path(p))
			if err != nil || st.Mode() != want {
				t.Errorf("%s: %s: %v %v, want %v", h.name, p, st.Mode(), err, want)
			}
		}
	}
	for _, h := range hosts {
		name := "m-" + h.init
		s := waitService(t, p, name, "sleeper", 60*time.Second, func(s supervise.Status) bool { return s.PID > 0 })
		agentPID := hostAgentPID(t, h)
		t.Logf("%s: sleeper pid %d (host pid), agent pid %d; SIGKILL the agent", name, s.PID, agentPID)
		if err := syscall.Kill(agentPID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		killed := time.Now()
		// The init restarts it; the new agent adopts the sleeper.
		var newPID int
		for newPID = hostAgentPID(t, h); newPID == agentPID || newPID == 0; newPID = hostAgentPID(t, h) {
			if time.Since(killed) > 20*time.Second {
				t.Fatalf("%s: %s did not restart the agent within 20 s", name, h.init)
			}
			time.Sleep(50 * time.Millisecond)
		}
		after := waitService(t, p, name, "sleeper", 30*time.Second, func(s supervise.Status) bool { return s.PID > 0 && s.Adopted })
		t.Logf("%s: %s restarted the agent (pid %d) in %v; sleeper pid %d, restarts %d", name, h.init, newPID, time.Since(killed).Round(time.Millisecond), after.PID, after.Restarts)
		if after.PID != s.PID || after.Restarts != s.Restarts {
			t.Errorf("%s: the sleeper was not adopted: pid %d restarts %d before, pid %d restarts %d after", name, s.PID, s.Restarts, after.PID, after.Restarts)
		}
	}
	// Create again is idempotent: the same agent (no restart), its daemon
	// the same; new secrets are delivered and said to have changed.
	for _, h := range hosts {
		name := "m-" + h.init
		agentPID := hostAgentPID(t, h)
		req := sshRequest(name, bundles.agentConfig())
		req.Machine.Address = h.addr
		m, err := p.Create(ctx, req)
		if err != nil || !m.Running || m.SecretsChanged {
			t.Fatalf("%s: Create again: %+v, %v", name, m, err)
		}
		req.Secrets = func(cluster.Machine, string) (map[string][]byte, error) {
			return map[string][]byte{"token": []byte("rotated")}, nil
		}
		if m, err = p.Create(ctx, req); err != nil || !m.Running || !m.SecretsChanged {
			t.Fatalf("%s: Create with new secrets: %+v, %v", name, m, err)
		}
		if b, err := os.ReadFile(h.path(provider.SSHSecretsDir + "/token")); err != nil || string(b) != "rotated" {
			t.Errorf("%s: token %q, %v", name, b, err)
		}
		if pid := hostAgentPID(t, h); pid != agentPID {
			t.Errorf("%s: the agent was restarted by an unchanged Create: pid %d, then %d", name, agentPID, pid)
		}
	}
	for _, h := range hosts {
		name := "m-" + h.init
		if err := p.Destroy(ctx, name); err != nil {
			t.Fatalf("destroy %s: %v", name, err)
		}
		onlyBefore, onlyAfter := diff(before[h.name], h.tree(t))
		if len(onlyBefore)+len(onlyAfter) > 0 {
			t.Errorf("%s: files differ after Destroy:\nbefore only: %s\nafter only: %s", h.name, strings.Join(onlyBefore, "\n  "), strings.Join(onlyAfter, "\n  "))
		}
		gone, left := diff(procsBefore[h.name], h.procs(t))
		if len(gone)+len(left) > 0 {
			t.Errorf("%s: processes differ after Destroy:\ngone: %v\nleft: %v", h.name, gone, left)
		}
	}
}

// hostAgentPID is the pid (in the test's namespace) of the host's steppe
// agent, 0 if none runs.
func hostAgentPID(t *testing.T, h *testHost) int {
	t.Helper()
	out, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	// Its own command line, not supervise-daemon's that names it.
	want := provider.SSHBinary + "\x00agent\x00-config\x00" + provider.SSHConfig + "\x00"
	root, _ := os.Readlink(fmt.Sprintf("/proc/%d/root", h.cmd.Process.Pid))
	for _, e := range out {
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !strings.HasPrefix(string(b), want) {
			continue
		}
		if r, _ := os.Readlink("/proc/" + e.Name() + "/root"); r != root {
			continue // another host's
		}
		var pid int
		fmt.Sscan(e.Name(), &pid)
		return pid
	}
	return 0
}

// TestSSHRefusals: what the ssh provider refuses, and that a refused or
// failed Create leaves the host as it was: a wrong host key (refused
// before anything is sent), an unknown one (refused unless trusted on
// first use, then recorded; a changed one refused even then), a host that
// is down (named in the error), a host whose init steppe does not know,
// and an agent that never answers (what was written is removed again).
func TestSSHRefusals(t *testing.T) {
	lab := newSSHLab(t)
	h := lab.start("h1", "runit")
	bare := lab.start("h-bare", "none") // sshd only: no init steppe knows
	bundles := newSSHBundles(t)
	bundles.publish()
	ctx := context.Background()
	tree, bareTree := h.tree(t), bare.tree(t)
	unchanged := func(what string, h *testHost, want []string) {
		t.Helper()
		if a, b := diff(want, h.tree(t)); len(a)+len(b) > 0 {
			t.Errorf("%s: host %s changed:\nbefore only: %v\nafter only: %v", what, h.name, a, b)
		}
	}
	newP := func(dir string, tofu bool, hosts ...provider.SSHHost) *provider.SSH {
		t.Helper()
		p, err := provider.NewSSH(provider.SSHOptions{Dir: dir, Hosts: hosts, Binary: steppeBinary(t), TrustOnFirstUse: tofu, StartTimeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	create := func(p *provider.SSH, name, addr string, a provider.AgentConfig) error {
		req := sshRequest(name, a)
		req.Machine.Address = addr
		_, err := p.Create(ctx, req)
		return err
	}
	expect := func(what string, err error, wants ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		for _, w := range wants {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error lacks %q: %v", what, w, err)
			}
		}
		t.Logf("%s: %v", what, err)
	}

	// A wrong key in the spec: refused before anything is sent.
	wrong := bare.hostKey
	err := create(newP(t.TempDir(), true, provider.SSHHost{Address: h.addr, Key: lab.keyFile, HostKey: wrong}), "m1", h.addr, bundles.agentConfig())
	expect("wrong host key", err, "host key refused", h.addr+":22", "the spec's host_key is")
	unchanged("wrong host key", h, tree)

	// Unknown key, no trust on first use: refused, says how to trust it.
	dir := t.TempDir()
	err = create(newP(dir, false, provider.SSHHost{Address: h.addr, Key: lab.keyFile}), "m1", h.addr, bundles.agentConfig())
	expect("unknown host key", err, "host key refused", "is unknown", "trust it on first use")
	unchanged("unknown host key", h, tree)

	// A known_hosts that holds another key for the address: refused even
	// with trust on first use.
	kh := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(kh, []byte(h.addr+" "+wrong+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = create(newP(t.TempDir(), true, provider.SSHHost{Address: h.addr, Key: lab.keyFile, KnownHosts: kh}), "m1", h.addr, bundles.agentConfig())
	expect("changed host key", err, "host key refused", "its known key is", kh)
	unchanged("changed host key", h, tree)

	// A host that is down is named.
	down := sshSubnetPrefix + "99"
	err = create(newP(t.TempDir(), true, provider.SSHHost{Address: down, Key: lab.keyFile}), "m1", down, bundles.agentConfig())
	expect("host down", err, "ssh host "+down+":22", "m1")

	// No init steppe knows: refused before anything is written.
	err = create(newP(t.TempDir(), true, provider.SSHHost{Address: bare.addr, Key: lab.keyFile, HostKey: bare.hostKey}), "m1", bare.addr, bundles.agentConfig())
	expect("unknown init", err, "init system \"unknown\" is not one steppe can install its agent under", "nothing was written")
	unchanged("unknown init", bare, bareTree)

	// An agent that cannot start (its config names no bundle store):
	// Create fails and removes what it wrote.
	bad := bundles.agentConfig()
	bad.BundleStore = ""
	p := newP(dir, true, provider.SSHHost{Address: h.addr, Key: lab.keyFile})
	err = create(p, "m1", h.addr, bad)
	expect("agent does not start", err, "did not answer within 5s", "what was written on the host is removed again")
	unchanged("agent does not start", h, tree)
	if ms, err := p.List(ctx); err != nil || len(ms) != 0 {
		t.Errorf("after a failed Create: machines %+v, %v", ms, err)
	}

	// The key trusted on first use was recorded: the next provider of
	// that state directory needs no trust flag for it.
	b, err := os.ReadFile(filepath.Join(dir, "known_hosts"))
	if err != nil || !strings.Contains(string(b), strings.TrimPrefix(h.hostKey, "ssh-ed25519 ")) {
		t.Fatalf("known_hosts after trust on first use: %q, %v", b, err)
	}
	if err := create(newP(dir, false, provider.SSHHost{Address: h.addr, Key: lab.keyFile}), "m1", h.addr, bundles.agentConfig()); err != nil {
		t.Fatalf("with the recorded key: %v\n%s", err, h.logs())
	}
	if err := newP(dir, false, provider.SSHHost{Address: h.addr, Key: lab.keyFile}).Destroy(ctx, "m1"); err != nil {
		t.Fatal(err)
	}
	unchanged("destroy", h, tree)
}
