package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/deploy"
)

// stampedSteppe builds a binary of pkg stamped with ldflags (-X main.…).
func stampedSteppe(t testing.TB, name, pkg, ldflags string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w "+ldflags, "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// machineState is what a self-upgrade must leave as it was: the agent's
// pid, and every daemon's pid and restart count.
type machineState struct {
	version  string
	agentPID int
	services map[string][2]int // pid, restarts
}

func (c *upCluster) machineStates(names []string) map[string]machineState {
	c.t.Helper()
	out := map[string]machineState{}
	for _, n := range names {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := agent.NewClient(c.machineSocket(n)).Status(ctx)
		cancel()
		if err != nil {
			c.t.Fatalf("agent status of %s: %v", n, err)
		}
		ms := machineState{version: st.Agent.Version, agentPID: st.Agent.PID, services: map[string][2]int{}}
		for _, s := range st.Services {
			ms.services[s.Name] = [2]int{s.PID, s.Restarts}
		}
		out[n] = ms
	}
	return out
}

// sameDaemons fails the test for every daemon whose pid or restart count
// changed between two looks.
func sameDaemons(t *testing.T, when string, before, after map[string]machineState) {
	t.Helper()
	for n, b := range before {
		a := after[n]
		for svc, pr := range b.services {
			if a.services[svc] != pr {
				t.Errorf("%s: %s/%s was (pid %d, %d restarts), now (pid %d, %d restarts): a daemon was restarted", when, n, svc, pr[0], pr[1], a.services[svc][0], a.services[svc][1])
			}
		}
		if len(a.services) != len(b.services) {
			t.Errorf("%s: %s runs %d services, had %d", when, n, len(a.services), len(b.services))
		}
	}
}

// TestUpgradeSteppe: `steppe upgrade -steppe V` on a cluster of 3 servers
// and 2 clients while a client of the web job probes it: every agent
// reports V under its own pid, no daemon restarted, the probe lost
// nothing. A new binary that exits at once, and one that never answers,
// are rolled back by the agent of the first machine: the upgrade stops
// naming it, and the cluster keeps the steppe it had.
func TestUpgradeSteppe(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	// No Vault: the self-upgrade does not touch it, and the machine is shared.
	c := newSpecCluster(t, consul, nomad, "name = \"e2eself\"\nvault {\n  enabled = false\n}\n", "127.0.8", 11, 5)
	const v2, vExit, vHang = "9.9.1", "9.9.2", "9.9.3"
	good := stampedSteppe(t, "steppe-"+v2, "../cmd/steppe", "-X main.version="+v2)
	exitBin := stampedSteppe(t, "steppe-"+vExit, "../internal/agent/testdata/brokensteppe", "-X main.version="+vExit+" -X main.mode=exit")
	hangBin := stampedSteppe(t, "steppe-"+vHang, "../internal/agent/testdata/brokensteppe", "-X main.version="+vHang+" -X main.mode=hang")

	out, took := c.up()
	t.Logf("steppe up took %v", took.Round(time.Millisecond))
	st0 := c.waitHealthy("the new cluster healthy, 2 ready clients", 3*time.Minute, func(st *deploy.Status) bool {
		return len(st.Servers) == 3 && readyClients(st) == 2
	})
	var names, servers []string
	for _, a := range st0.Agents {
		names = append(names, a.Machine)
	}
	for _, m := range st0.Consul {
		if m.Server {
			host, _, err := net.SplitHostPort(m.Address)
			if err != nil {
				host = m.Address
			}
			servers = append(servers, host)
		}
	}
	if len(names) != 5 || len(servers) != 3 {
		t.Fatalf("machines %v, consul servers %v:\n%s", names, servers, out)
	}
	for _, a := range st0.Agents {
		if a.Steppe == "" || a.Steppe == v2 {
			t.Errorf("machine %s reports steppe %q before the upgrade", a.Machine, a.Steppe)
		}
	}
	env := c.envMap()
	nc := c.nomadClient(env)
	pr := newProbe(t, env, servers)
	c.runUpgradeWebJob(nc, pr, false)
	pr.start()
	t.Cleanup(pr.stop)
	before0 := c.machineStates(names)
	from := before0[names[0]].version

	// The upgrade.
	probeBefore := pr.counts()
	run := c.runUpgrade(10*time.Minute, false, "-steppe", v2, "-steppe-binary", good)
	t.Logf("upgrade -steppe %s (%v, %v):\n%s", v2, run.err, run.took.Round(time.Millisecond), run.out.String())
	if run.err != nil {
		t.Fatalf("upgrade -steppe %s failed: %v", v2, run.err)
	}
	window := pr.counts().sub(probeBefore)
	after := c.machineStates(names)
	for _, n := range names {
		if after[n].version != v2 {
			t.Errorf("%s reports steppe %s after the upgrade, want %s", n, after[n].version, v2)
		}
		if after[n].agentPID != before0[n].agentPID {
			t.Errorf("%s: the agent's pid changed from %d to %d", n, before0[n].agentPID, after[n].agentPID)
		}
	}
	sameDaemons(t, "after upgrade -steppe "+v2, before0, after)
	if window.failed > 0 {
		t.Errorf("the probe lost requests during upgrade -steppe: %s\n%s", window, window.failureLines())
	}
	t.Logf("probe during upgrade -steppe %s (%v): %s", v2, run.took.Round(time.Millisecond), window)
	stUp := c.waitHealthy("the cluster healthy on steppe "+v2, 2*time.Minute, nil)
	for _, a := range stUp.Agents {
		if a.Versions[agent.SteppeProduct] != v2 || a.Runs[agent.SteppeProduct] != v2 {
			t.Errorf("status of %s: set to run steppe %q, runs %q; want %s", a.Machine, a.Versions[agent.SteppeProduct], a.Runs[agent.SteppeProduct], v2)
		}
	}
	if out, err := c.steppe(time.Minute, "status", "-state", c.state); err != nil || !strings.Contains(out, "steppe "+v2) {
		t.Errorf("steppe status does not show steppe %s (%v):\n%s", v2, err, out)
	}
	// The operator's binary is not what any machine replaced.
	if b, err := exec.Command(c.bin, "version").Output(); err != nil || strings.TrimSpace(string(b)) != "steppe "+from {
		t.Errorf("the operator's binary %s says %q (%v), want steppe %s", c.bin, b, err, from)
	}

	// Broken binaries: rolled back on the first machine, the upgrade
	// stops naming it, nothing else moves.
	for _, bad := range []struct{ version, bin, why string }{
		{vExit, exitBin, "exited before it reported healthy"},
		{vHang, hangBin, "did not report healthy"},
	} {
		before := c.machineStates(names)
		probeBefore := pr.counts()
		run := c.runUpgrade(10*time.Minute, false, "-steppe", bad.version, "-steppe-binary", bad.bin)
		t.Logf("upgrade -steppe %s (broken; %v, %v):\n%s", bad.version, run.err, run.took.Round(time.Millisecond), run.out.String())
		if run.err == nil {
			t.Errorf("upgrade to the broken steppe %s succeeded", bad.version)
		}
		first := ""
		for _, n := range names {
			if strings.Contains(run.out.String(), "machine "+n+": steppe "+bad.version+" was rolled back") {
				first = n
			}
		}
		if first == "" || !strings.Contains(run.out.String(), bad.why) {
			t.Errorf("the failed upgrade to %s does not name the machine rolled back and why (%q)", bad.version, bad.why)
		}
		after := c.machineStates(names)
		for _, n := range names {
			if after[n].version != v2 {
				t.Errorf("%s reports steppe %s after the failed upgrade to %s, want %s", n, after[n].version, bad.version, v2)
			}
			if n != first && after[n].agentPID != before[n].agentPID {
				t.Errorf("%s (not upgraded) changed its agent pid %d → %d", n, before[n].agentPID, after[n].agentPID)
			}
		}
		sameDaemons(t, "after the failed upgrade to "+bad.version, before, after)
		if w := pr.counts().sub(probeBefore); w.failed > 0 {
			t.Errorf("the probe lost requests during the failed upgrade to %s: %s\n%s", bad.version, w, w.failureLines())
		}
		st := c.waitHealthy("the cluster healthy after the failed upgrade to "+bad.version, 2*time.Minute, nil)
		for _, a := range st.Agents {
			if a.Versions[agent.SteppeProduct] != v2 {
				t.Errorf("after the failed upgrade to %s, %s is set to run steppe %q, want %s", bad.version, a.Machine, a.Versions[agent.SteppeProduct], v2)
			}
		}
		if first != "" {
			if b, err := os.ReadFile(filepath.Join(c.state, "machines", first, "agent.pid")); err != nil || strings.TrimSpace(string(b)) != fmt.Sprint(after[first].agentPID) {
				t.Errorf("%s's pidfile says %q (%v), its agent is pid %d", first, b, err, after[first].agentPID)
			}
		}
	}
	if t.Failed() {
		for _, n := range names {
			t.Log(c.machineLogs(n))
		}
	}
}
