package upgrade

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

// TestRollingUpgradeConsulNomad upgrades a real, secured cluster of 3
// servers from consul 1.14.8 + nomad 1.9.3 to consul 1.14.11 + nomad
// 1.10.5, each restart a real restart on the new binary under the
// machine's supervisor. On the way: what the preflight refuses (a
// downgrade, a two-minor jump, a dead server, Nomad 1.10's workload
// identity requirement), an upgrade killed inside a step and one killed
// between steps, each resumed from the state file.
func TestRollingUpgradeConsulNomad(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	tc := newTestCluster(ctx, t, true, 0, 0, hashitest.Addrs(3)...)
	servers := tc.ServerMachines()
	stateDir := t.TempDir()
	target := map[string]string{Consul: consulTo, Nomad: nomadTo}
	gate := Gate{Stable: 3 * time.Second, Timeout: 3 * time.Minute}
	consul, _ := tc.Consul(servers[0].Address)
	nomad, _ := tc.Nomad(servers[0].Address)

	refused := func(name string, target map[string]string, want ...string) {
		t.Helper()
		cfg := tc.config(stateDir, target)
		cfg.Gate = gate
		u, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		st, err := u.Run(ctx)
		var re *RefusedError
		if !errors.As(err, &re) {
			t.Fatalf("%s: Run = %v, want a refusal", name, err)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: refusal does not say %q:\n%v", name, w, err)
			}
		}
		if st != nil {
			t.Errorf("%s: a refused upgrade made a plan", name)
		}
		if _, err := os.Stat(filepath.Join(stateDir, StateFile)); err == nil {
			t.Errorf("%s: a refused upgrade wrote a state file", name)
		}
		t.Logf("%s: %v", name, err)
	}
	refused("downgrade", map[string]string{Consul: "1.14.5"}, "consul 1.14.8 → 1.14.5 is a downgrade")
	refused("two minors", map[string]string{Nomad: "1.11.0"}, "nomad 1.9.3 → 1.11.0 jumps 2 minor versions", "target artifact nomad 1.11.0")
	// Nomad 1.10 drops the token-based Consul workflow: without Consul's
	// auth method for workload identities the upgrade is refused.
	refused("no workload identity", target, "nomad 1.10.0 upgrade guide", `consul has no auth method "nomad-workloads"`)
	if err := hashi.SetupConsulWorkloadIdentity(ctx, consul, nomad, tc.State.CACertPEM(), []string{"default"}); err != nil {
		t.Fatal(err)
	}

	// A dead server: refused, nothing touched.
	if err := tc.Stop(ctx, servers[1], "consul"); err != nil {
		t.Fatal(err)
	}
	refused("dead server", target, "consul server "+servers[1].Name+" ("+servers[1].Address+") does not answer")
	if err := tc.Start(ctx, servers[1], nil, "consul"); err != nil {
		t.Fatal(err)
	}
	if _, err := hashi.WaitConsulHealthy(ctx, consul, 3); err != nil {
		t.Fatal(err)
	}
	back, _ := tc.Consul(servers[1].Address)
	if _, err := hashi.WaitConsulLeader(ctx, back); err != nil {
		t.Fatal(err)
	}
	// Consul 1.14 has no raft pre-vote: the server that came back may call
	// an election seconds later, and autopilot calls everyone unhealthy
	// meanwhile. The upgrade must start from a settled cluster.
	for range 3 {
		time.Sleep(2 * time.Second)
		if _, err := hashi.WaitConsulHealthy(ctx, consul, 3); err != nil {
			t.Fatal(err)
		}
	}

	// Before: the raft members and the leaders.
	h0, err := hashi.ConsulAutopilotHealth(ctx, consul)
	if err != nil {
		t.Fatal(err)
	}
	consulLeader0, _ := h0.Leader()
	nh0, err := hashi.NomadAutopilotHealth(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	nomadLeader0, _ := nh0.Leader()

	// Run 1: killed inside the second Consul server's step, right after
	// its daemon restarted on the new binary (before its gate).
	var events []Event
	run := func(cancelOn func(Event) bool) (*State, error) {
		t.Helper()
		rctx, rcancel := context.WithCancel(ctx)
		defer rcancel()
		cfg := tc.config(stateDir, target)
		cfg.Gate = gate
		cfg.Progress = func(e Event) {
			events = append(events, e)
			t.Logf("progress: %s", e.Message)
			if cancelOn != nil && cancelOn(e) {
				rcancel()
			}
		}
		u, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return u.Run(rctx)
	}
	restarts := 0
	var killedIn string
	_, err = run(func(e Event) bool {
		if e.Phase == "restart" && strings.HasPrefix(e.Step, "server/consul/") {
			restarts++
			if restarts == 2 {
				killedIn = e.Step
				return true
			}
		}
		return false
	})
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Fatalf("run 1: %v, want interrupted", err)
	}
	t.Logf("run 1: %v", err)
	disk, err := LoadState(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if s := stepByID(disk, killedIn); s == nil || s.Status != StatusRunning {
		t.Fatalf("after the kill the state file has %s as %+v, want running", killedIn, s)
	}
	killedMachine := stepByID(disk, killedIn).Machine

	// Run 2: killed between steps, after the first Nomad server's gate.
	st, err := run(func(e Event) bool {
		return e.Phase == "stable" && strings.HasPrefix(e.Step, "server/nomad/")
	})
	if err == nil || !strings.Contains(err.Error(), "interrupted before") {
		t.Fatalf("run 2: %v, want interrupted between steps", err)
	}
	t.Logf("run 2: %v", err)
	if s := stepByID(st, killedIn); s.Status != StatusDone || !s.Resumed || !strings.Contains(s.Note, "verified, not restarted") {
		t.Errorf("the interrupted step after run 2: %+v", s)
	}
	// Its Consul was restarted once; its Nomad may have been too in run 2
	// (which Nomad server goes first depends on who leads).
	if n := tc.machines.productRestarts(killedMachine, Consul); n != 1 {
		t.Errorf("%s's consul was restarted %d times, want once (an interrupted step is verified, not redone)", killedMachine, n)
	}

	// Run 3: to the end.
	st, err = run(nil)
	if err != nil {
		t.Fatalf("run 3: %v", err)
	}
	if !st.Done {
		t.Fatal("run 3 finished without Done")
	}
	disk, err = LoadState(stateDir)
	if err != nil || !disk.Done {
		t.Fatalf("state file after the upgrade: %+v, %v", disk, err)
	}
	for _, s := range st.Steps {
		t.Logf("step %-32s %-8s %s→%s attempts %d, %v, phases %v; %s", s.ID, s.Status, s.From, s.To, s.Attempts, s.Duration().Round(time.Millisecond), s.Phases, s.Note)
		if s.Status != StatusDone {
			t.Errorf("step %s is %s", s.ID, s.Status)
		}
	}

	// Afterwards: every member on the new version, no server lost, the
	// same raft members.
	h1, err := hashi.WaitConsulHealthy(ctx, consul, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range h1.Servers {
		if s.Version != consulTo {
			t.Errorf("consul server %s runs %s", s.Name, s.Version)
		}
		if !slices.ContainsFunc(h0.Servers, func(o hashi.ServerHealth) bool { return o.ID == s.ID }) {
			t.Errorf("consul server %s (%s) was not in the raft configuration before", s.Name, s.ID)
		}
	}
	ms, err := hashi.ConsulMemberVersions(ctx, consul)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if !m.Alive || m.Version != consulTo {
			t.Errorf("consul member %+v", m)
		}
	}
	nh1, err := hashi.WaitNomadHealthy(ctx, nomad, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range nh1.Servers {
		if s.Version != nomadTo {
			t.Errorf("nomad server %s runs %s", s.Name, s.Version)
		}
	}
	nms, err := hashi.NomadServerVersions(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range nms {
		if !m.Alive || m.Version != nomadTo {
			t.Errorf("nomad member %+v", m)
		}
	}

	// The leaders. Leadership can move by itself while servers restart:
	// Consul 1.14's raft has no pre-vote, so a server that comes back and
	// misses the leader's backed-off heartbeats calls an election (seen
	// here: the leader before the upgrade was not the leader at its turn).
	// What must hold is what the engine found at each server's turn: a
	// Consul leader goes last (1.14 cannot transfer), a Nomad leader hands
	// leadership to an upgraded server first.
	var consulSteps, nomadSteps []Step
	for _, s := range st.Steps {
		if s.Kind == KindServer && s.Product == Consul {
			consulSteps = append(consulSteps, s)
		}
		if s.Kind == KindServer && s.Product == Nomad {
			nomadSteps = append(nomadSteps, s)
		}
	}
	slices.SortFunc(consulSteps, func(a, b Step) int { return a.Finished.Compare(b.Finished) })
	consulLed := 0
	for k, s := range consulSteps {
		if !strings.Contains(s.Note, "restarted last") {
			continue
		}
		consulLed++
		if k != len(consulSteps)-1 {
			t.Errorf("consul server %s was restarted as the leader before %d others", s.Machine, len(consulSteps)-1-k)
		}
	}
	if last := consulSteps[len(consulSteps)-1]; consulLed == 0 || last.Address != consulLeader0.Host() {
		t.Logf("consul leadership moved during the upgrade: the leader before was %s, the last server upgraded %s (%s)", consulLeader0.Name, last.Machine, last.Note)
	}
	nomadLed := 0
	for _, s := range nomadSteps {
		transferred := slices.ContainsFunc(s.Phases, func(p Phase) bool { return p.Name == "transfer" })
		if transferred != strings.Contains(s.Note, "leadership transferred to") {
			t.Errorf("nomad server %s: transfer phase %v, note %q", s.Machine, transferred, s.Note)
		}
		if strings.Contains(s.Note, "no upgraded server to hand leadership to") {
			t.Errorf("nomad server %s was restarted as the leader: %q", s.Machine, s.Note)
		}
		if transferred {
			nomadLed++
		}
	}
	if consulLed+nomadLed == 0 {
		t.Errorf("no server was the leader at its turn in either product: leadership moved to an upgraded server twice, or the engine never looked")
	}
	if i := slices.IndexFunc(nomadSteps, func(s Step) bool { return s.Address == nomadLeader0.Host() }); i < 0 || !hasPhase(nomadSteps[i].Phases, "transfer") {
		t.Logf("nomad leadership moved during the upgrade: the leader before was %s", nomadLeader0.Name)
	}

	// The snapshots are kept and read back whole.
	for _, p := range []string{Consul, Nomad} {
		s := stepByID(st, "snapshot/"+p)
		if s == nil || s.Snapshot == "" {
			t.Fatalf("no %s snapshot step: %+v", p, s)
		}
		if _, err := hashi.CheckSnapshot(s.Snapshot); err != nil {
			t.Error(err)
		}
		if !strings.HasPrefix(s.Snapshot, filepath.Join(stateDir, SnapshotsDir)) {
			t.Errorf("%s snapshot at %s, not in the state directory", p, s.Snapshot)
		}
	}

	// Run again: nothing to do on a cluster on the target, and the last
	// report is kept.
	st2, err := run(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st2.Steps {
		if s.Kind != KindSnapshot {
			t.Errorf("an upgrade to the running versions planned %s", s.ID)
		}
	}
	if old, _ := filepath.Glob(filepath.Join(stateDir, "upgrade-*.json")); len(old) != 1 {
		t.Errorf("kept reports: %v", old)
	}
}

func stepByID(st *State, id string) *Step {
	for i := range st.Steps {
		if st.Steps[i].ID == id {
			return &st.Steps[i]
		}
	}
	return nil
}
