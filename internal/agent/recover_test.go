package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/supervise"
)

func readFixture(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("testdata/nomad-corrupt-state.log")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimRight(string(b), "\n"), "\n")
}

// The log of a real Nomad 1.10.5 client started on a corrupt state.db
// (testdata, from the service log the agent keeps): the run that ended
// is the one of pid 16962, its panic is recognised; other failures are not.
func TestNomadStateFailure(t *testing.T) {
	lines := readFixture(t)
	run := lastRun(lines)
	if len(run) == 0 || !strings.Contains(run[len(run)-1], "main process 16962 ended") || strings.Contains(strings.Join(run, "\n"), "16932") {
		t.Fatalf("last run: %q", run)
	}
	reason, ok := nomadStateFailure(run)
	if !ok || reason != "panic: assertion failed: Page expected to be: 2, but self identifies as 17275436393656397278" {
		t.Errorf("corrupt state: %q %v", reason, ok)
	}
	for _, c := range []struct {
		name string
		run  []string
		want bool
	}{
		{"open", []string{`==> Error starting agent: client setup failed: failed to initialize client: failed to open state database: invalid database`}, true},
		{"restore", []string{`[ERROR] client: Nomad is unable to start due to corrupt state. The safest way to proceed is to manually stop running task processes and remove Nomad's state and alloc directories before restarting.`}, true},
		// Another Nomad holds the database: not corruption.
		{"busy", []string{`==> Error starting agent: client setup failed: failed to initialize client: failed to open state database: timed out while opening database, is another Nomad process accessing data_dir /x?`}, false},
		// A panic elsewhere, a port in use: not the state's.
		{"other panic", []string{"panic: runtime error: invalid memory address", "github.com/hashicorp/nomad/client/allocrunner.(*allocRunner).Run()"}, false},
		{"bind", []string{`==> Error starting agent: failed to create HTTP server: listen tcp 127.0.0.1:4646: bind: address already in use`}, false},
	} {
		if _, ok := nomadStateFailure(c.run); ok != c.want {
			t.Errorf("%s: recognised %v, want %v", c.name, ok, c.want)
		}
	}
}

// fakeNomad is a program that stands for a Nomad client (the real one is
// in e2e/TestRecoverCorruptClient): "agent -config=FILE"; on a state.db
// that holds CORRUPT it prints what the real Nomad printed on one and
// exits 2 (the fixture without the supervisor's lines); otherwise it writes its identity and state, mounts a tmpfs as
// a task's secrets dir, starts a "task" that outlives it (its pid in
// task.pid) and runs.
const fakeNomad = `#!/bin/sh
data=%[1]s
if grep -q CORRUPT "$data/client/state.db" 2>/dev/null; then grep -v " steppe: " %[2]s; exit 2; fi
mkdir -p "$data/client" "$data/alloc/a1/serve/secrets"
[ -f "$data/client/client-id" ] || echo 94e6c02e-b61c-d175-273e-7438e68a14ca > "$data/client/client-id"
[ -f "$data/client/secret-id" ] || echo 0b6ea3f4-7d8e-4c3b-9a51-3f1f2a9c1e77 > "$data/client/secret-id"
echo fine > "$data/client/state.db"
mountpoint -q "$data/alloc/a1/serve/secrets" || mount -t tmpfs -o size=1m tmpfs "$data/alloc/a1/serve/secrets"
setsid sleep 3600 </dev/null >/dev/null 2>&1 &
echo $! > %[3]s
exec sleep 3600
`

// A Nomad client that cannot open its state is recovered by the agent: it
// is stopped, the task it left killed, its mount removed, client/ and
// alloc/ moved aside, its identity put back, and it runs again; status,
// the agent log and the metrics say so. A Nomad server crashing with the
// same panic is left to its restart policy.
func TestRecoverNomadClientState(t *testing.T) {
	dir := t.TempDir()
	fixture, err := filepath.Abs("testdata/nomad-corrupt-state.log")
	if err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "nomad")
	taskPID := filepath.Join(dir, "task.pid")
	prog := filepath.Join(dir, "nomad-bin")
	if err := os.WriteFile(prog, []byte(fmt.Sprintf(fakeNomad, data, fixture, taskPID)), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "client.json")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`{"data_dir": %q, "client": {"enabled": true}}`, data)), 0o600); err != nil {
		t.Fatal(err)
	}
	// A server's data dir with the same program: its crash is not ours.
	serverData := filepath.Join(dir, "server")
	serverProg := filepath.Join(dir, "server-bin")
	if err := os.WriteFile(serverProg, []byte(fmt.Sprintf(fakeNomad, serverData, fixture, filepath.Join(dir, "server-task.pid"))), 0o755); err != nil {
		t.Fatal(err)
	}
	serverCfg := filepath.Join(dir, "server.json")
	if err := os.WriteFile(serverCfg, []byte(fmt.Sprintf(`{"data_dir": %q, "server": {"enabled": true}}`, serverData)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(serverData, "client"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(serverData, "client", "state.db"), []byte("CORRUPT"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = unix.Unmount(filepath.Join(data, "alloc", "a1", "serve", "secrets"), unix.MNT_DETACH)
	})

	m := runMetricsAgent(t, fmt.Sprintf(`
service "nomad" {
  command     = %q
  args        = ["agent", "-config=%s"]
  stop_mode   = "main"
  backoff_min = "10ms"
}
service "nomad-server" {
  command     = %q
  args        = ["agent", "-config=%s"]
  backoff_min = "10ms"
}
`, prog, cfg, serverProg, serverCfg))
	// Runs before the agent stops: the task a client leaves (stop_mode
	// main) would outlive it.
	t.Cleanup(func() {
		if b, err := os.ReadFile(taskPID); err == nil {
			var pid int
			if _, err := fmt.Sscan(string(b), &pid); err == nil && pid > 0 {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	})
	ctx := context.Background()
	waitFor(t, "the client running", 20*time.Second, func() bool {
		_, err := os.Stat(taskPID)
		return err == nil && serviceState(t, m, "nomad").State == supervise.StateRunning
	})
	pidB, _ := os.ReadFile(taskPID)
	var task int
	if _, err := fmt.Sscan(string(pidB), &task); err != nil || task == 0 || !running(task) {
		t.Fatalf("the fake client's task (pid %q) does not run", pidB)
	}

	if err := m.client.Control(ctx, "nomad", "stop"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "client", "state.db"), []byte("CORRUPT"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := m.client.Control(ctx, "nomad", "start"); err != nil {
		t.Fatal(err)
	}
	var rec Recovery
	waitFor(t, "the recovery", 20*time.Second, func() bool {
		st, err := m.client.Status(ctx)
		if err != nil || len(st.Recoveries) == 0 {
			return false
		}
		rec = st.Recoveries[0]
		return serviceState(t, m, "nomad").State == supervise.StateRunning
	})
	t.Logf("recovery: %+v", rec)
	if rec.Service != "nomad" || rec.Error != "" || !rec.KeptIdentity || rec.Killed != 1 || rec.Unmounted != 1 ||
		!strings.HasPrefix(rec.Reason, "panic: assertion failed") || !strings.HasPrefix(rec.MovedTo, data+".recovered/") {
		t.Errorf("recovery %+v: want nomad, no error, identity kept, 1 task killed, 1 mount removed, bbolt's panic, under %s.recovered", rec, data)
	}
	if b, err := os.ReadFile(filepath.Join(rec.MovedTo, "client", "state.db")); err != nil || string(b) != "CORRUPT" {
		t.Errorf("the corrupt state.db is not kept aside: %q %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(rec.MovedTo, "alloc", "a1")); err != nil {
		t.Errorf("alloc/ not kept aside: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(data, "client", "client-id")); err != nil || strings.TrimSpace(string(b)) != "94e6c02e-b61c-d175-273e-7438e68a14ca" {
		t.Errorf("node identity not kept: %q %v", b, err)
	}
	if running(task) {
		t.Errorf("the task (pid %d) the broken client left still runs", task)
	}
	ms, _ := supervise.Mounts()
	for _, mt := range ms {
		if strings.HasPrefix(mt.Point, rec.MovedTo) {
			t.Errorf("a mount is left under the moved state: %s", mt.Point)
		}
	}
	if !strings.Contains(m.logs.String(), "nomad client state recovered: moved to "+rec.MovedTo) {
		t.Errorf("the agent log does not say where the state went")
	}
	m.waitMetrics("the recovery counted", 10*time.Second, func(s metricSet) bool {
		return s.is(1, "steppe_agent_state_recoveries_total", "service", "nomad") &&
			s.is(0, "steppe_agent_state_recoveries_total", "service", "nomad-server")
	})
	// The server crash-loops on its "corrupt" state and is left alone.
	if s := serviceState(t, m, "nomad-server"); s.Restarts == 0 {
		t.Errorf("the server never crashed: %+v", s)
	}
	if b, err := os.ReadFile(filepath.Join(serverData, "client", "state.db")); err != nil || string(b) != "CORRUPT" {
		t.Errorf("the server's data dir was touched: %q %v", b, err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(data)); len(ents) > 0 {
		for _, e := range ents {
			if e.Name() == "server.recovered" {
				t.Errorf("the server's state was moved aside")
			}
		}
	}
}

// running: the process exists and is not a zombie (a killed task whose
// parent died is the agent's to reap, as the machine's subreaper).
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

func serviceState(t *testing.T, m *metricsAgent, name string) supervise.Status {
	t.Helper()
	st, err := m.client.Status(context.Background())
	if err != nil {
		return supervise.Status{}
	}
	for _, s := range st.Services {
		if s.Name == name {
			return s
		}
	}
	return supervise.Status{}
}

// Only the newest are kept; the names are times, the oldest sort first.
func TestPruneRecovered(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"20261202T030001.000Z", "20261202T030003.000Z", "20261202T030002.000Z", "20261202T030004.000Z"} {
		if err := os.MkdirAll(filepath.Join(dir, n, "client"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := pruneRecovered(dir, 2); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, " ") != "20261202T030003.000Z 20261202T030004.000Z" {
		t.Errorf("kept %q", got)
	}
	if !isUUID("94e6c02e-b61c-d175-273e-7438e68a14ca") || isUUID("94e6c02e-b61c-d175-273e-7438e68a14c") || isUUID("\xde\xad\xbe\xef") {
		t.Errorf("isUUID")
	}
}
