package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

var agentBin struct {
	once sync.Once
	path string
	err  error
}

// steppeBinary builds the real steppe binary once per test run.
func steppeBinary(t testing.TB) string {
	agentBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "steppe-e2e-bin-")
		if err != nil {
			agentBin.err = err
			return
		}
		agentBin.path = filepath.Join(dir, "steppe")
		// Built as released: static, stripped (see the Makefile).
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", agentBin.path, "../cmd/steppe")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			agentBin.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if agentBin.err != nil {
		t.Fatal(agentBin.err)
	}
	return agentBin.path
}

// testAgent is one real `steppe agent` process with its own state dir,
// socket and cgroup parent.
type testAgent struct {
	t      testing.TB
	dir    string
	config string
	socket string
	cgroup string
	cmd    *exec.Cmd
	done   chan error
	binary string // the steppe binary to run; steppeBinary when empty
}

func newTestAgent(t testing.TB, config string) *testAgent {
	t.Helper()
	testenv.NeedRoot(t, "the agent (cgroups)")
	dir := t.TempDir()
	a := &testAgent{
		t:      t,
		dir:    dir,
		config: filepath.Join(dir, "agent.hcl"),
		socket: filepath.Join(dir, "run", "agent.sock"),
		cgroup: fmt.Sprintf("steppe-e2e/%s-%d", sanitize(t.Name()), time.Now().UnixNano()),
	}
	a.writeConfig(config)
	t.Cleanup(a.cleanup)
	return a
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return '-'
	}, s)
}

func (a *testAgent) writeConfig(services string) {
	a.t.Helper()
	cfg := fmt.Sprintf("agent {\n  state_dir = %q\n  socket = %q\n  cgroup = %q\n}\n%s", filepath.Join(a.dir, "state"), a.socket, a.cgroup, services)
	if err := os.WriteFile(a.config, []byte(cfg), 0o600); err != nil {
		a.t.Fatal(err)
	}
}

func (a *testAgent) start() {
	a.t.Helper()
	bin := a.binary
	if bin == "" {
		bin = steppeBinary(a.t)
	}
	a.cmd = exec.Command(bin, "agent", "-config", a.config)
	logf, err := os.OpenFile(filepath.Join(a.dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		a.t.Fatal(err)
	}
	defer logf.Close()
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if err := a.cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	a.done = make(chan error, 1)
	go func(c *exec.Cmd, done chan error) { done <- c.Wait() }(a.cmd, a.done)
	a.waitAPI()
}

func (a *testAgent) waitAPI() {
	a.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := a.client().Status(context.Background()); err == nil {
			return
		}
		select {
		case err := <-a.done:
			a.t.Fatalf("agent exited: %v\n%s", err, a.log())
		default:
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent API never answered\n%s", a.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (a *testAgent) client() *agent.Client { return agent.NewClient(a.socket) }

func (a *testAgent) log() string {
	b, _ := os.ReadFile(filepath.Join(a.dir, "agent.log"))
	return string(b)
}

func (a *testAgent) kill() {
	a.t.Helper()
	_ = a.cmd.Process.Signal(syscall.SIGKILL)
	<-a.done
}

// stop sends SIGTERM and waits for a clean exit.
func (a *testAgent) stop() {
	a.t.Helper()
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-a.done:
		if err != nil {
			a.t.Fatalf("agent exited with %v after SIGTERM\n%s", err, a.log())
		}
	case <-time.After(60 * time.Second):
		a.t.Fatalf("agent did not exit within 60s of SIGTERM\n%s", a.log())
	}
}

func (a *testAgent) steppe(args ...string) (string, error) {
	cmd := exec.Command(steppeBinary(a.t), args...)
	cmd.Env = append(os.Environ(), "STEPPE_AGENT_SOCKET="+a.socket)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// cleanup kills whatever a failed test left: the agent, then every process
// in the test's cgroups, then the cgroups.
func (a *testAgent) cleanup() {
	if a.cmd != nil && a.cmd.ProcessState == nil {
		_ = a.cmd.Process.Signal(syscall.SIGKILL)
		<-a.done
	}
	roots := []string{filepath.Join(cgroup2Mount(a.t), a.cgroup)}
	// The agent, a child of the test, made its v1 memory cgroups below the
	// one the test runs in.
	if mem, err := supervise.MemoryV1Cgroup(os.Getpid()); err == nil && mem != "" {
		roots = append(roots, filepath.Join(mem, a.cgroup))
	}
	for _, root := range roots {
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = os.WriteFile(filepath.Join(dirs[i], "cgroup.kill"), []byte("1"), 0)
			for j := 0; j < 100; j++ {
				if os.Remove(dirs[i]) == nil {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		// The shared parent goes with the last test that used it.
		_ = os.Remove(filepath.Dir(root))
	}
}

func cgroup2Mount(t testing.TB) string {
	v2 := supervise.CgroupV2Mount()
	if v2 == "" {
		t.Fatal("no cgroup2 mount")
	}
	return v2
}

// waitFor polls the agent's status until cond holds.
func (a *testAgent) waitFor(what string, timeout time.Duration, cond func(agent.StatusReport) bool) agent.StatusReport {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	var last agent.StatusReport
	for time.Now().Before(deadline) {
		st, err := a.client().Status(context.Background())
		if err == nil {
			last = st
			if cond(st) {
				return st
			}
		}
		time.Sleep(25 * time.Millisecond)
	}
	js, _ := json.MarshalIndent(last, "", "  ")
	a.t.Fatalf("timed out after %v waiting for %s; last status:\n%s\nagent log:\n%s", timeout, what, js, a.log())
	return last
}

func allRunning(n int) func(agent.StatusReport) bool {
	return func(st agent.StatusReport) bool {
		if len(st.Services) != n {
			return false
		}
		for _, s := range st.Services {
			if s.State != supervise.StateRunning || !s.Ready {
				return false
			}
		}
		return true
	}
}

func byName(st agent.StatusReport) map[string]supervise.Status {
	m := map[string]supervise.Status{}
	for _, s := range st.Services {
		m[s.Name] = s
	}
	return m
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// listeners counts the sockets listening on 127.0.0.1:port, from the
// kernel's table: a second copy of a daemon would show as a second one.
func listeners(t testing.TB, port int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "0A" { // 0A: LISTEN
			continue
		}
		_, hexPort, _ := strings.Cut(f[1], ":")
		if p, err := strconv.ParseUint(hexPort, 16, 16); err == nil && int(p) == port {
			n++
		}
	}
	return n
}

func httpService(name string, port int, extra string) string {
	return fmt.Sprintf(`
service %q {
  command = "/usr/bin/python3"
  args    = ["-m", "http.server", "%d", "--bind", "127.0.0.1"]
  dir     = "/tmp"
  ready {
    http = "http://127.0.0.1:%d/"
  }
  %s
}
`, name, port, port, extra)
}

// The README's example config, exactly as written but for where the agent
// keeps its state: web answers, after-web starts only after it, and the
// CLI shows both.
func TestAgentExampleConfig(t *testing.T) {
	if listeners(t, 18080) > 0 {
		t.Fatal("port 18080 is taken: the example config needs it")
	}
	src, err := os.ReadFile("../examples/agent.hcl")
	if err != nil {
		t.Fatal(err)
	}
	a := newTestAgent(t, string(src))
	a.start()
	st := a.waitFor("both example services running", 60*time.Second, allRunning(2))
	svc := byName(st)
	if svc["after-web"].Since.Before(svc["web"].Since) {
		t.Errorf("after-web started at %v, before web was ready at %v", svc["after-web"].Since, svc["web"].Since)
	}
	resp, err := http.Get("http://127.0.0.1:18080/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	out, err := a.steppe("agent", "status")
	if err != nil || !strings.Contains(out, "web") || !strings.Contains(out, "after-web") || !strings.Contains(out, "running") {
		t.Fatalf("steppe agent status: %v\n%s", err, out)
	}
	out, err = a.steppe("agent", "status", "-json")
	if err != nil {
		t.Fatalf("status -json: %v\n%s", err, out)
	}
	var js agent.StatusReport
	if err := json.Unmarshal([]byte(out), &js); err != nil || len(js.Services) != 2 {
		t.Fatalf("status -json: %v\n%s", err, out)
	}
	if fi, err := os.Stat(a.socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	// python's http.server logs each request to stderr: the log has it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err = a.steppe("agent", "logs", "web", "-n", "20")
		if err == nil && strings.Contains(out, "GET / HTTP") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("steppe agent logs web: %v\n%s", err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.stop()
	if listeners(t, 18080) != 0 {
		t.Fatal("web still listens after the agent stopped")
	}
}

// SIGKILL the agent while five services run (one of them a real
// daemonizing program, dnsmasq), start it again: every service is adopted,
// exactly one copy of each runs, and no restart is counted.
func TestAgentKilledAdoptsEveryService(t *testing.T) {
	var cfg strings.Builder
	ports := map[string]int{}
	for i := range 4 {
		name := fmt.Sprintf("http%d", i)
		ports[name] = freePort(t)
		cfg.WriteString(httpService(name, ports[name], ""))
	}
	dnsPort := freePort(t)
	dnsPid := filepath.Join(t.TempDir(), "dnsmasq.pid")
	fmt.Fprintf(&cfg, `
service "dnsmasq" {
  command = "/usr/sbin/dnsmasq"
  args    = ["--conf-file=/dev/null", "--port=%d", "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--pid-file=%s"]
  ready {
    tcp = "127.0.0.1:%d"
  }
}
`, dnsPort, dnsPid, dnsPort)
	ports["dnsmasq"] = dnsPort

	a := newTestAgent(t, cfg.String())
	a.start()
	// Settled once the tracked dnsmasq is the one its pid file names: it
	// listens (and so is ready) before it forks into the background.
	before := byName(a.waitFor("5 services running, dnsmasq in the background", 60*time.Second, func(st agent.StatusReport) bool {
		b, _ := os.ReadFile(dnsPid)
		d := byName(st)["dnsmasq"]
		return allRunning(5)(st) && d.Processes == 1 && strings.TrimSpace(string(b)) == strconv.Itoa(d.PID)
	}))
	for name, s := range before {
		if s.Isolation != "cgroup2" {
			t.Errorf("%s: isolation %q, want cgroup2", name, s.Isolation)
		}
	}
	// dnsmasq forked into the background and its first process exited:
	// it must still be tracked, through its cgroup.
	if s := before["dnsmasq"]; s.Processes != 1 {
		t.Errorf("dnsmasq: %d processes in its cgroup, want 1", s.Processes)
	}

	for round := range 3 {
		a.kill()
		for name, port := range ports {
			if n := listeners(t, port); n != 1 {
				t.Fatalf("round %d: %s: %d listeners on port %d while the agent is dead, want 1", round, name, n, port)
			}
		}
		a.start()
		after := byName(a.waitFor("5 services adopted", 30*time.Second, allRunning(5)))
		for name, b := range before {
			s := after[name]
			if !s.Adopted {
				t.Errorf("round %d: %s not adopted: %+v", round, name, s)
			}
			if s.Restarts != b.Restarts {
				t.Errorf("round %d: %s restarts %d, want %d", round, name, s.Restarts, b.Restarts)
			}
			if b.PID != 0 && s.PID != b.PID {
				t.Errorf("round %d: %s pid %d, was %d", round, name, s.PID, b.PID)
			}
			if s.Processes != b.Processes {
				t.Errorf("round %d: %s has %d processes, had %d", round, name, s.Processes, b.Processes)
			}
			if n := listeners(t, ports[name]); n != 1 {
				t.Errorf("round %d: %s: %d listeners on port %d, want 1", round, name, n, ports[name])
			}
		}
	}
	// The adopted services are fully controllable: stopping the agent stops
	// them all, the daemonized dnsmasq included.
	a.stop()
	for name, port := range ports {
		if n := listeners(t, port); n != 0 {
			t.Errorf("%s still listens on %d after the agent stopped", name, port)
		}
	}
}

// SIGHUP applies only the differences; an invalid file changes nothing and
// says what is wrong, with file:line.
func TestAgentReloadConfig(t *testing.T) {
	pa, pb, pc := freePort(t), freePort(t), freePort(t)
	a := newTestAgent(t, httpService("a", pa, "")+httpService("b", pb, ""))
	a.start()
	before := byName(a.waitFor("a and b running", 60*time.Second, allRunning(2)))

	// An invalid config: unknown key and a cycle. Nothing changes.
	a.writeConfig(httpService("a", pa, `bogus = 1`) + httpService("c", pc, `after = ["c"]`))
	_ = a.cmd.Process.Signal(syscall.SIGHUP)
	st := a.waitFor("the reload to be refused", 20*time.Second, func(st agent.StatusReport) bool { return st.Agent.ConfigError != "" })
	if !strings.Contains(st.Agent.ConfigError, "agent.hcl:") || !strings.Contains(st.Agent.ConfigError, "bogus") {
		t.Errorf("config error does not name the file, line and key: %q", st.Agent.ConfigError)
	}
	time.Sleep(300 * time.Millisecond)
	now := byName(a.waitFor("a and b still running", 5*time.Second, allRunning(2)))
	for _, n := range []string{"a", "b"} {
		if now[n].PID != before[n].PID {
			t.Errorf("%s restarted by a refused reload: pid %d -> %d", n, before[n].PID, now[n].PID)
		}
	}
	if listeners(t, pc) != 0 {
		t.Error("service c started from a refused config")
	}

	// A valid change: a unchanged, b removed, c added.
	a.writeConfig(httpService("a", pa, "") + httpService("c", pc, `after = ["a"]`))
	_ = a.cmd.Process.Signal(syscall.SIGHUP)
	st = a.waitFor("a and c running", 60*time.Second, func(st agent.StatusReport) bool {
		return allRunning(2)(st) && byName(st)["c"].Name == "c" && st.Agent.ConfigError == ""
	})
	if p := byName(st)["a"].PID; p != before["a"].PID {
		t.Errorf("a restarted by a reload that did not change it: pid %d -> %d", before["a"].PID, p)
	}
	if listeners(t, pb) != 0 {
		t.Error("b still listens after it was removed from the config")
	}

	// A changed service restarts.
	a.writeConfig(httpService("a", pa, `env = { CHANGED = "1" }`) + httpService("c", pc, `after = ["a"]`))
	_ = a.cmd.Process.Signal(syscall.SIGHUP)
	a.waitFor("a restarted with its new env", 60*time.Second, func(st agent.StatusReport) bool {
		s := byName(st)["a"]
		return allRunning(2)(st) && s.PID != 0 && s.PID != before["a"].PID
	})
	a.stop()
}

// The control commands act and report, and a non-root user cannot reach
// the local API at all.
func TestAgentControlCommands(t *testing.T) {
	p := freePort(t)
	a := newTestAgent(t, httpService("web", p, ""))
	a.start()
	before := byName(a.waitFor("web running", 60*time.Second, allRunning(1)))["web"]

	if out, err := a.steppe("agent", "restart", "web"); err != nil {
		t.Fatalf("restart: %v\n%s", err, out)
	}
	after := byName(a.waitFor("web running again", 60*time.Second, allRunning(1)))["web"]
	if after.PID == before.PID {
		t.Errorf("restart kept pid %d", after.PID)
	}
	if out, err := a.steppe("agent", "stop", "web"); err != nil {
		t.Fatalf("stop: %v\n%s", err, out)
	}
	if s := byName(a.waitFor("web stopped", 30*time.Second, func(st agent.StatusReport) bool {
		return byName(st)["web"].State == supervise.StateStopped
	}))["web"]; s.Processes != 0 || listeners(t, p) != 0 {
		t.Errorf("stopped web still has %d processes", s.Processes)
	}
	if out, err := a.steppe("agent", "start", "web"); err != nil {
		t.Fatalf("start: %v\n%s", err, out)
	}
	a.waitFor("web running after start", 60*time.Second, allRunning(1))
	if out, err := a.steppe("agent", "reload", "web"); err != nil {
		// python's http.server dies of SIGHUP: the reload is delivered and
		// the supervisor restarts it. What matters here is that the command
		// reached the service.
		t.Fatalf("reload: %v\n%s", err, out)
	}
	out, err := a.steppe("agent", "restart", "ghost")
	if err == nil || !strings.Contains(out, "ghost") {
		t.Errorf("restart of an unknown service: %v\n%s", err, out)
	}

	// nobody (65534) is refused by the socket's mode.
	cmd := exec.Command(steppeBinary(t), "agent", "status", "-socket", a.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out2, err := cmd.CombinedOutput()
	if err == nil {
		t.Errorf("a non-root user read the agent's status:\n%s", out2)
	}
	a.stop()
}

// A second agent on the same state dir refuses to start: two agents would
// both believe they own the same services.
func TestAgentSecondCopyRefused(t *testing.T) {
	a := newTestAgent(t, httpService("web", freePort(t), ""))
	a.start()
	a.waitFor("web running", 60*time.Second, allRunning(1))
	out, err := exec.Command(steppeBinary(t), "agent", "-config", a.config).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another agent") {
		t.Fatalf("second agent: %v\n%s", err, out)
	}
	a.stop()
}

// A running agent whose binary is replaced on disk (an in-place upgrade of
// steppe, or the temporary binary of `go run` deleted) still restarts its
// services, memory limits included, with its own code: on a machine where
// cgroup v2 has no memory controller the limit goes through the exec
// trampoline, which must be the running binary, not whatever now sits at
// its path.
func TestAgentBinaryReplacedWhileRunning(t *testing.T) {
	a := newTestAgent(t, `
service "m" {
  command    = "/bin/sleep"
  args       = ["100000"]
  memory_max = "64M"
}
`)
	a.binary = filepath.Join(a.dir, "steppe")
	b, err := os.ReadFile(steppeBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.binary, b, 0o755); err != nil {
		t.Fatal(err)
	}
	a.start()
	first := byName(a.waitFor("m running", 60*time.Second, allRunning(1)))["m"].PID

	// Replace the binary the way an upgrade would: a new file renamed over
	// the path. This one fails loudly if anything runs it.
	next := a.binary + ".new"
	if err := os.WriteFile(next, []byte("#!/bin/sh\necho replaced binary ran >&2\nexit 97\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(next, a.binary); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := a.client().Control(ctx, "m", "restart"); err != nil {
		t.Fatalf("restart: %v\n%s", err, a.log())
	}
	st := byName(a.waitFor("m running again", 60*time.Second, allRunning(1)))["m"]
	if st.PID == first {
		t.Fatalf("m was not restarted: %+v", st)
	}
	v2, _ := os.ReadFile("/sys/fs/cgroup/unified/cgroup.controllers")
	if !strings.Contains(string(v2), "memory") {
		// The limit is the v1 memory controller's: the trampoline joins
		// it, then execs the command (the status may say running a moment
		// before).
		inMemcg := regexp.MustCompile(`(?m)^\d+:memory:/.*/m$`)
		var cg []byte
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if cg, err = os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", st.PID)); err != nil {
				t.Fatal(err)
			}
			if inMemcg.Match(cg) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the restarted process is not in its memory cgroup:\n%s\n%s", cg, a.log())
			}
		}
	} else {
		t.Logf("cgroup v2 has a memory controller here: no trampoline to exercise; the restart itself is checked")
	}
	if strings.Contains(a.log(), "replaced binary ran") {
		t.Fatalf("the replaced binary was run:\n%s", a.log())
	}
	a.stop()
}

// BenchmarkAgentRSS measures the resident memory of a real agent process
// supervising 10 services (target: 12 MiB or less), as an operator's
// monitoring would see it: the agent answers a status poll every 100 ms.
// It reports the figure after 3 s of polls (MiB-RSS-3s) and after 30 s
// (MiB-RSS), by then with several garbage collections behind it; the split
// is of the second. The crash-loop case adds an 11th service that exits
// every 5 s, so the restart path runs too.
func BenchmarkAgentRSS(b *testing.B) {
	var cfg strings.Builder
	for i := range 10 {
		fmt.Fprintf(&cfg, `
service "s%d" {
  command = "/bin/sleep"
  args    = ["100000"]
}
`, i)
	}
	b.Run("10-services", func(b *testing.B) { benchAgentRSS(b, cfg.String(), 10) })
	b.Run("10-services+crash-loop", func(b *testing.B) {
		benchAgentRSS(b, cfg.String()+`
service "crash" {
  command = "/bin/sh"
  args    = ["-c", "sleep 5; exit 1"]
}
`, 11)
	})
}

func benchAgentRSS(b *testing.B, config string, services int) {
	a := newTestAgent(b, config)
	a.start()
	a.waitFor(fmt.Sprintf("%d services running", services), 60*time.Second, allRunning(services))
	poll := func(n int) {
		for range n {
			if _, err := a.client().Status(context.Background()); err != nil {
				b.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	var early, rss, anon, file, text, ro float64
	for b.Loop() {
		poll(30)
		early = vmRSS(b, a.cmd.Process.Pid)
		poll(270)
		rss = vmRSS(b, a.cmd.Process.Pid)
		anon, file = rssSplit(b, a.cmd.Process.Pid)
		text, ro = binaryRSS(b, a.cmd.Process.Pid)
	}
	b.ReportMetric(early/(1<<20), "MiB-RSS-3s")
	b.ReportMetric(rss/(1<<20), "MiB-RSS")
	// The split says what the figure is made of: private memory, and clean
	// pages of the binary itself, which the kernel can drop at any time:
	// its code, and its read-only data (with the function tables the
	// runtime reads to walk stacks).
	b.ReportMetric(anon/(1<<20), "MiB-anon")
	b.ReportMetric(file/(1<<20), "MiB-file")
	b.ReportMetric(text/(1<<20), "MiB-text")
	b.ReportMetric(ro/(1<<20), "MiB-rodata")
	a.stop()
}

// rssSplit reads the anonymous and the file-backed part of a process's
// resident memory.
func rssSplit(t testing.TB, pid int) (anon, file float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "Anonymous:":
			anon = kb * 1024
		case "Pss_File:":
			file = kb * 1024
		}
	}
	return anon, file
}

// binaryRSS reads how much of the executable's code (r-x) and read-only
// data (r--) mappings is resident.
func binaryRSS(t testing.TB, pid int) (text, ro float64) {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	var cur *float64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":"):
			cur = nil // a mapping's header line: the address range first
			if len(f) == 6 && f[5] == exe {
				switch f[1] {
				case "r-xp":
					cur = &text
				case "r--p":
					cur = &ro
				}
			}
		case len(f) >= 2 && f[0] == "Rss:" && cur != nil:
			kb, _ := strconv.ParseFloat(f[1], 64)
			*cur += kb * 1024
		}
	}
	return text, ro
}

func vmRSS(t testing.TB, pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb * 1024
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// `steppe agent logs -f` prints every line of a service once and in order,
// and carries on through an agent restart, saying what happened; Ctrl-C
// ends it cleanly.
func TestAgentLogsFollow(t *testing.T) {
	a := newTestAgent(t, `service "count" {
  command = "/bin/sh"
  args    = ["-c", "i=0; while :; do echo n$i; i=$((i+1)); sleep 0.01; done"]
}
`)
	a.start()
	a.waitFor("count running", 60*time.Second, allRunning(1))

	cmd := exec.Command(steppeBinary(t), "agent", "logs", "count", "-f", "-n", "0")
	cmd.Env = append(os.Environ(), "STEPPE_AGENT_SOCKET="+a.socket)
	stderrPath := filepath.Join(t.TempDir(), "stderr")
	stderr, err := os.Create(stderrPath)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	numbers := make(chan int)
	go func() {
		defer close(numbers)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			// The agent's own lines (started, adopted) are in the log too.
			if n, err := strconv.Atoi(strings.TrimPrefix(sc.Text(), "n")); err == nil && strings.HasPrefix(sc.Text(), "n") {
				numbers <- n
			}
		}
	}()
	// read takes k lines, each the one after the line before but for at
	// most jumps lines that may skip ahead, never back.
	last := -1
	read := func(k, jumps int, what string) {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for i := 0; i < k; i++ {
			select {
			case n, ok := <-numbers:
				if !ok {
					t.Fatalf("%s: the follower ended", what)
				}
				if last >= 0 && n != last+1 {
					if n <= last || jumps == 0 {
						t.Fatalf("%s: line n%d after n%d", what, n, last)
					}
					jumps--
				}
				last = n
			case <-timeout:
				t.Fatalf("%s: %d of %d lines in 30 s", what, i, k)
			}
		}
	}
	read(40, 0, "following")

	a.kill()
	time.Sleep(time.Second) // the follower finds no agent
	a.start()
	// Lines written while no agent ran are not followed: one jump ahead.
	read(60, 1, "following through the agent's restart")

	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	for range numbers {
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("the follower exited with %v after Ctrl-C", err)
	}
	msgs, _ := os.ReadFile(stderrPath)
	for _, want := range []string{"still trying", "the agent answers again", "was reopened"} {
		if !strings.Contains(string(msgs), want) {
			t.Errorf("the follower did not say %q:\n%s", want, msgs)
		}
	}
	t.Logf("the follower said:\n%s", msgs)
	a.stop()
}
