package supervise

import (
	"os"
	"path/filepath"
	"testing"
)

// A service that moves a child into a cgroup of its own below the service's
// (as a Nomad client does with its tasks): status counts both processes, the
// same as the list the stop path kills, and counts nothing once it is gone.
func TestProcessCountWithSubCgroup(t *testing.T) {
	sup := newSup(t, testOptions(t))
	ctx := ctxT(t)
	script := `cg=/sys/fs/cgroup/unified$(sed -n 's/^0:://p' /proc/self/cgroup)
mkdir "$cg/task"
/bin/sleep 1000 &
echo $! > "$cg/task/cgroup.procs"
exec /bin/sleep 1001`
	if err := sup.Apply(ctx, []Spec{sh("nested", script)}); err != nil {
		t.Fatal(err)
	}
	var cg string
	waitFor(t, "a process in the service's cgroup and one in its sub-cgroup", func() bool {
		st := statusOf(t, sup, "nested")
		cg = st.Cgroup
		if cg == "" {
			return false
		}
		sub, _ := cgProcs(filepath.Join(cg, "task"))
		return len(sub) == 1 && st.Processes == 2
	})
	all, err := cgProcsAll(cg)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := cgProcs(filepath.Join(cg, "task"))
	if err != nil {
		t.Fatal(err)
	}
	if n, err := cgCount(cg); err != nil || n != len(all) || n != 2 || len(sub) != 1 {
		lines, _ := sup.Logs("nested", 20)
		t.Fatalf("cgCount = %d, %v; cgProcsAll = %v; sub-cgroup = %v; log: %q", n, err, all, sub, lines)
	}
	if err := sup.Stop(ctx, "nested"); err != nil {
		t.Fatal(err)
	}
	if st := statusOf(t, sup, "nested"); st.Processes != 0 {
		t.Fatalf("after stop: %d processes", st.Processes)
	}
	if n, err := cgCount(filepath.Join(os.TempDir(), "no-such-cgroup")); n != 0 || err != nil {
		t.Fatalf("missing cgroup: %d, %v", n, err)
	}
}
