package supervise

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/testenv"
)

// Two OOM kills in a row, the second in a recreated cgroup: the first run
// leaves a process behind, so its end is a cgroup.kill, after which the
// cgroup is replaced by a fresh one (whose memory.events counts from 0
// again on cgroup v2). Both are counted and reported as "oom".
func TestOOMAfterCgroupRecreated(t *testing.T) {
	opts := testOptions(t)
	sup := newSup(t, opts)
	if !sup.memV2 && sup.memV1 == "" {
		testenv.Lacks(t, "no memory controller can be used here (neither cgroup v2 memory nor a writable v1 memory hierarchy)")
	}
	ctx := ctxT(t)
	runs := filepath.Join(t.TempDir(), "runs")
	// Runs 1 and 2 leave a sleep behind and exec a hog; run 3 stays up.
	spec := sh("hog", "echo >> "+runs+"; if [ $(wc -l < "+runs+") -ge 3 ]; then exec /bin/sleep 1000; fi; "+
		"/bin/sleep 1000 & exec /usr/bin/python3 -c \"b = b'x' * (200 << 20); print('survived', len(b))\"")
	spec.MemoryMax = 32 << 20
	spec.BackoffMin = 10 * time.Millisecond
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	var st Status
	waitFor(t, "the third run", func() bool {
		st = statusOf(t, sup, "hog")
		return st.Restarts == 2 && st.State == StateRunning
	})
	logs := strings.Join(must(sup.Logs("hog", 100)), "\n")
	if st.OOMKills != 2 || st.LastExit != "oom" {
		t.Errorf("status %+v, want 2 OOM kills, the last exit oom; log:\n%s", st, logs)
	}
	if n := strings.Count(logs, "ended: oom"); n != 2 {
		t.Errorf("%d ends reported as oom, want 2; log:\n%s", n, logs)
	}
	if n := strings.Count(logs, "killing them"); n != 2 {
		t.Errorf("%d runs ended with a cgroup.kill, want 2; log:\n%s", n, logs)
	}
	if _, err := os.Stat(st.Cgroup); err != nil {
		t.Fatal(err)
	}
}

// A hog with a memory limit of its own (1 GiB) under a small limit above
// it (48 MiB on the supervisor's memory cgroup): the kernel's OOM killer
// acts on the limit above, and the kill is still reported as "oom",
// counted, and logged as that; the next run starts.
func TestOOMByLimitAboveTheService(t *testing.T) {
	opts := testOptions(t)
	sup := newSup(t, opts)
	if sup.memV2 || sup.memV1 == "" {
		testenv.Lacks(t, "no writable cgroup v1 memory hierarchy (this test sets a v1 limit above the services' cgroups)")
	}
	if err := os.WriteFile(filepath.Join(sup.memV1, "memory.limit_in_bytes"), []byte(strconv.Itoa(48<<20)), 0); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	runs := filepath.Join(t.TempDir(), "runs")
	spec := sh("hog", "echo >> "+runs+"; if [ $(wc -l < "+runs+") -ge 2 ]; then exec /bin/sleep 1000; fi; "+
		"exec /usr/bin/python3 -c \"b = b'x' * (200 << 20); print('survived', len(b))\"")
	spec.MemoryMax = 1 << 30
	spec.BackoffMin = 10 * time.Millisecond
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		t.Fatal(err)
	}
	var st Status
	waitFor(t, "the second run", func() bool {
		st = statusOf(t, sup, "hog")
		return st.Restarts == 1 && st.State == StateRunning
	})
	logs := strings.Join(must(sup.Logs("hog", 100)), "\n")
	if st.OOMKills != 1 || st.LastExit != "oom" {
		t.Errorf("status %+v, want 1 OOM kill, the last exit oom; log:\n%s", st, logs)
	}
	if !strings.Contains(logs, "killed by the kernel's OOM killer: its memory limit of 1073741824 bytes, or a limit above it, ran out") {
		t.Errorf("the log does not say the OOM killer killed it and why:\n%s", logs)
	}
	if strings.Contains(logs, "survived") {
		t.Errorf("the hog was not limited:\n%s", logs)
	}
}

// The machine runs out of memory: an agent (the test binary re-executed)
// in a memory cgroup limited to 64 MiB, standing for the whole machine,
// supervises a hog with no memory limit and no memory cgroup of its own.
// The kernel's OOM killer kills it; the agent tells by its SIGKILL, the
// kernel's OOM count and the kernel's log naming its pid, and reports
// "oom". A service killed by a plain SIGKILL after that is not reported
// as OOM.
func TestOOMOfTheMachine(t *testing.T) {
	opts := testOptions(t)
	m, err := findMounts()
	if err != nil {
		t.Fatal(err)
	}
	if m.memoryV1 == "" || m.v2 == "" {
		testenv.Lacks(t, "no cgroup v1 memory hierarchy (this test makes a v1 memory cgroup for the machine)")
	}
	if _, err := kernelLogKilled(1, 0); err != nil {
		testenv.Lacks(t, "the kernel's log is not readable: %v", err)
	}
	machine := filepath.Join(m.memoryV1, fmt.Sprintf("steppe-test-machine-%d", os.Getpid()))
	if err := os.Mkdir(machine, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeMemcgTree(machine) })
	if err := os.WriteFile(filepath.Join(machine, "memory.limit_in_bytes"), []byte(strconv.Itoa(64<<20)), 0); err != nil {
		t.Fatal(err)
	}
	runs := filepath.Join(t.TempDir(), "runs")
	hog := sh("hog", "echo >> "+runs+"; if [ $(wc -l < "+runs+") -ge 2 ]; then exec /bin/sleep 1000; fi; "+
		"exec /usr/bin/python3 -c \"b = b'x' * (200 << 20); print('survived', len(b))\"")
	hog.BackoffMin = 10 * time.Millisecond
	victim := Spec{Name: "victim", Command: "/bin/sleep", Args: []string{"1000"}, BackoffMin: 10 * time.Millisecond}
	// The agent joins the machine's memory cgroup through the trampoline
	// before it runs: everything it starts is charged there.
	agent := startAgentWith(t, []string{ExecArg, filepath.Join(machine, "cgroup.procs"), "-", "-", "-"},
		agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Specs: []Spec{victim, hog}})
	st := agent.waitStatus("the hog's second run", func(st []Status) bool {
		s := statusIn(st, "hog")
		return s.Restarts == 1 && s.State == StateRunning
	})
	hs := statusIn(st, "hog")
	logs, _ := os.ReadFile(hs.Log)
	if hs.OOMKills != 1 || hs.LastExit != "oom" {
		t.Errorf("hog: status %+v, want 1 OOM kill, the last exit oom; log:\n%s", hs, logs)
	}
	if !strings.Contains(string(logs), "killed by the kernel's OOM killer: it has no memory limit of its own: the machine's memory, or a limit above the service's, ran out") {
		t.Errorf("the log does not say the OOM killer killed it and why:\n%s", logs)
	}
	if strings.Contains(string(logs), "survived") {
		t.Errorf("the hog was not limited:\n%s", logs)
	}
	vs := statusIn(st, "victim")
	if err := syscall.Kill(vs.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = agent.waitStatus("the victim's second run", func(st []Status) bool {
		s := statusIn(st, "victim")
		return s.Restarts == 1 && s.State == StateRunning
	})
	if vs := statusIn(st, "victim"); vs.OOMKills != 0 || vs.LastExit != "signal KILL" {
		t.Errorf("victim: status %+v, want no OOM kill, the last exit signal KILL", vs)
	}
	agent.terminate()
}

func statusIn(st []Status, name string) Status {
	for _, s := range st {
		if s.Name == name {
			return s
		}
	}
	return Status{}
}

// removeMemcgTree kills what is left in a v1 memory cgroup and the ones
// below it, and removes them, deepest first.
func removeMemcgTree(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() {
			removeMemcgTree(filepath.Join(dir, e.Name()))
		}
	}
	for range 50 {
		pids := must(cgProcs(dir))
		if len(pids) == 0 {
			break
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Rmdir(dir)
}
