package supervise

import (
	"os"
	"path/filepath"
	"strings"
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
