package upgrade

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

// TestRollingUpgradeWithClients upgrades 3 servers and 2 client machines
// (Consul client + Nomad client each, real binaries) running a 2-instance
// raw_exec job: servers first, then each client in place, one at a
// time: drained (its allocations migrate to the other client as the
// job's migrate block says), its daemons restarted on the new binaries,
// eligible again. Afterwards every agent runs the new versions and the
// job still has its 2 allocations running, none failed or lost.
func TestRollingUpgradeWithClients(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	tc := newTestCluster(ctx, t, true, 2, 0, hashitest.Addrs(5)...)
	consul, _ := tc.Consul(tc.Machines[0].Address)
	nomad, _ := tc.Nomad(tc.Machines[0].Address)
	if err := hashi.SetupConsulWorkloadIdentity(ctx, consul, nomad, tc.State.CACertPEM(), []string{"default"}); err != nil {
		t.Fatal(err)
	}
	if _, err := hashi.WaitNomadClients(ctx, nomad, 2); err != nil {
		t.Fatal(err)
	}

	startSleeper(ctx, t, tc, nomad)

	stateDir := t.TempDir()
	run := func(cancelOn string) (*State, error) {
		rctx, rcancel := context.WithCancel(ctx)
		defer rcancel()
		cfg := tc.config(stateDir, map[string]string{Consul: consulTo, Nomad: nomadTo})
		cfg.Gate = Gate{Stable: 2 * time.Second, Timeout: 3 * time.Minute}
		cfg.ClientStrategy = ClientStrategy{Parallelism: 1, DrainDeadline: 2 * time.Minute}
		cfg.Progress = func(e Event) {
			t.Logf("progress: %s", e.Message)
			if e.Step+" "+e.Phase == cancelOn {
				rcancel()
			}
		}
		u, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return u.Run(rctx)
	}
	// Killed while the first client machine comes back on the new
	// binaries, after its drain and restart.
	first := tc.ClientMachines()[0].Name
	_, err := run("client/" + first + " restart")
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Fatalf("run 1: %v, want interrupted", err)
	}
	t.Logf("run 1: %v", err)
	st, err := run("")
	if err != nil {
		t.Fatal(err)
	}
	if s := stepByID(st, "client/"+first); !s.Resumed || s.Attempts != 2 || !strings.Contains(s.Note, "verified, not restarted") ||
		strings.Count(fmt.Sprint(s.Phases), "restart") != 1 || strings.Count(fmt.Sprint(s.Phases), "drain") != 1 {
		t.Errorf("the interrupted client step: %+v", s)
	}
	// One restart per product on a server (Consul, later Nomad), one of
	// both daemons together on a client.
	for _, m := range tc.Machines {
		want := 1
		if m.Role == "server" {
			want = 2
		}
		if n := tc.machines.restarts(m.Name); n != want {
			t.Errorf("%s restarted %d times, want %d", m.Name, n, want)
		}
	}
	drained := 0
	for _, s := range st.Steps {
		t.Logf("step %-32s %-6s %s → %s, %v, phases %v, drained %d; %s", s.ID, s.Status, s.From, s.To, s.Duration().Round(time.Millisecond), s.Phases, s.Drained, s.Note)
		if s.Kind == KindClient {
			drained += s.Drained
			if !strings.Contains(s.To, "nomad "+nomadTo) || !strings.Contains(s.To, "consul "+consulTo) {
				t.Errorf("client step %s to %q", s.ID, s.To)
			}
		}
	}
	if drained < 2 {
		t.Errorf("%d allocations drained over both clients, want at least 2 (each client ran one or both)", drained)
	}

	nodes, err := hashi.NomadNodes(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Fatalf("nodes %+v", nodes)
	}
	for _, n := range nodes {
		if n.Version != nomadTo || n.Status != "ready" || !n.Eligible || n.Draining {
			t.Errorf("node after the upgrade: %+v", n)
		}
	}
	ms, err := hashi.ConsulMemberVersions(ctx, consul)
	if err != nil {
		t.Fatal(err)
	}
	alive := 0
	for _, m := range ms {
		if m.Alive {
			alive++
			if m.Version != consulTo {
				t.Errorf("consul member %+v", m)
			}
		}
	}
	if alive != 5 {
		t.Errorf("%d consul members alive: %+v", alive, ms)
	}
	waitRunning(ctx, t, nomad, 2)
	sum, _, err := nomad.Jobs().Summary("sleeper", nil)
	if err != nil {
		t.Fatal(err)
	}
	if g := sum.Summary["g"]; g.Failed != 0 || g.Lost != 0 || g.Running != 2 {
		t.Errorf("job summary %+v", g)
	}
}

func ptr[T any](v T) *T { return &v }

func running(t *testing.T, nomad *nomadapi.Client) int {
	allocs, _, err := nomad.Jobs().Allocations("sleeper", false, nil)
	if err != nil {
		t.Logf("allocations: %v", err)
		return -1
	}
	n := 0
	for _, a := range allocs {
		if a.ClientStatus == "running" || a.ClientStatus == "pending" {
			n++
		}
	}
	return n
}

func waitRunning(ctx context.Context, t *testing.T, nomad *nomadapi.Client, want int) {
	t.Helper()
	var states []string
	for ctx.Err() == nil {
		allocs, _, err := nomad.Jobs().Allocations("sleeper", false, nil)
		if err == nil {
			n := 0
			states = states[:0]
			for _, a := range allocs {
				states = append(states, fmt.Sprintf("%s on %s: %s %s", a.ID[:8], a.NodeName, a.ClientStatus, a.ClientDescription))
				if a.ClientStatus == "running" {
					n++
				}
				if a.ClientStatus == "failed" {
					t.Fatalf("allocation failed: %v", states)
				}
			}
			if n == want {
				return
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("not %d running allocations: %v", want, states)
}

// TestSurgeUpgradeClients upgrades the 2 client machines of a pool by
// surge: for each, a new machine on the new versions (a spare of the
// plan, started for real), ready, then the old one drained (its
// allocations migrate), destroyed and its node purged. Afterwards the
// pool is the 2 new machines, the job still runs its 2 allocations.
func TestSurgeUpgradeClients(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	tc := newTestCluster(ctx, t, true, 2, 2, hashitest.Addrs(7)...)
	consul, _ := tc.Consul(tc.Machines[0].Address)
	nomad, _ := tc.Nomad(tc.Machines[0].Address)
	if err := hashi.SetupConsulWorkloadIdentity(ctx, consul, nomad, tc.State.CACertPEM(), []string{"default"}); err != nil {
		t.Fatal(err)
	}
	if _, err := hashi.WaitNomadClients(ctx, nomad, 2); err != nil {
		t.Fatal(err)
	}
	startSleeper(ctx, t, tc, nomad)
	old := map[string]bool{}
	for _, m := range tc.Machines[3:5] {
		old[m.Name] = true
	}

	cfg := tc.config(t.TempDir(), map[string]string{Consul: consulTo, Nomad: nomadTo})
	cfg.Gate = Gate{Stable: time.Second, Timeout: 3 * time.Minute}
	cfg.ClientStrategy = ClientStrategy{Parallelism: 1, DrainDeadline: 2 * time.Minute, Surge: true}
	cfg.Pools = surgePools{tc}
	cfg.Progress = func(e Event) { t.Logf("progress: %s", e.Message) }
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st, err := u.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	drained := 0
	for _, s := range st.Steps {
		if s.Kind == KindClient {
			t.Logf("step %-28s → %s (%s), %v, phases %v, drained %d; %s", s.ID, s.Replacement, s.To, s.Duration().Round(time.Millisecond), s.Phases, s.Drained, s.Note)
			drained += s.Drained
			if s.Replacement == "" || old[s.Replacement] {
				t.Errorf("step %s replacement %q", s.ID, s.Replacement)
			}
		}
	}
	if drained < 2 {
		t.Errorf("%d allocations drained, want at least 2", drained)
	}
	nodes, err := hashi.NomadNodes(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Fatalf("nodes after the surge: %+v", nodes)
	}
	for _, n := range nodes {
		if old[n.Name] || n.Version != nomadTo || n.Status != "ready" || !n.Eligible {
			t.Errorf("node after the surge: %+v", n)
		}
	}
	ms, err := hashi.ConsulMemberVersions(ctx, consul)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Alive == old[m.Name] || (m.Alive && m.Version != consulTo) {
			t.Errorf("consul member after the surge: %+v", m)
		}
	}
	waitRunning(ctx, t, nomad, 2)
	sum, _, err := nomad.Jobs().Summary("sleeper", nil)
	if err != nil {
		t.Fatal(err)
	}
	if g := sum.Summary["g"]; g.Failed != 0 || g.Lost != 0 || g.Running != 2 {
		t.Errorf("job summary %+v", g)
	}
}

// startSleeper runs a 2-instance raw_exec job whose migrate block lets a
// drain move one allocation at a time, healthy after 1 s.
func startSleeper(ctx context.Context, t *testing.T, tc *testCluster, nomad *nomadapi.Client) {
	t.Helper()
	job := nomadapi.NewServiceJob("sleeper", "sleeper", tc.Spec.Region, 50)
	job.Datacenters = []string{tc.Spec.Datacenter}
	tg := nomadapi.NewTaskGroup("g", 2)
	tg.Migrate = &nomadapi.MigrateStrategy{MaxParallel: ptr(1), HealthCheck: ptr("task_states"),
		MinHealthyTime: ptr(time.Second), HealthyDeadline: ptr(time.Minute)}
	task := nomadapi.NewTask("sleep", "raw_exec")
	task.Config = map[string]any{"command": "/bin/sleep", "args": []string{"3600"}}
	task.Resources = &nomadapi.Resources{CPU: ptr(20), MemoryMB: ptr(16)}
	tg.AddTask(task)
	job.AddTaskGroup(tg)
	if _, _, err := nomad.Jobs().Register(job, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Stop the tasks through Nomad so that it unmounts what it
		// mounted; the cluster's cleanup kills what is left.
		nomad.Jobs().Deregister("sleeper", true, nil)
		dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
		defer dcancel()
		for dctx.Err() == nil {
			if running(t, nomad) == 0 {
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
	})
	waitRunning(ctx, t, nomad, 2)
}
