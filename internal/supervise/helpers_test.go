package supervise

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestMain makes the test binary its own exec trampoline and, in a mode
// chosen by environment, a stand-alone agent that tests can SIGKILL.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == ExecArg {
		if err := ExecMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(127)
		}
	}
	if cfg := os.Getenv("STEPPE_TEST_AGENT"); cfg != "" {
		os.Exit(testAgentMain(cfg))
	}
	if cfg := os.Getenv("STEPPE_TEST_ENABLE"); cfg != "" {
		os.Exit(testEnableMain(cfg))
	}
	os.Exit(m.Run())
}

// agentConfig tells a re-executed test binary what to supervise.
type agentConfig struct {
	StateDir     string
	CgroupParent string
	Fallback     bool
	Specs        []Spec
	StatusFile   string // where it writes its Status, refreshed continuously
	// StatusEvery is how often the status file is refreshed (default 20ms).
	StatusEvery time.Duration
	// Once: shut down and exit as soon as every service is ready.
	Once bool
	// DieAfterSpawn: SIGKILL itself right after the Nth main process is
	// cloned (counting every service's), before its record is written,
	// having written the new pid to SpawnedFile.
	DieAfterSpawn int
	SpawnedFile   string
}

// testAgentMain is a minimal agent: Apply the specs, publish Status to a
// file, Shutdown on SIGTERM. Tests kill it with SIGKILL to play a crash.
func testAgentMain(path string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var cfg agentConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	exe, _ := os.Executable()
	illegal := &illegalTransitions{}
	sup, err := New(ctx, Options{StateDir: cfg.StateDir, CgroupParent: cfg.CgroupParent, Fallback: cfg.Fallback, Exec: []string{exe}, Logger: slog.New(illegal)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if cfg.DieAfterSpawn > 0 {
		var spawned atomic.Int32
		sup.afterSpawn = func(_ string, pid int) {
			if int(spawned.Add(1)) == cfg.DieAfterSpawn {
				_ = os.WriteFile(cfg.SpawnedFile, []byte(strconv.Itoa(pid)), 0o600)
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {} // the signal is on its way
			}
		}
	}
	if err := sup.Apply(ctx, cfg.Specs); err != nil {
		fmt.Fprintln(os.Stderr, "apply:", err)
	}
	if cfg.Once {
		var names []string
		for _, sp := range cfg.Specs {
			names = append(names, sp.Name)
		}
		err := sup.WaitReady(ctx, names...)
		if err == nil {
			err = sup.Shutdown(ctx)
		}
		sup.Close()
		if err == nil {
			err = illegal.err()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	if cfg.StatusEvery == 0 {
		cfg.StatusEvery = 20 * time.Millisecond
	}
	t := time.NewTicker(cfg.StatusEvery)
	defer t.Stop()
	for {
		b, _ := json.Marshal(sup.Status())
		_ = os.WriteFile(cfg.StatusFile+".tmp", b, 0o600)
		_ = os.Rename(cfg.StatusFile+".tmp", cfg.StatusFile)
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := sup.Shutdown(sctx)
			cancel()
			sup.Close()
			if err == nil {
				err = illegal.err()
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "shutdown:", err)
				return 1
			}
			return 0
		case <-t.C:
		}
	}
}

// testAgent is a re-executed test binary running testAgentMain.
type testAgent struct {
	t    testing.TB
	cfg  agentConfig
	cmd  *exec.Cmd
	path string
	// cgroup is the cgroup v2 directory the agent is started in; "": the
	// test's own.
	cgroup string
	// prefix goes before the test binary's own arguments (such as the
	// exec trampoline's, to start it in a v1 memory cgroup).
	prefix []string
}

func startAgent(t testing.TB, cfg agentConfig) *testAgent {
	t.Helper()
	return startAgentIn(t, "", cfg)
}

// startAgentWith starts an agent through the test binary run with the
// arguments prefix first, then the binary's path and its own arguments.
func startAgentWith(t testing.TB, prefix []string, cfg agentConfig) *testAgent {
	t.Helper()
	return startAgentPrefixed(t, "", prefix, cfg)
}

// startAgentIn starts an agent in the cgroup v2 directory cgroup.
func startAgentIn(t testing.TB, cgroup string, cfg agentConfig) *testAgent {
	t.Helper()
	return startAgentPrefixed(t, cgroup, nil, cfg)
}

func startAgentPrefixed(t testing.TB, cgroup string, prefix []string, cfg agentConfig) *testAgent {
	t.Helper()
	dir := t.TempDir()
	a := &testAgent{t: t, cfg: cfg, path: filepath.Join(dir, "agent.json"), cgroup: cgroup, prefix: prefix}
	if a.cfg.StatusFile == "" {
		a.cfg.StatusFile = filepath.Join(dir, "status.json")
	}
	b, _ := json.Marshal(a.cfg)
	if err := os.WriteFile(a.path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	a.start()
	return a
}

func (a *testAgent) start() {
	a.t.Helper()
	_ = os.Remove(a.cfg.StatusFile)
	exe, _ := os.Executable()
	args := []string{"-test.run=^$"}
	if len(a.prefix) > 0 {
		args = append(append(append([]string{}, a.prefix...), exe), args...)
	}
	a.cmd = exec.Command(exe, args...)
	a.cmd.Env = append(os.Environ(), "STEPPE_TEST_AGENT="+a.path)
	a.cmd.Stderr = os.Stderr
	if a.cgroup != "" {
		fd, err := syscall.Open(a.cgroup, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != nil {
			a.t.Fatal(err)
		}
		defer syscall.Close(fd)
		a.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	}
	if err := a.cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	a.t.Cleanup(func() {
		if a.cmd.ProcessState == nil {
			_ = a.cmd.Process.Kill()
			_ = a.cmd.Wait()
		}
	})
}

// rewrite writes the agent's config again, for its next start.
func (a *testAgent) rewrite() {
	a.t.Helper()
	b, _ := json.Marshal(a.cfg)
	if err := os.WriteFile(a.path, b, 0o600); err != nil {
		a.t.Fatal(err)
	}
}

func (a *testAgent) kill() {
	a.t.Helper()
	_ = a.cmd.Process.Signal(syscall.SIGKILL)
	_ = a.cmd.Wait()
}

// terminate asks the agent to shut down (stop every service) and waits.
func (a *testAgent) terminate() {
	a.t.Helper()
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	if err := a.cmd.Wait(); err != nil {
		a.t.Errorf("agent shutdown: %v", err)
	}
}

func (a *testAgent) status() []Status {
	data, err := os.ReadFile(a.cfg.StatusFile)
	if err != nil {
		return nil
	}
	var st []Status
	_ = json.Unmarshal(data, &st)
	return st
}

// waitStatus polls the agent's status until cond holds for it.
func (a *testAgent) waitStatus(what string, cond func([]Status) bool) []Status {
	a.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var st []Status
	for time.Now().Before(deadline) {
		st = a.status()
		if st != nil && cond(st) {
			return st
		}
		time.Sleep(20 * time.Millisecond)
	}
	a.t.Fatalf("timeout waiting for %s; status: %+v", what, st)
	return nil
}

func testExec() []string {
	exe, _ := os.Executable()
	return []string{exe}
}

// testOptions gives each test its own state directory and cgroup parent,
// and removes the cgroups (killing what is left in them) at the end, even
// when the test failed.
func testOptions(t testing.TB) Options {
	t.Helper()
	// Absolute (below the v2 mount), so that cleanupCgroups finds it
	// wherever the test runs.
	parent := fmt.Sprintf("/steppe-test/%s-%d", strings.ReplaceAll(t.Name(), "/", "_"), rand.IntN(1e9))
	t.Cleanup(func() { cleanupCgroups(parent) })
	// Registered before newSup's cleanup, so it runs after it: once every
	// actor has ended.
	illegal := &illegalTransitions{}
	t.Cleanup(func() {
		if err := illegal.err(); err != nil {
			t.Error(err)
		}
	})
	return Options{StateDir: shortTempDir(t), CgroupParent: parent, Exec: testExec(), Logger: slog.New(illegal)}
}

// illegalTransitions is a log handler that keeps what the state machine
// reports as an illegal transition, and drops the rest.
type illegalTransitions struct {
	mu   sync.Mutex
	msgs []string
}

func (h *illegalTransitions) Enabled(_ context.Context, l slog.Level) bool {
	return l >= slog.LevelError
}

func (h *illegalTransitions) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "illegal state transition" {
		return nil
	}
	var b strings.Builder
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.mu.Lock()
	h.msgs = append(h.msgs, b.String())
	h.mu.Unlock()
	return nil
}

func (h *illegalTransitions) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *illegalTransitions) WithGroup(string) slog.Handler      { return h }

// err lists the illegal transitions seen, nil if none.
func (h *illegalTransitions) err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.msgs) == 0 {
		return nil
	}
	return fmt.Errorf("illegal state transitions:\n%s", strings.Join(h.msgs, "\n"))
}

// shortTempDir keeps notify socket paths below the 107-byte limit.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func cleanupCgroups(parent string) {
	m, err := findMounts()
	if err != nil {
		return
	}
	var roots []string
	if m.v2 != "" {
		roots = append(roots, filepath.Join(m.v2, parent))
	}
	if m.memoryV1 != "" {
		roots = append(roots, filepath.Join(m.memoryV1, parent))
	}
	for _, root := range roots {
		ents, _ := os.ReadDir(root)
		for _, e := range ents {
			if e.IsDir() {
				dir := filepath.Join(root, e.Name())
				if strings.Contains(root, "memory") && m.v2 != "" && !strings.HasPrefix(root, m.v2) {
					for _, p := range must(cgProcs(dir)) {
						_ = syscall.Kill(p, syscall.SIGKILL)
					}
				} else {
					_ = cgKill(dir)
				}
				_ = cgRemove(dir)
			}
		}
		_ = cgRemove(root)
		_ = syscall.Rmdir(filepath.Dir(root)) // the shared steppe-test, if empty
	}
}

func must[T any](v T, _ error) T { return v }

func newSup(t testing.TB, opts Options) *Supervisor {
	t.Helper()
	sup, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := sup.Shutdown(ctx); err != nil && err != ErrClosed {
			t.Logf("shutdown: %v", err)
		}
		sup.Close()
	})
	return sup
}

func statusOf(t testing.TB, sup *Supervisor, name string) Status {
	t.Helper()
	for _, st := range sup.Status() {
		if st.Name == name {
			return st
		}
	}
	t.Fatalf("no status for %q", name)
	return Status{}
}

// waitFor polls cond until it holds or a generous deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timeout waiting for %s", what)
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// listeners counts the TCP sockets listening on port (IPv4 and IPv6).
func listeners(port int) int {
	n := 0
	hexPort := fmt.Sprintf(":%04X", port)
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(data)) {
			fs := strings.Fields(line)
			if len(fs) > 3 && strings.HasSuffix(fs[1], hexPort) && fs[3] == "0A" {
				n++
			}
		}
	}
	return n
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func sh(name, script string) Spec {
	return Spec{Name: name, Command: "/bin/sh", Args: []string{"-c", script}}
}

func pidsOf(st []Status) map[string]int {
	m := map[string]int{}
	for _, s := range st {
		m[s.Name] = s.PID
	}
	return m
}

func itoa(n int) string { return strconv.Itoa(n) }
