package supervise

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/testenv"
)

func TestStartStop(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	if err := sup.Apply(ctx, []Spec{{Name: "sleep", Command: "/bin/sleep", Args: []string{"1000"}}}); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "sleep"); err != nil {
		t.Fatal(err)
	}
	st := statusOf(t, sup, "sleep")
	if st.State != StateRunning || st.PID == 0 || st.Processes != 1 || st.Isolation != "cgroup2" || !st.Ready {
		t.Fatalf("status after start: %+v", st)
	}
	// The child runs in its own cgroup from the start.
	cg, _ := os.ReadFile("/proc/" + itoa(st.PID) + "/cgroup")
	if !strings.Contains(string(cg), "0::/"+strings.TrimPrefix(st.Cgroup, sup.v2Mount+"/")) {
		t.Fatalf("pid %d is in %q, want %s", st.PID, cg, st.Cgroup)
	}
	if err := sup.Stop(ctx, "sleep"); err != nil {
		t.Fatal(err)
	}
	st = statusOf(t, sup, "sleep")
	if st.State != StateStopped || st.PID != 0 || st.Processes != 0 {
		t.Fatalf("status after stop: %+v", st)
	}
	if alive(st.PID, 0) {
		t.Fatal("process still alive")
	}
	if err := sup.Stop(ctx, "nope"); err == nil || !strings.Contains(err.Error(), `service "nope": no such service`) {
		t.Fatalf("unknown service: %v", err)
	}
}

// A daemon that double-forks and lets its parent exit stays tracked, is
// stopped completely and is never started twice.
func TestDoubleForkDaemon(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	spec := sh("daemon", "(setsid /bin/sleep 1000 &) ; exit 0")
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	// The first main process (sh) exits 0 once the daemon has forked off;
	// the daemon's sole process becomes the main one. It may be caught
	// between its fork and its exec, so wait for its name.
	var st Status
	waitFor(t, "the daemon to be followed as main", func() bool {
		st = statusOf(t, sup, "daemon")
		comm, _ := os.ReadFile("/proc/" + itoa(st.PID) + "/comm")
		return st.State == StateRunning && st.Processes == 1 && st.LastExit == "exit 0" && strings.TrimSpace(string(comm)) == "sleep"
	})
	if st.Restarts != 0 {
		t.Fatalf("restarts = %d after a daemonizing start", st.Restarts)
	}
	// Start while running: no second copy.
	if err := sup.Start(ctx, "daemon"); err != nil {
		t.Fatal(err)
	}
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if st2 := statusOf(t, sup, "daemon"); st2.Processes != 1 || st2.PID != st.PID {
		t.Fatalf("after Start and Apply while running: %+v (was pid %d)", st2, st.PID)
	}
	if err := sup.Stop(ctx, "daemon"); err != nil {
		t.Fatal(err)
	}
	if pop, _ := cgPopulated(st.Cgroup); pop {
		t.Fatal("cgroup still populated after stop")
	}
	if alive(st.PID, 0) {
		t.Fatal("daemon still alive after stop")
	}
}

// A daemon that escaped into its own session and whose main process
// crashed: all the cgroup is killed, then restarted once.
func TestMainFailureKillsLeftovers(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	marker := filepath.Join(t.TempDir(), "ran")
	spec := sh("leftover", "if [ -e "+marker+" ]; then exec /bin/sleep 1000; fi; touch "+marker+"; (setsid /bin/sleep 1000 &); exit 3")
	spec.BackoffMin = 10 * time.Millisecond
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "restart after failure", func() bool {
		st := statusOf(t, sup, "leftover")
		return st.Restarts == 1 && st.State == StateRunning && st.Processes == 1
	})
	if st := statusOf(t, sup, "leftover"); st.LastExit != "exit 3" {
		t.Fatalf("last exit %q, want exit 3", st.LastExit)
	}
}

func TestValidation(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	good := Spec{Name: "a", Command: "/bin/sleep", Args: []string{"1000"}}
	if err := sup.Apply(ctx, []Spec{good}); err != nil {
		t.Fatal(err)
	}
	pid := 0
	waitFor(t, "running", func() bool { pid = statusOf(t, sup, "a").PID; return pid != 0 })
	notExec := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		specs []Spec
		want  string
	}{
		{[]Spec{good, good}, `service "a": declared twice`},
		{[]Spec{{Name: "b", Command: "/bin/sleep", After: []string{"zz"}}}, `service "b": after unknown service "zz"`},
		{[]Spec{{Name: "x", Command: "/bin/true", After: []string{"y"}}, {Name: "y", Command: "/bin/true", After: []string{"x"}}}, "dependency cycle: x -> y -> x"},
		{[]Spec{{Name: "m", Command: "/nonexistent/binary"}}, `service "m": command "/nonexistent/binary": no such file`},
		{[]Spec{{Name: "n", Command: notExec}}, "is not executable"},
		{[]Spec{{Name: "bad/name", Command: "/bin/true"}}, "invalid character"},
		{[]Spec{{Name: "r", Command: "/bin/true", Ready: &Readiness{}}}, "exactly one of"},
	}
	for _, c := range cases {
		err := sup.Apply(ctx, c.specs)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Apply(%v) = %v, want error containing %q", c.specs, err, c.want)
		}
	}
	// Nothing changed: the good service still runs, same pid.
	if st := statusOf(t, sup, "a"); st.PID != pid || st.State != StateRunning || len(sup.Status()) != 1 {
		t.Fatalf("a bad Apply changed things: %+v", sup.Status())
	}
}

// Apply: adds, removes (stopping and removing the cgroup), restarts on an
// exec-relevant change, updates in place otherwise.
func TestApplyDiff(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	a := Spec{Name: "a", Command: "/bin/sleep", Args: []string{"1000"}}
	b := Spec{Name: "b", Command: "/bin/sleep", Args: []string{"1001"}}
	c := Spec{Name: "c", Command: "/bin/sleep", Args: []string{"1002"}, After: []string{"b"}}
	if err := sup.Apply(ctx, []Spec{a, b, c}); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "a", "b", "c"); err != nil {
		t.Fatal(err)
	}
	before := pidsOf(sup.Status())
	bcg := statusOf(t, sup, "b").Cgroup
	a2 := a
	a2.StopTimeout = 3 * time.Second // in place
	c2 := c
	c2.After = nil
	c2.Args = []string{"1003"} // restart
	if err := sup.Apply(ctx, []Spec{a2, c2}); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "a", "c"); err != nil {
		t.Fatal(err)
	}
	after := pidsOf(sup.Status())
	if len(after) != 2 || after["a"] != before["a"] || after["c"] == before["c"] || after["c"] == 0 {
		t.Fatalf("pids before %v after %v", before, after)
	}
	if alive(before["b"], 0) {
		t.Fatal("removed service b still runs")
	}
	if _, err := os.Stat(bcg); !os.IsNotExist(err) {
		t.Fatalf("cgroup of removed service left: %v", err)
	}
}

// StopMain leaves the main process's children running in the cgroup (a
// Nomad client's tasks); StopCgroup kills them all.
func TestStopModes(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	script := "/bin/sleep 1000 & exec /bin/sleep 1001"
	m := sh("main", script)
	m.StopMode = StopMain
	c := sh("cgroup", script)
	if err := sup.Apply(ctx, []Spec{m, c}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two processes each", func() bool {
		st := sup.Status()
		return st[0].Processes == 2 && st[1].Processes == 2
	})
	for _, name := range []string{"main", "cgroup"} {
		if err := sup.Stop(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	cg := statusOf(t, sup, "cgroup")
	if cg.Processes != 0 {
		t.Fatalf("StopCgroup left %d processes", cg.Processes)
	}
	// The child the main process left got the stop signal once the main
	// process was gone; nothing waited for the stop timeout to kill it.
	logs := strings.Join(must(sup.Logs("cgroup", 20)), "\n")
	if !strings.Contains(logs, "stop signal to the processes it left (1)") || strings.Contains(logs, "stop timeout") {
		t.Fatalf("StopCgroup's log:\n%s", logs)
	}
	ms := statusOf(t, sup, "main")
	if ms.State != StateStopped || ms.Processes != 1 {
		t.Fatalf("StopMain: %+v, want stopped with the child left", ms)
	}
	// Starting again starts a new main next to the surviving child.
	if err := sup.Start(ctx, "main"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "main restarted", func() bool {
		st := statusOf(t, sup, "main")
		return st.State == StateRunning && st.Processes == 3
	})
}

// SIGKILL the agent while 5 services run, start it again: all adopted,
// one copy of each (same pids, one listener per port), no restart counted.
func TestAdoptAfterAgentKill(t *testing.T) {
	opts := testOptions(t)
	var specs []Spec
	var ports []int
	for i := range 5 {
		p := freePort(t)
		ports = append(ports, p)
		specs = append(specs, Spec{
			Name:    "web" + itoa(i),
			Command: "/usr/bin/python3",
			Args:    []string{"-m", "http.server", itoa(p), "--bind", "127.0.0.1"},
			Ready:   &Readiness{TCP: "127.0.0.1:" + itoa(p)},
		})
	}
	agent := startAgent(t, agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Specs: specs})
	allReady := func(st []Status) bool {
		if len(st) != 5 {
			return false
		}
		for _, s := range st {
			if !s.Ready || s.PID == 0 {
				return false
			}
		}
		return true
	}
	before := agent.waitStatus("5 ready services", allReady)
	agent.kill()
	agent.start()
	after := agent.waitStatus("5 adopted services", func(st []Status) bool {
		if !allReady(st) {
			return false
		}
		for _, s := range st {
			if !s.Adopted {
				return false
			}
		}
		return true
	})
	for i, s := range after {
		if s.PID != before[i].PID || s.Restarts != 0 || s.Processes != 1 {
			t.Errorf("%s: before %+v after %+v", s.Name, before[i], s)
		}
	}
	for i, p := range ports {
		if n := listeners(p); n != 1 {
			t.Errorf("web%d: %d listeners on port %d", i, n, p)
		}
	}
	agent.terminate()
	for _, s := range after {
		if alive(s.PID, 0) {
			t.Errorf("%s still runs after agent shutdown", s.Name)
		}
	}
}

// dnsmasq in its default daemon mode (forks, the parent exits) supervised
// through an agent restart.
func TestDnsmasqThroughAgentRestart(t *testing.T) {
	if _, err := os.Stat("/usr/sbin/dnsmasq"); err != nil {
		testenv.Lacks(t, "dnsmasq not installed (apt-get install dnsmasq-base): %v", err)
	}
	opts := testOptions(t)
	port := freePort(t)
	pidFile := filepath.Join(t.TempDir(), "dnsmasq.pid")
	spec := Spec{
		Name:    "dnsmasq",
		Command: "/usr/sbin/dnsmasq",
		Args: []string{"--conf-file=/dev/null", "--port=" + itoa(port), "--listen-address=127.0.0.1",
			"--bind-interfaces", "--pid-file=" + pidFile, "--user=root"},
		Ready: &Readiness{TCP: "127.0.0.1:" + itoa(port)},
	}
	agent := startAgent(t, agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Specs: []Spec{spec}})
	// Settled once the tracked process is the one dnsmasq's pid file names:
	// dnsmasq listens (and so is ready) before it forks into the background.
	settled := func(st []Status) bool {
		b, _ := os.ReadFile(pidFile)
		return len(st) == 1 && st[0].Ready && st[0].PID != 0 && st[0].Processes == 1 && strings.TrimSpace(string(b)) == itoa(st[0].PID)
	}
	before := agent.waitStatus("dnsmasq running", settled)[0]
	comm, _ := os.ReadFile("/proc/" + itoa(before.PID) + "/comm")
	if strings.TrimSpace(string(comm)) != "dnsmasq" {
		t.Fatalf("main %d is %q", before.PID, comm)
	}
	agent.kill()
	agent.start()
	after := agent.waitStatus("dnsmasq adopted", func(st []Status) bool { return settled(st) && st[0].Adopted })[0]
	if after.PID != before.PID || after.Restarts != 0 || listeners(port) != 1 {
		t.Fatalf("before %+v after %+v, listeners %d", before, after, listeners(port))
	}
	agent.terminate()
	if alive(before.PID, 0) {
		t.Fatal("dnsmasq survived the shutdown")
	}
}

func TestManyServices(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	var specs []Spec
	var names []string
	for i := range 100 {
		n := "s" + itoa(i)
		names = append(names, n)
		specs = append(specs, Spec{Name: n, Command: "/bin/sleep", Args: []string{"1000"}})
	}
	if err := sup.Apply(ctx, specs); err != nil {
		t.Fatal(err)
	}
	if err := sup.WaitReady(ctx, names...); err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, st := range sup.Status() {
		if st.State != StateRunning || st.Processes != 1 || st.PID == 0 || seen[st.PID] {
			t.Fatalf("status %+v", st)
		}
		seen[st.PID] = true
	}
	if len(seen) != 100 {
		t.Fatalf("%d services running", len(seen))
	}
	if err := sup.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	for _, st := range sup.Status() {
		if st.State != StateStopped || st.Processes != 0 {
			t.Fatalf("after shutdown %+v", st)
		}
	}
	for pid := range seen {
		if alive(pid, 0) {
			t.Fatalf("pid %d alive after shutdown", pid)
		}
	}
	_ = syscall.Getpid
}
