package upgrade

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/hashi/hashitest"
)

func TestCheckVersions(t *testing.T) {
	for _, c := range []struct {
		product, from, to string
		force             bool
		want              string // "" for allowed
	}{
		{"consul", "1.14.8", "1.14.11", false, ""},
		{"consul", "1.14.8", "1.14.8", false, ""},
		{"nomad", "1.9.3", "1.10.5", false, ""},
		{"nomad", "1.10.5", "1.10.0", false, "nomad 1.10.5 → 1.10.0 is a downgrade"},
		{"nomad", "1.10.5", "1.9.3", false, "is a downgrade"},
		{"nomad", "1.10.5", "1.9.3", true, ""},
		{"nomad", "1.8.4", "1.10.5", false, "jumps 2 minor versions"},
		{"nomad", "1.8.4", "1.10.5", true, ""},
		{"consul", "1.14.8", "2.0.0", false, "crosses a major version"},
		{"consul", "1.14.8", "1.15.0-rc1", false, ""},
		{"consul", "1.14.x", "1.15.0", false, `the running version "1.14.x"`},
		{"consul", "1.14.8", "", false, `the target version ""`},
	} {
		err := CheckVersions(c.product, c.from, c.to, c.force)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s %s → %s (force %v): %v", c.product, c.from, c.to, c.force, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s %s → %s (force %v): %v, want %q", c.product, c.from, c.to, c.force, err, c.want)
		}
	}
}

// TestGuideNotesApply checks which upgrade-guide notes an upgrade
// crosses: a release's notes apply when from < release <= to.
func TestGuideNotesApply(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		product, from, to string
		want              int
	}{
		{"nomad", "1.9.3", "1.10.5", 2},
		{"nomad", "1.9.3", "1.10.0-beta.1", 2},
		{"nomad", "1.10.0", "1.10.5", 0},
		{"nomad", "1.8.4", "1.9.3", 0},
		{"consul", "1.14.8", "1.14.11", 0},
		{"consul", "1.13.9", "1.14.8", 1},
	} {
		// Checks that need clients fail without them; count what applies.
		res, _ := CheckGuides(ctx, GuideEnv{}, c.product, c.from, c.to)
		if len(res) != c.want {
			t.Errorf("%s %s → %s: %d notes apply, want %d: %+v", c.product, c.from, c.to, len(res), c.want, res)
		}
		for _, r := range res {
			if r.Checked != (r.Note.Check != nil) {
				t.Errorf("note %s: checked %v", r.Note.Title, r.Checked)
			}
			if r.Checked && r.Err == nil {
				t.Errorf("note %q passed without a cluster to check", r.Note.Title)
			}
		}
	}
	for _, n := range GuideNotes() {
		if n.URL == "" || n.Title == "" || (n.Product != Consul && n.Product != Nomad) {
			t.Errorf("note %+v", n)
		}
	}
}

// TestStateFile: the state is replaced atomically, read back the same,
// and the lock keeps a second upgrade out of the same state directory.
func TestStateFile(t *testing.T) {
	dir := t.TempDir()
	if st, err := LoadState(dir); st != nil || err != nil {
		t.Fatalf("empty dir: %v, %v", st, err)
	}
	st := &State{Format: stateFormat, Created: time.Now().UTC(), Target: map[string]string{Consul: "1.14.11"},
		Steps: []Step{{ID: "snapshot/consul", Kind: KindSnapshot, Status: StatusDone}, {ID: "server/consul/a", Kind: KindServer, Status: StatusRunning}}}
	if err := st.save(dir); err != nil {
		t.Fatal(err)
	}
	got, err := LoadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Steps) != 2 || got.Steps[1].Status != StatusRunning || got.Target[Consul] != "1.14.11" {
		t.Fatalf("read back %+v", got)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("state dir holds %d entries after a save (temporary file left?)", len(ents))
	}
	if fi, _ := os.Stat(filepath.Join(dir, StateFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v", fi.Mode())
	}

	release, err := lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lock(dir); err == nil || !strings.Contains(err.Error(), "another steppe upgrade is running") {
		t.Errorf("second lock: %v", err)
	}
	release()
	release2, err := lock(dir)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	release2()

	os.WriteFile(filepath.Join(dir, StateFile), []byte(`{"format": 99}`), 0o600)
	if _, err := LoadState(dir); err == nil || !strings.Contains(err.Error(), "format 99") {
		t.Errorf("future format: %v", err)
	}
	os.WriteFile(filepath.Join(dir, StateFile), []byte(`{"format": 1, "steps": [`), 0o600)
	if _, err := LoadState(dir); err == nil || !strings.Contains(err.Error(), StateFile) {
		t.Errorf("truncated state: %v", err)
	}
}

// stuckMachines is a machine that does not take the new version: the
// upgrade call succeeds but the daemon keeps running the old binary (a
// provider that published the bundle to the wrong place, an agent that
// rolled back). The gate must catch it.
type stuckMachines struct{}

func (stuckMachines) Upgrade(ctx context.Context, machine string, versions map[string]string) error {
	return nil
}

// TestGateFailureStops: on a real Consul cluster, a server that does not
// come back on the new version fails its gate, which stops the upgrade
// saying what is wrong; nothing else is touched; the state file records
// it; another target is refused while it is unfinished; and once the
// machine is fixed a new run resumes and completes.
func TestGateFailureStops(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	tc := newTestCluster(ctx, t, false, 0, 0, hashitest.Addrs(3)...)
	stateDir := t.TempDir()
	target := map[string]string{Consul: consulTo}

	cfg := tc.config(stateDir, target)
	cfg.Machines = stuckMachines{}
	cfg.Gate = Gate{Stable: time.Second, Timeout: 8 * time.Second}
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st, err := u.Run(ctx)
	if err == nil {
		t.Fatal("an upgrade whose server did not take the new version passed")
	}
	t.Logf("failed as it should: %v", err)
	var failed []Step
	for _, s := range st.Steps {
		if s.Status == StatusFailed {
			failed = append(failed, s)
		}
		if s.Kind == KindServer && s.Status == StatusDone {
			t.Errorf("step %s done after a failed gate", s.ID)
		}
	}
	if len(failed) != 1 || !strings.Contains(err.Error(), "runs consul "+consulFrom+", not "+consulTo) || !strings.Contains(err.Error(), failed[0].Machine) {
		t.Fatalf("failed steps %+v, error %v", failed, err)
	}
	disk, err := LoadState(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if s := stepByID(disk, failed[0].ID); s.Status != StatusFailed || s.Error == "" {
		t.Errorf("the state file has %+v", s)
	}

	other := tc.config(stateDir, map[string]string{Consul: consulTo, Nomad: nomadTo})
	u, err = New(other)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Run(ctx); err == nil || !strings.Contains(err.Error(), "is in progress") {
		t.Errorf("another target during an unfinished upgrade: %v", err)
	}

	cfg.Machines = tc.machines
	cfg.Gate.Timeout = 2 * time.Minute
	u, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st, err = u.Run(ctx)
	if err != nil {
		t.Fatalf("after the fix: %v", err)
	}
	if s := stepByID(st, failed[0].ID); s.Status != StatusDone || s.Attempts != 2 {
		t.Errorf("the failed step after the fix: %+v", s)
	}
	for _, m := range tc.ServerMachines() {
		if n := tc.machines.restarts(m.Name); n != 1 {
			t.Errorf("%s restarted %d times", m.Name, n)
		}
	}
}

// killedMachines stands for an upgrade killed while a machine was being
// asked to take the new versions, before anything changed on it: Upgrade
// cancels the run and returns what a cancelled call returns.
type killedMachines struct{ cancel context.CancelFunc }

func (k killedMachines) Upgrade(ctx context.Context, machine string, versions map[string]string) error {
	k.cancel()
	<-ctx.Done()
	return ctx.Err()
}

// TestInterruptedRestartIsRedone: a restart phase that was cut short is
// not recorded as done, and the resumed step decides from what the daemon
// reports: a server still on the old version is restarted, not waved
// through its gate.
func TestInterruptedRestartIsRedone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	tc := newTestCluster(ctx, t, false, 0, 0, hashitest.Addrs(3)...)
	stateDir := t.TempDir()
	target := map[string]string{Consul: consulTo}

	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	cfg := tc.config(stateDir, target)
	cfg.Machines = killedMachines{rcancel}
	cfg.Gate = Gate{Stable: time.Second, Timeout: 30 * time.Second}
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Run(rctx); err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Fatalf("run 1: %v, want interrupted", err)
	}
	disk, err := LoadState(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	var cut *Step
	for i := range disk.Steps {
		if disk.Steps[i].Status == StatusRunning {
			cut = &disk.Steps[i]
		}
	}
	if cut == nil {
		t.Fatalf("no step left running after the kill: %+v", disk.Steps)
	}
	if hasPhase(cut.Phases, "restart") {
		t.Errorf("step %s records a restart phase that never completed: %+v", cut.ID, cut.Phases)
	}

	cfg.Machines = tc.machines
	u, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st, err := u.Run(ctx)
	if err != nil {
		t.Fatalf("resumed run: %v", err)
	}
	if s := stepByID(st, cut.ID); s.Status != StatusDone || !s.Resumed {
		t.Errorf("the cut step after the resumed run: %+v", s)
	}
	for _, m := range tc.ServerMachines() {
		if n := tc.machines.restarts(m.Name); n != 1 {
			t.Errorf("%s restarted %d times, want once", m.Name, n)
		}
	}
}
