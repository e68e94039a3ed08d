package agent

import (
	"context"
	"errors"
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

// A service with no memory limit of its own killed by the kernel's OOM
// killer for a limit that is not the service's (a memory cgroup of 48 MiB
// standing for the machine, which the service joins itself before it runs
// the hog): the agent's status says "oom" and counts it, its log says the
// OOM killer killed it, and the metrics count it.
func TestOOMOfTheMachineReported(t *testing.T) {
	testenv.NeedRoot(t, "a memory cgroup")
	memMount := "/sys/fs/cgroup/memory"
	if _, err := os.Stat(filepath.Join(memMount, "memory.oom_control")); err != nil {
		testenv.Lacks(t, "no cgroup v1 memory hierarchy at %s: %v", memMount, err)
	}
	machine := filepath.Join(memMount, fmt.Sprintf("steppe-test-agent-machine-%d", os.Getpid()))
	if err := os.Mkdir(machine, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for range 50 {
			if err := syscall.Rmdir(machine); err == nil || errors.Is(err, syscall.ENOENT) {
				return
			}
			b, _ := os.ReadFile(filepath.Join(machine, "cgroup.procs"))
			for f := range strings.FieldsSeq(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	if err := os.WriteFile(filepath.Join(machine, "memory.limit_in_bytes"), []byte(strconv.Itoa(48<<20)), 0); err != nil {
		t.Fatal(err)
	}
	runs := filepath.Join(t.TempDir(), "hog-runs")
	hog := fmt.Sprintf(`echo >> %s; if [ $(wc -l < %s) -ge 2 ]; then exec /bin/sleep 3600; fi; echo $$ > %s && exec /usr/bin/python3 -c "b = b'x' * (200 << 20); print('survived', len(b))"`,
		runs, runs, filepath.Join(machine, "cgroup.procs"))
	m := runMetricsAgent(t, fmt.Sprintf(`
service "hog" {
  command     = "/bin/sh"
  args        = ["-c", %q]
  backoff_min = "10ms"
}
`, hog))
	m.waitMetrics("the hog's OOM kill", 20*time.Second, func(s metricSet) bool {
		return s.is(1, "steppe_agent_service_oom_kills_total", "service", "hog") &&
			s.is(1, "steppe_agent_service_restarts_total", "service", "hog") && s.state("hog") == "running"
	})
	ctx := context.Background()
	st, err := m.client.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sv := range st.Services {
		if sv.Name == "hog" && (sv.OOMKills != 1 || sv.LastExit != "oom") {
			t.Errorf("status of hog: %d OOM kills, last exit %q; want 1, oom", sv.OOMKills, sv.LastExit)
		}
	}
	lines, err := m.client.Logs(ctx, "hog", 50)
	if err != nil {
		t.Fatal(err)
	}
	if log := strings.Join(lines, "\n"); !strings.Contains(log, "killed by the kernel's OOM killer") || strings.Contains(log, "survived") {
		t.Errorf("the hog's log does not say the OOM killer killed it:\n%s", log)
	}
	if !strings.Contains(m.logs.String(), "killed: out of memory") {
		t.Errorf("the agent's log does not say the hog ran out of memory:\n%s", m.logs)
	}
}
