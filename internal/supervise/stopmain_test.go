package supervise

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// An agent killed after cloning a StopMain service's main process (a
// Nomad client, whose tasks stay in its cgroup) but before recording its
// pid: the next agent adopts that process and starts no second copy, on
// the service's first start as on a restart (where a task of the run
// before is left in the cgroup).
func TestStopMainAdoptedAfterCrashInSpawn(t *testing.T) {
	for _, c := range []struct {
		name  string
		spawn int // which spawn the agent dies after
		procs int // processes in the cgroup once adopted
	}{
		{"first start", 1, 2},
		{"restart", 2, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			opts := testOptions(t)
			dir := t.TempDir()
			ran := filepath.Join(dir, "ran")
			if c.spawn == 1 {
				if err := os.WriteFile(ran, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			// The first run leaves a task behind and fails; the next runs
			// keep a task and run on.
			spec := sh("client", "if [ -e "+ran+" ]; then /bin/sleep 1000 & exec /bin/sleep 1001; fi; touch "+ran+"; /bin/sleep 1000 & exit 1")
			spec.StopMode = StopMain
			agent := startAgent(t, agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Specs: []Spec{spec},
				DieAfterSpawn: c.spawn, SpawnedFile: filepath.Join(dir, "spawned")})
			_ = agent.cmd.Wait()
			b, err := os.ReadFile(agent.cfg.SpawnedFile)
			if err != nil {
				t.Fatalf("the agent did not die after spawn %d: %v", c.spawn, err)
			}
			pid, _ := strconv.Atoi(string(b))
			agent.cfg.DieAfterSpawn = 0
			agent.rewrite()
			agent.start()
			st := agent.waitStatus("the client adopted", func(st []Status) bool {
				return len(st) == 1 && st[0].Adopted && st[0].State == StateRunning && st[0].Processes == c.procs
			})[0]
			if st.PID != pid {
				t.Errorf("adopted pid %d, want %d (the one spawned before the crash)", st.PID, pid)
			}
			mains := 0
			for _, p := range must(cgProcs(st.Cgroup)) {
				if cmd, _ := os.ReadFile("/proc/" + itoa(p) + "/cmdline"); strings.Contains(string(cmd), "1001") {
					mains++
				}
			}
			if mains != 1 {
				t.Errorf("%d copies of the client's main process run", mains)
			}
			agent.terminate()
		})
	}
}
