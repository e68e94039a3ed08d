package supervise

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/testenv"
)

// The dependent never starts before its dependency answers: it connects
// to the dependency's port as its first act and would exit 1 otherwise.
func TestReadinessGating(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	port := itoa(freePort(t))
	web := Spec{
		Name:    "web",
		Command: "/bin/sh",
		Args:    []string{"-c", "sleep 1; exec /usr/bin/python3 -m http.server " + port + " --bind 127.0.0.1"},
		Ready:   &Readiness{HTTP: "http://127.0.0.1:" + port + "/"},
	}
	dep := Spec{
		Name:    "dependent",
		Command: "/usr/bin/python3",
		Args:    []string{"-c", "import socket, time; socket.create_connection(('127.0.0.1', " + port + ")); time.sleep(1000)"},
		After:   []string{"web"},
		Restart: RestartNever,
	}
	tcpDep := Spec{
		Name:    "tcp-dependent",
		Command: "/usr/bin/python3",
		Args:    []string{"-c", "import socket, time; socket.create_connection(('127.0.0.1', " + port + ")); time.sleep(1000)"},
		After:   []string{"dependent"},
		Restart: RestartNever,
		Ready:   &Readiness{TCP: "127.0.0.1:" + port},
	}
	if err := sup.Apply(ctx, []Spec{tcpDep, dep, web}); err != nil {
		t.Fatal(err)
	}
	if st := statusOf(t, sup, "dependent"); st.State != StateWaiting || st.PID != 0 {
		t.Fatalf("dependent before web is ready: %+v", st)
	}
	if err := sup.WaitReady(ctx, "web", "dependent", "tcp-dependent"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"dependent", "tcp-dependent"} {
		if st := statusOf(t, sup, n); st.State != StateRunning || st.LastExit != "" || st.Restarts != 0 {
			t.Fatalf("%s: %+v", n, st)
		}
	}
}

func TestReadinessTimeout(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	port := itoa(freePort(t))
	spec := Spec{
		Name: "deaf", Command: "/bin/sleep", Args: []string{"1000"},
		Restart: RestartNever,
		Ready:   &Readiness{TCP: "127.0.0.1:" + port, Timeout: time.Second, Interval: 20 * time.Millisecond},
	}
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	var st Status
	waitFor(t, "readiness failure", func() bool {
		st = statusOf(t, sup, "deaf")
		return st.State == StateFailed
	})
	// The last probe's own error ends the message: refused, or, when the
	// machine is so loaded that the last dial outlived the deadline, a
	// timeout of that dial (CI saw it under -race).
	want := "readiness: timeout after 1s: tcp 127.0.0.1:" + port + ": "
	if !strings.HasPrefix(st.LastError, want) || !strings.HasSuffix(st.LastError, "connection refused") && !strings.HasSuffix(st.LastError, "i/o timeout") || st.Processes != 0 {
		t.Fatalf("status %+v, want last error %q + connection refused (or i/o timeout) and no process", st, want)
	}
}

// sd_notify: a small daemon announces READY=1 and a STATUS= on
// NOTIFY_SOCKET after a while; until then the service is starting.
func TestNotifyReadiness(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	gate := filepath.Join(t.TempDir(), "go")
	script := `
import os, socket, time
while not os.path.exists(` + strconv.Quote(gate) + `):
    time.sleep(0.01)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=serving", os.environ["NOTIFY_SOCKET"])
time.sleep(1000)
`
	spec := Spec{Name: "notifier", Command: "/usr/bin/python3", Args: []string{"-c", script}, Ready: &Readiness{Notify: true}}
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if st := statusOf(t, sup, "notifier"); st.State != StateStarting || st.Ready {
		t.Fatalf("before READY=1: %+v", st)
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "notifier"); err != nil {
		t.Fatal(err)
	}
	if st := statusOf(t, sup, "notifier"); st.State != StateRunning || st.Message != "serving" {
		t.Fatalf("after READY=1: %+v", st)
	}
}

func readStarts(t *testing.T, path string) []time.Time {
	data, _ := os.ReadFile(path)
	var out []time.Time
	for f := range strings.FieldsSeq(string(data)) {
		n, err := strconv.ParseInt(f, 10, 64)
		if err == nil {
			out = append(out, time.Unix(0, n))
		}
	}
	return out
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Crash loop: the delays grow, the supervisor stays nearly idle, and a
// Restart during a long backoff is honoured at once.
func TestCrashLoop(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	dir := t.TempDir()
	starts := filepath.Join(dir, "starts")
	slow := filepath.Join(dir, "slow")
	loop := sh("loop", "date +%s%N >> "+starts+"; exit 1")
	loop.BackoffMax = 10 * time.Second
	long := sh("long", "date +%s%N >> "+slow+"; exit 1")
	long.BackoffMin = time.Minute
	long.BackoffMax = time.Hour

	cpu0, wall0 := cpuTime(), time.Now()
	if err := sup.Apply(ctx, []Spec{loop, long}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	cpu, wall := cpuTime()-cpu0, time.Since(wall0)
	// Generous for a loaded machine and the race detector: a busy loop
	// would use the whole 3 s.
	if cpu > wall/10 {
		t.Errorf("supervisor used %v CPU in %v of crash loop", cpu, wall)
	}
	ts := readStarts(t, starts)
	if len(ts) < 4 || len(ts) > 8 {
		t.Fatalf("%d starts in 3s: %v", len(ts), ts)
	}
	var gaps []time.Duration
	for i := 1; i < len(ts); i++ {
		gaps = append(gaps, ts[i].Sub(ts[i-1]))
	}
	t.Logf("crash loop: %v CPU in %v; gaps between starts %v", cpu, wall.Round(time.Millisecond), gaps)
	// The first restart is immediate, then each wait is longer.
	if gaps[0] > 100*time.Millisecond {
		t.Errorf("first restart after %v, want at once", gaps[0])
	}
	for i := 2; i < len(gaps); i++ {
		if gaps[i] <= gaps[i-1] {
			t.Errorf("delays do not grow: %v", gaps)
		}
	}
	// The check may fall on a restart (the 7th is due 2.6 to 3 s in): the
	// run it catches ends at once.
	var st Status
	waitFor(t, "loop in backoff", func() bool { st = statusOf(t, sup, "loop"); return st.State == StateBackoff })
	if n := len(readStarts(t, starts)); st.State != StateBackoff || st.NextStart.IsZero() || st.Restarts < len(ts)-1 || st.Restarts > n || st.LastExit != "exit 1" {
		t.Errorf("loop status %+v", st)
	}

	// "long" waits a minute after its first crash; Restart starts it now.
	ls := statusOf(t, sup, "long")
	if ls.State != StateBackoff || time.Until(ls.NextStart) < 50*time.Second {
		t.Fatalf("long: %+v", ls)
	}
	n := len(readStarts(t, slow))
	if err := sup.Restart(ctx, "long"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "restart during backoff", func() bool { return len(readStarts(t, slow)) == n+1 })
}

func TestLogs(t *testing.T) {
	opts := testOptions(t)
	sup := newSup(t, opts)
	ctx := ctxT(t)
	talk := sh("talk", `i=0; while [ $i -lt 300 ]; do echo line$i; echo err$i >&2; i=$((i+1)); done; exec sleep 1000`)
	chatty := sh("chatty", `while :; do echo 0123456789012345678901234567890123456789012345678901234567890123456789; sleep 0.01; done`)
	chatty.LogMaxBytes = 1000
	chatty.LogKeep = 2
	if err := sup.Apply(ctx, []Spec{talk, chatty}); err != nil {
		t.Fatal(err)
	}
	// The agent's own "started" line may come after the child's output.
	childLines := func(n int) []string {
		l, _ := sup.Logs("talk", n+1)
		l = slices.DeleteFunc(l, func(s string) bool { return strings.Contains(s, " steppe: ") })
		return l[max(0, len(l)-n):]
	}
	waitFor(t, "300 lines", func() bool {
		l := childLines(2)
		return len(l) == 2 && l[1] == "err299"
	})
	got := childLines(4)
	if !slices.Equal(got, []string{"line298", "err298", "line299", "err299"}) {
		t.Fatalf("tail: %q", got)
	}
	// More than the in-memory tail: read from the file.
	all, _ := sup.Logs("talk", 1000)
	if len(all) < 600 || !slices.Contains(all[len(all)-2:], "err299") {
		t.Fatalf("long tail: %d lines", len(all))
	}
	if _, err := sup.Logs("nope", 1); err == nil {
		t.Fatal("logs of unknown service")
	}
	logDir := filepath.Join(opts.StateDir, "chatty")
	if st := statusOf(t, sup, "chatty"); st.Log != filepath.Join(logDir, "log") {
		t.Fatalf("status names the log %q", st.Log)
	}
	waitFor(t, "two rotations", func() bool {
		_, err := os.Stat(filepath.Join(logDir, "log.2"))
		return err == nil
	})
	time.Sleep(2500 * time.Millisecond) // more rotations: still only 2 kept
	if _, err := os.Stat(filepath.Join(logDir, "log.3")); !os.IsNotExist(err) {
		t.Fatalf("log.3 exists: %v", err)
	}
	if st, _ := os.Stat(filepath.Join(logDir, "log.1")); st.Size() < 1000 {
		t.Fatalf("log.1 has %d bytes", st.Size())
	}

	// The tail survives an agent restart.
	pid := statusOf(t, sup, "talk").PID
	if err := sup.Close(); err != nil {
		t.Fatal(err)
	}
	sup2 := newSup(t, opts)
	if err := sup2.Apply(ctx, []Spec{talk, chatty}); err != nil {
		t.Fatal(err)
	}
	if st := statusOf(t, sup2, "talk"); st.PID != pid || !st.Adopted {
		t.Fatalf("not adopted: %+v", st)
	}
	got, _ = sup2.Logs("talk", 4)
	if len(got) != 4 || !slices.Contains(got, "err299") || !strings.Contains(got[3], "adopted") {
		t.Fatalf("tail after restart: %q", got)
	}
}

// OOM: python3 allocating 200 MiB under a 32 MiB limit is killed by the
// kernel and reported as such.
func TestOOM(t *testing.T) {
	opts := testOptions(t)
	sup := newSup(t, opts)
	if !sup.memV2 && sup.memV1 == "" {
		testenv.Lacks(t, "no memory controller can be used here (neither cgroup v2 memory nor a writable v1 memory hierarchy)")
	}
	ctx := ctxT(t)
	spec := Spec{
		Name: "hog", Command: "/usr/bin/python3",
		Args:      []string{"-c", "b = b'x' * (200 << 20); print('survived', len(b))"},
		MemoryMax: 32 << 20,
		Restart:   RestartNever,
	}
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	var st Status
	waitFor(t, "the hog to end", func() bool { st = statusOf(t, sup, "hog"); return st.State == StateFailed })
	if st.LastExit != "oom" || st.OOMKills != 1 {
		t.Fatalf("status %+v, want last exit oom", st)
	}
	l, _ := sup.Logs("hog", 10)
	if !strings.Contains(strings.Join(l, "\n"), "OOM") {
		t.Fatalf("no OOM line in the log: %q", l)
	}
}

func TestFallback(t *testing.T) {
	opts := testOptions(t)
	opts.Fallback = true
	sup := newSup(t, opts)
	ctx := ctxT(t)
	plain := Spec{Name: "plain", Command: "/bin/sleep", Args: []string{"1000"}}
	daemon := sh("daemon", "(setsid /bin/sleep 1001 &) ; exit 0")
	if err := sup.Apply(ctx, []Spec{plain, daemon}); err != nil {
		t.Fatal(err)
	}
	var st []Status
	waitFor(t, "both running, the daemon followed", func() bool {
		st = sup.Status()
		return st[0].State == StateRunning && st[0].Processes == 1 && st[0].PID != 0 && st[1].State == StateRunning && st[1].PID != 0
	})
	if mode, reason := sup.Isolation(); mode != "fallback" || reason != "fallback requested" {
		t.Fatalf("Isolation() = %q, %q", mode, reason)
	}
	for _, s := range st {
		if s.Isolation != "fallback" || s.Cgroup != "" {
			t.Fatalf("%+v", s)
		}
	}
	if err := sup.Start(ctx, "daemon"); err != nil {
		t.Fatal(err)
	}
	if err := sup.Stop(ctx, "daemon"); err != nil {
		t.Fatal(err)
	}
	if s := statusOf(t, sup, "daemon"); s.State != StateStopped || s.Processes != 0 || alive(st[0].PID, 0) {
		t.Fatalf("after stop: %+v", s)
	}
	if err := sup.Stop(ctx, "plain"); err != nil {
		t.Fatal(err)
	}
	if alive(st[1].PID, 0) {
		t.Fatal("plain survived stop")
	}
}

func TestFallbackAdoptAfterAgentKill(t *testing.T) {
	opts := testOptions(t)
	specs := []Spec{
		{Name: "plain", Command: "/bin/sleep", Args: []string{"1000"}},
		sh("daemon", "(setsid /bin/sleep 1001 &) ; exit 0"),
	}
	agent := startAgent(t, agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Fallback: true, Specs: specs})
	// Settled once the daemon's tracked process is the detached sleep
	// itself: for an instant the subshell that forks it is the only
	// process, and would be taken for the daemon.
	settled := func(st []Status) bool {
		if len(st) != 2 || st[0].PID == 0 || st[1].PID == 0 || st[0].Processes != 1 || st[0].State != StateRunning {
			return false
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st[0].PID))
		return err == nil && strings.Contains(string(cmd), "1001")
	}
	before := agent.waitStatus("running", settled)
	agent.kill()
	agent.start()
	after := agent.waitStatus("adopted", func(st []Status) bool { return settled(st) && st[0].Adopted && st[1].Adopted })
	for i := range after {
		if after[i].PID != before[i].PID || after[i].Restarts != 0 || after[i].Isolation != "fallback" {
			t.Errorf("before %+v after %+v", before[i], after[i])
		}
	}
	agent.terminate()
	for _, s := range after {
		if alive(s.PID, 0) {
			t.Errorf("%s survived the shutdown", s.Name)
		}
	}
}
