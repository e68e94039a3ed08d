package supervise

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A service running as another user (through the trampoline, since it has
// a v1 memory limit) reaches its notify socket, is in its memory cgroup,
// and gets its reload signal.
func TestUserNotifyMemoryReload(t *testing.T) {
	opts := testOptions(t)
	sup := newSup(t, opts)
	ctx := ctxT(t)
	script := `
import os, signal, socket, sys, time
def hup(*_):
    print("reloaded", flush=True)
signal.signal(signal.SIGHUP, hup)
mem = [l for l in open("/proc/self/cgroup").read().splitlines() if ":memory:" in l]
print("uid", os.getuid(), "mem", mem, flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while True:
    time.sleep(1)
`
	spec := Spec{
		Name: "asuser", Command: "/usr/bin/python3", Args: []string{"-c", script},
		User: "nobody", MemoryMax: 256 << 20, Ready: &Readiness{Notify: true, Timeout: 20 * time.Second},
	}
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "asuser"); err != nil {
		t.Fatal(err, sup.Status())
	}
	logs, _ := sup.Logs("asuser", 20)
	text := strings.Join(logs, "\n")
	if !strings.Contains(text, "uid 65534") {
		t.Fatalf("not running as nobody: %s", text)
	}
	if sup.memV1 != "" && !strings.Contains(text, opts.CgroupParent+"/asuser") {
		t.Fatalf("not in its memory cgroup: %s", text)
	}
	if err := sup.Reload(ctx, "asuser"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "reloaded in the log", func() bool {
		l, _ := sup.Logs("asuser", 5)
		return strings.Contains(strings.Join(l, "\n"), "\nreloaded")
	})
	if err := sup.Reload(ctx, "missing"); err == nil {
		t.Fatal("reload of an unknown service")
	}
}

// A service removed from the configuration while the agent was down is
// stopped by the next Apply; one whose command changed is restarted.
func TestChangesWhileAgentAway(t *testing.T) {
	opts := testOptions(t)
	ctx := ctxT(t)
	keep := Spec{Name: "keep", Command: "/bin/sleep", Args: []string{"1000"}}
	gone := Spec{Name: "gone", Command: "/bin/sleep", Args: []string{"1001"}}
	changed := Spec{Name: "changed", Command: "/bin/sleep", Args: []string{"1002"}}
	sup1 := newSup(t, opts)
	if err := sup1.Apply(ctx, []Spec{keep, gone, changed}); err != nil {
		t.Fatal(err)
	}
	if err := sup1.WaitReady(ctx, "keep", "gone", "changed"); err != nil {
		t.Fatal(err)
	}
	before := pidsOf(sup1.Status())
	goneCg := statusOf(t, sup1, "gone").Cgroup
	sup1.Close()

	sup2 := newSup(t, opts)
	changed.Args = []string{"1003"}
	if err := sup2.Apply(ctx, []Spec{keep, changed}); err != nil {
		t.Fatal(err)
	}
	if err := sup2.WaitReady(ctx, "keep", "changed"); err != nil {
		t.Fatal(err)
	}
	after := pidsOf(sup2.Status())
	if len(after) != 2 || after["keep"] != before["keep"] || after["changed"] == before["changed"] {
		t.Fatalf("before %v after %v", before, after)
	}
	if alive(before["gone"], 0) || alive(before["changed"], 0) {
		t.Fatal("an old process survived")
	}
	if _, err := os.Stat(goneCg); !os.IsNotExist(err) {
		t.Fatalf("cgroup of the removed service: %v", err)
	}
}

// Shutdown stops dependents before what they depend on.
func TestShutdownOrder(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	dir := t.TempDir()
	order := filepath.Join(dir, "order")
	mk := func(name string, after ...string) Spec {
		// Ready (a readiness command) once the trap is set.
		armed := filepath.Join(dir, name+".armed")
		s := sh(name, "trap 'echo "+name+" >> "+order+"; exit 0' TERM; touch "+armed+"; while :; do sleep 0.05; done")
		s.After = after
		s.Ready = &Readiness{Command: []string{"/bin/sh", "-c", "test -e " + armed}}
		return s
	}
	if err := sup.Apply(ctx, []Spec{mk("web", "app"), mk("db"), mk("app", "db")}); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "web", "app", "db"); err != nil {
		t.Fatal(err)
	}
	if err := sup.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(order)
	if string(got) != "web\napp\ndb\n" {
		t.Fatalf("stop order %q", got)
	}
	for _, st := range sup.Status() {
		if st.State != StateStopped || st.Processes != 0 {
			t.Fatalf("%+v", st)
		}
	}
}

// A stop signal that is ignored: after StopTimeout the whole cgroup is
// killed.
func TestStopTimeoutKills(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	s := sh("stubborn", "trap '' TERM; /bin/sleep 1000 & while :; do sleep 0.05; done")
	s.StopTimeout = 200 * time.Millisecond
	if err := sup.Apply(ctx, []Spec{s}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "running", func() bool { return statusOf(t, sup, "stubborn").Processes >= 2 })
	t0 := time.Now()
	if err := sup.Stop(ctx, "stubborn"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d < 200*time.Millisecond {
		t.Fatalf("stopped after %v, before the timeout", d)
	}
	if st := statusOf(t, sup, "stubborn"); st.Processes != 0 || st.State != StateStopped {
		t.Fatalf("%+v", st)
	}
	// It starts again normally (a fresh cgroup after cgroup.kill).
	if err := sup.Start(ctx, "stubborn"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if st := statusOf(t, sup, "stubborn"); st.State != StateRunning || st.Restarts != 0 {
		t.Fatalf("after start: %+v", st)
	}
}

// stdin is /dev/null, stdout and stderr the log file (not a pipe), no
// controlling terminal, and only the declared environment.
func TestStdioSessionEnv(t *testing.T) {
	opts := testOptions(t)
	sup := newSup(t, opts)
	ctx := ctxT(t)
	s := sh("io", `echo "in=$(readlink /proc/$$/fd/0) out=$(readlink /proc/$$/fd/1) err=$(readlink /proc/$$/fd/2)"; echo "tty=$(cut -d' ' -f7 /proc/$$/stat) sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$"; echo "env=$(env | grep -v '^PWD=' | sort | tr '\n' ' ')"; exec /bin/sleep 1000`)
	s.Env = []string{"FOO=bar"}
	if err := sup.Apply(ctx, []Spec{s}); err != nil {
		t.Fatal(err)
	}
	var text string
	waitFor(t, "output", func() bool {
		l, _ := sup.Logs("io", 10)
		text = strings.Join(l, "\n")
		return strings.Contains(text, "env=")
	})
	logPath := filepath.Join(opts.StateDir, "io", "log")
	pid := statusOf(t, sup, "io").PID
	for _, want := range []string{
		"in=/dev/null out=" + logPath + " err=" + logPath,
		"tty=0 sid=" + itoa(pid) + " pid=" + itoa(pid),
		"env=FOO=bar ",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("want %q in:\n%s", want, text)
		}
	}
}

// Concurrent Start, Restart and Apply never make a second copy.
func TestNoSecondCopyUnderConcurrency(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	s := Spec{Name: "one", Command: "/bin/sleep", Args: []string{"1000"}}
	if err := sup.Apply(ctx, []Spec{s}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	for i := range 20 {
		go func() {
			defer func() { done <- struct{}{} }()
			switch i % 3 {
			case 0:
				_ = sup.Start(ctx, "one")
			case 1:
				_ = sup.Apply(ctx, []Spec{s})
			case 2:
				if i == 2 {
					_ = sup.Restart(ctx, "one")
				} else {
					_ = sup.Start(ctx, "one")
				}
			}
		}()
	}
	for range 20 {
		<-done
	}
	if err := sup.WaitReady(ctx, "one"); err != nil {
		t.Fatal(err)
	}
	if st := statusOf(t, sup, "one"); st.Processes != 1 || st.State != StateRunning {
		t.Fatalf("%+v", st)
	}
}

func TestRestartPolicies(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	ok := sh("ok", "exit 0")
	ok.Restart = RestartOnFailure
	bad := sh("bad", "exit 2")
	bad.Restart = RestartOnFailure
	bad.BackoffMax = 50 * time.Millisecond
	never := sh("never", "exit 0")
	never.Restart = RestartNever
	if err := sup.Apply(ctx, []Spec{ok, bad, never}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "policies applied", func() bool {
		return statusOf(t, sup, "ok").State == StateStopped && statusOf(t, sup, "never").State == StateStopped &&
			statusOf(t, sup, "bad").Restarts >= 3
	})
	if st := statusOf(t, sup, "ok"); st.Restarts != 0 || st.LastExit != "exit 0" {
		t.Fatalf("ok: %+v", st)
	}
	if st := statusOf(t, sup, "bad"); st.LastExit != "exit 2" {
		t.Fatalf("bad: %+v", st)
	}
}

// After a shutdown the supervisor leaves no empty cgroup behind, but keeps
// the cgroup of a StopMain service whose children still run (a Nomad
// client's tasks), and the parent above it.
func TestShutdownRemovesEmptyCgroups(t *testing.T) {
	opts := testOptions(t)
	sup, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	script := "/bin/sleep 1000 & exec /bin/sleep 1001"
	keeper := sh("keeper", script)
	keeper.StopMode = StopMain
	whole := sh("whole", script)
	if err := sup.Apply(ctx, []Spec{keeper, whole}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two processes each", func() bool {
		st := sup.Status()
		return st[0].Processes == 2 && st[1].Processes == 2
	})
	parent := filepath.Dir(statusOf(t, sup, "whole").Cgroup)
	if err := sup.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sup.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(parent, "whole")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stopped service's empty cgroup is still there (%v)", err)
	}
	if pop, err := cgPopulated(filepath.Join(parent, "keeper")); err != nil || !pop {
		t.Errorf("the StopMain service's cgroup with its child: populated %v, %v", pop, err)
	}

	// With the child gone and keeper dropped from the config, a second
	// supervisor's shutdown removes everything, the parent included.
	if err := cgKill(filepath.Join(parent, "keeper")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "keeper's child gone", func() bool {
		pop, err := cgPopulated(filepath.Join(parent, "keeper"))
		return err == nil && !pop
	})
	sup2, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := sup2.Apply(ctx, []Spec{whole}); err != nil {
		t.Fatal(err)
	}
	if err := sup2.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	sup2.Close()
	if _, err := os.Stat(parent); !errors.Is(err, os.ErrNotExist) {
		ents, _ := os.ReadDir(parent)
		t.Errorf("the services' parent cgroup is still there (%v): %v", err, ents)
	}
}
