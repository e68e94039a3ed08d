package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/testenv"
)

// selfBinaries are real steppe binaries stamped 0.1.0 and 0.2.0, and two
// broken ones (testdata/brokensteppe) that pass the version check: 0.3.0
// exits 1 as the agent, 0.4.0 never answers.
type selfBinaries struct{ v1, v2, exit, hang string }

var buildSelf = sync.OnceValues(func() (selfBinaries, error) {
	dir, err := os.MkdirTemp("", "steppe-selfupgrade-bin-")
	if err != nil {
		return selfBinaries{}, err
	}
	b := selfBinaries{
		v1: filepath.Join(dir, "steppe-0.1.0"), v2: filepath.Join(dir, "steppe-0.2.0"),
		exit: filepath.Join(dir, "steppe-0.3.0"), hang: filepath.Join(dir, "steppe-0.4.0"),
	}
	builds := []struct{ out, pkg, ldflags string }{
		{b.v1, "../../cmd/steppe", "-X main.version=0.1.0"},
		{b.v2, "../../cmd/steppe", "-X main.version=0.2.0"},
		{b.exit, "./testdata/brokensteppe", "-X main.version=0.3.0 -X main.mode=exit"},
		{b.hang, "./testdata/brokensteppe", "-X main.version=0.4.0 -X main.mode=hang"},
	}
	for _, bd := range builds {
		cmd := exec.Command("go", "build", "-ldflags", bd.ldflags, "-o", bd.out, bd.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return b, fmt.Errorf("go build %s: %v\n%s", bd.pkg, err, out)
		}
	}
	return b, nil
})

// selfMachine is a machine whose agent runs from its own copy of steppe
// 0.1.0, as a real process pulling bundles from a directory store that
// name steppe artifacts of a signed artifact store. With init, the test
// plays the init: it starts the agent again whenever it exits.
type selfMachine struct {
	t        *testing.T
	bins     selfBinaries
	dir      string
	bin      string // the machine's binary
	cfg      string
	pidfile  string
	logPath  string
	client   *Client
	store    string // bundles
	arts     string // artifacts
	key      bundle.PrivateKey
	version  uint64
	byInit   bool
	mu       sync.Mutex
	starts   int
	stopInit chan struct{}
	initDone chan struct{}
}

func newSelfMachine(t *testing.T, byInit bool) *selfMachine {
	t.Helper()
	testenv.NeedRoot(t, "the agent (cgroups)")
	bins, err := buildSelf()
	if err != nil {
		t.Fatal(err)
	}
	m := &selfMachine{t: t, bins: bins, dir: t.TempDir(), byInit: byInit}
	m.bin = filepath.Join(m.dir, "bin", "steppe")
	m.pidfile = filepath.Join(m.dir, "agent.pid")
	m.logPath = filepath.Join(m.dir, "agent.log")
	m.store = filepath.Join(m.dir, "bundles")
	m.arts = filepath.Join(m.dir, "artifacts")
	if err := os.MkdirAll(filepath.Dir(m.bin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.CopyFile(bins.v1, m.bin, 0o755); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(m.dir, "cache")
	for v, b := range map[string]string{"0.2.0": bins.v2, "0.3.0": bins.exit, "0.4.0": bins.hang} {
		if _, err := artifact.Publish(cache, m.arts, SteppeProduct, v, b); err != nil {
			t.Fatal(err)
		}
	}
	if m.key, err = bundle.GenerateKey(); err != nil {
		t.Fatal(err)
	}
	_, pub, err := bundle.WriteKeyPair(filepath.Join(m.dir, "bundle"), m.key)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(m.dir, "agent.sock")
	m.client = NewClient(sock)
	m.cfg = filepath.Join(m.dir, "agent.hcl")
	cfg := fmt.Sprintf(`
agent {
  state_dir       = %q
  socket          = %q
  cgroup          = %q
  upgrade_timeout = "4s"
}
machine {
  name    = "m1"
  address = "127.0.0.1"
}
bundle {
  store          = %q
  cluster        = "c1"
  role           = "m1"
  keys           = [%q]
  wait           = "1s"
  health_timeout = "10s"
}
artifacts {
  keys = [%q]
}
`, filepath.Join(m.dir, "state"), sock, fmt.Sprintf("/steppe-test-self-%d", time.Now().UnixNano()), m.store, pub, filepath.Join(m.arts, artifact.StoreKeyFile))
	if err := os.WriteFile(m.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	m.publish("") // the first release: a service, no steppe artifact
	m.start()
	t.Cleanup(m.stop)
	return m
}

func (m *selfMachine) command() *exec.Cmd {
	args := []string{"agent", "-config", m.cfg, "-pidfile", m.pidfile}
	if m.byInit {
		args = append(args, "-restarted-by-init")
	}
	cmd := exec.Command(m.bin, args...)
	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		m.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	return cmd
}

// start runs the agent detached, as the local provider does; with an init,
// a loop that starts it again a second after it exits, as runsv does.
func (m *selfMachine) start() {
	m.t.Helper()
	if !m.byInit {
		cmd := m.command()
		if err := cmd.Start(); err != nil {
			m.t.Fatal(err)
		}
		go cmd.Wait()
		return
	}
	m.stopInit, m.initDone = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(m.initDone)
		for {
			cmd := m.command()
			if err := cmd.Start(); err != nil {
				m.t.Error(err)
				return
			}
			m.mu.Lock()
			m.starts++
			m.mu.Unlock()
			exited := make(chan struct{})
			go func() { cmd.Wait(); close(exited) }()
			select {
			case <-m.stopInit:
				_ = cmd.Process.Signal(syscall.SIGTERM)
				<-exited
				return
			case <-exited:
			}
			select {
			case <-m.stopInit:
				return
			case <-time.After(time.Second):
			}
		}
	}()
}

// stop ends the agent (SIGTERM stops its services) and, with an init, the
// init first.
func (m *selfMachine) stop() {
	if m.byInit {
		close(m.stopInit)
		<-m.initDone
	}
	if pid := m.agentPID(); pid > 0 {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		for i := 0; i < 300 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if m.t.Failed() {
		b, _ := os.ReadFile(m.logPath)
		m.t.Logf("agent log:\n%s", b)
	}
}

func (m *selfMachine) agentPID() int {
	b, _ := os.ReadFile(m.pidfile)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// publish publishes the next release: the service hello, and a steppe
// artifact of version steppe unless "".
func (m *selfMachine) publish(steppe string) {
	m.t.Helper()
	m.version++
	dir := m.t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "services"), 0o755); err != nil {
		m.t.Fatal(err)
	}
	svc := "service \"hello\" {\n  command = \"/bin/sleep\"\n  args = [\"3600\"]\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "services", "steppe.hcl"), []byte(svc), 0o644); err != nil {
		m.t.Fatal(err)
	}
	now := time.Now()
	man := bundle.Manifest{Cluster: "c1", Role: "m1", Version: m.version, Created: now.Add(-time.Minute), Expires: now.Add(time.Hour)}
	if steppe != "" {
		man.Artifacts = []bundle.Artifact{{Product: SteppeProduct, Version: steppe, Store: "file://" + m.arts}}
	}
	var buf bytes.Buffer
	if _, err := bundle.Build(&buf, dir, man, &m.key); err != nil {
		m.t.Fatal(err)
	}
	if _, err := bundle.NewDirStore(m.store).Publish(context.Background(), &buf, bundle.PublishOptions{}); err != nil {
		m.t.Fatal(err)
	}
}

// wait polls the agent's status until ok holds.
func (m *selfMachine) wait(what string, timeout time.Duration, ok func(StatusReport) bool) StatusReport {
	m.t.Helper()
	deadline := time.Now().Add(timeout)
	var last StatusReport
	var lastErr error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := m.client.Status(ctx)
		cancel()
		if err == nil {
			last, lastErr = st, nil
			if ok(st) {
				return st
			}
		} else {
			lastErr = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	m.t.Fatalf("timed out after %v waiting for %s: last status %+v (err %v)", timeout, what, last, lastErr)
	return last
}

func hello(st StatusReport) (pid, restarts int, ok bool) {
	for _, s := range st.Services {
		if s.Name == "hello" && s.PID > 0 && s.Ready {
			return s.PID, s.Restarts, true
		}
	}
	return 0, 0, false
}

func (m *selfMachine) sha(path string) string {
	m.t.Helper()
	s, err := fileSHA256(path)
	if err != nil {
		m.t.Fatal(err)
	}
	return s
}

// upgrade moves the machine to steppe 0.2.0 and checks that nothing but
// the agent's binary changed: same agent pid, same service, no restart.
func (m *selfMachine) upgrade() (agentPID, helloPID int) {
	m.t.Helper()
	st := m.wait("steppe 0.1.0 running hello", 30*time.Second, func(st StatusReport) bool {
		_, _, ok := hello(st)
		return ok && st.Agent.Version == "0.1.0"
	})
	agentPID, helloPID, _ = st.Agent.PID, 0, 0
	helloPID, _, _ = hello(st)
	if st.Agent.Binary != m.bin {
		m.t.Errorf("the agent says it runs %s, want %s", st.Agent.Binary, m.bin)
	}
	start := time.Now()
	m.publish("0.2.0")
	st = m.wait("steppe 0.2.0", 30*time.Second, func(st StatusReport) bool {
		return st.Agent.Version == "0.2.0" && st.Agent.SelfUpgrade != nil && st.Agent.SelfUpgrade.State == TrialCommitted
	})
	m.t.Logf("self-upgrade 0.1.0 → 0.2.0 committed %v after the publish", time.Since(start).Round(time.Millisecond))
	if st.Agent.PID != agentPID {
		m.t.Errorf("the agent's pid changed from %d to %d: the exec should keep it", agentPID, st.Agent.PID)
	}
	if pid, restarts, ok := hello(st); !ok || pid != helloPID || restarts != 0 {
		m.t.Errorf("hello after the self-upgrade: pid %d (was %d), %d restarts, ready %v: want it untouched", pid, helloPID, restarts, ok)
	}
	if m.sha(m.bin) != m.sha(m.bins.v2) || m.sha(m.bin+".prev") != m.sha(m.bins.v1) {
		m.t.Errorf("after the self-upgrade %s is not steppe 0.2.0, or %s.prev not 0.1.0", m.bin, m.bin)
	}
	m.waitNoWatchdog()
	return agentPID, helloPID
}

// rollback publishes a broken steppe and waits until the agent says it was
// rolled back, running 0.2.0 with hello untouched.
func (m *selfMachine) rollback(version, why string, helloPID int) StatusReport {
	m.t.Helper()
	start := time.Now()
	m.publish(version)
	st := m.wait("the rollback of steppe "+version, 40*time.Second, func(st StatusReport) bool {
		su := st.Agent.SelfUpgrade
		_, _, adopted := hello(st)
		return adopted && st.Agent.Version == "0.2.0" && su != nil && su.Version == version && su.State == TrialRolledBack
	})
	m.t.Logf("steppe %s rolled back %v after the publish: %s", version, time.Since(start).Round(time.Millisecond), st.Agent.SelfUpgrade.Error)
	if !strings.Contains(st.Agent.SelfUpgrade.Error, why) {
		m.t.Errorf("the rollback of %s says %q, want it to say %q", version, st.Agent.SelfUpgrade.Error, why)
	}
	if pid, restarts, ok := hello(st); !ok || pid != helloPID || restarts != 0 {
		m.t.Errorf("hello after the rollback of %s: pid %d (was %d), %d restarts, ready %v: want it untouched", version, pid, helloPID, restarts, ok)
	}
	if m.sha(m.bin) != m.sha(m.bins.v2) {
		m.t.Errorf("after the rollback of %s, %s is not steppe 0.2.0", version, m.bin)
	}
	if pid := m.agentPID(); pid != st.Agent.PID {
		m.t.Errorf("the pidfile says %d, the agent answering is %d", pid, st.Agent.PID)
	}
	m.waitNoWatchdog()
	// Not tried again: a later look still finds 0.2.0 and the same agent.
	time.Sleep(2 * time.Second)
	again := m.wait("the agent still on 0.2.0", 10*time.Second, func(s StatusReport) bool { return true })
	if again.Agent.PID != st.Agent.PID || again.Agent.Version != "0.2.0" {
		m.t.Errorf("after the rollback of %s the agent moved on: pid %d → %d, version %s", version, st.Agent.PID, again.Agent.PID, again.Agent.Version)
	}
	return st
}

// waitNoWatchdog waits until no watchdog process is left (not even a zombie).
func (m *selfMachine) waitNoWatchdog() {
	m.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []string
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			if err == nil && bytes.Contains(b, []byte(WatchArg+"\x00"+filepath.Join(m.dir, "state"))) {
				left = append(left, e.Name())
			}
			if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && parentOf(st) == m.agentPID() && bytes.Contains(st, []byte(") Z ")) {
				left = append(left, e.Name()+" (zombie)")
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			m.t.Errorf("watchdog processes left: %v", left)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestSelfUpgrade: an agent without an init moves to a new steppe binary
// by exec (same pid, its service untouched); a new binary that exits at
// once, and one that never answers, are rolled back by the watchdog of the
// previous binary, which then runs the previous binary as the agent.
func TestSelfUpgrade(t *testing.T) {
	m := newSelfMachine(t, false)
	agentPID, helloPID := m.upgrade()
	st := m.rollback("0.3.0", "exited before it reported healthy", helloPID)
	if st.Agent.PID == agentPID {
		t.Errorf("the agent after the rollback has the pid of the broken one (%d): the watchdog should run it", agentPID)
	}
	m.rollback("0.4.0", "did not report healthy", helloPID)
}

// TestSelfUpgradeInit: the same under an init that restarts the agent:
// the watchdog puts the previous binary back and leaves the restart to
// the init (one agent at a time). And a new binary restarted after it died
// in its trial, with no watchdog left, rolls itself back as it starts.
func TestSelfUpgradeInit(t *testing.T) {
	m := newSelfMachine(t, true)
	_, helloPID := m.upgrade()
	for _, c := range []struct{ version, why string }{
		{"0.3.0", "exited before it reported healthy"},
		{"0.4.0", "did not report healthy"},
	} {
		m.mu.Lock()
		before := m.starts
		m.mu.Unlock()
		m.rollback(c.version, c.why, helloPID)
		m.mu.Lock()
		after := m.starts
		m.mu.Unlock()
		if after <= before {
			t.Errorf("after the rollback of %s the init started no agent: the watchdog ran it instead", c.version)
		}
		checkOneAgent(t, m)
	}

	// A trial cut short with no watchdog: steppe 0.2.0 recorded as on
	// trial (0.1.0 kept as the previous binary), started again by the
	// init, must put 0.1.0 back and run it.
	st := m.wait("the agent", 10*time.Second, func(StatusReport) bool { return true })
	if err := atomicfile.CopyFile(m.bins.v1, m.bin+".prev", 0o755); err != nil {
		t.Fatal(err)
	}
	prev, err := loadTrial(filepath.Join(m.dir, "state"))
	if err != nil || prev == nil || len(prev.Failed) != 2 {
		t.Fatalf("the trial record after two rollbacks: %+v, %v; want two failed binaries", prev, err)
	}
	tr := &trial{State: TrialStarted, Failed: prev.Failed, Version: "0.2.0", From: "0.1.0", SHA256: m.sha(m.bins.v2), Binary: m.bin, Previous: m.bin + ".prev",
		Args: []string{m.bin, "agent", "-config", m.cfg, "-pidfile", m.pidfile, "-restarted-by-init"}, PID: st.Agent.PID}
	if err := saveTrial(filepath.Join(m.dir, "state"), tr); err != nil {
		t.Fatal(err)
	}
	_ = syscall.Kill(st.Agent.PID, syscall.SIGKILL)
	got := m.wait("steppe 0.1.0 after the cut trial", 30*time.Second, func(s StatusReport) bool {
		_, _, adopted := hello(s)
		return adopted && s.Agent.Version == "0.1.0" && s.Agent.SelfUpgrade != nil && s.Agent.SelfUpgrade.State == TrialRolledBack
	})
	if su := got.Agent.SelfUpgrade; su.Version != "0.2.0" || !strings.Contains(su.Error, "died before it reported healthy (restarted") {
		t.Errorf("the agent's own rollback says %+v, want steppe 0.2.0 died before it reported healthy (restarted...)", su)
	}
	t.Logf("the restarted 0.2.0 rolled itself back: %s", got.Agent.SelfUpgrade.Error)
	if pid, restarts, ok := hello(got); !ok || pid != helloPID || restarts != 0 {
		t.Errorf("hello after the agent's own rollback: pid %d (was %d), %d restarts, ready %v", pid, helloPID, restarts, ok)
	}
	if m.sha(m.bin) != m.sha(m.bins.v1) {
		t.Errorf("%s is not steppe 0.1.0 after the rollback", m.bin)
	}
}

// checkOneAgent fails unless exactly one process runs the machine's agent.
func checkOneAgent(t *testing.T, m *selfMachine) {
	t.Helper()
	var pids []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte("\x00agent\x00-config\x00"+m.cfg+"\x00")) {
			if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && !bytes.Contains(st, []byte(") Z ")) {
				pids = append(pids, e.Name())
			}
		}
	}
	if len(pids) != 1 {
		t.Errorf("agents of the machine running: %v, want one", pids)
	}
}
