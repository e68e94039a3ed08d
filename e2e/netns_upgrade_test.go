package e2e

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/upgrade"
)

// TestNetnsUpgradePartition partitions the Nomad leader (its veth on the
// bridge down: nothing reaches it, not even the operator) while `steppe
// upgrade -nomad` has a server at its gate. The upgrade stops at that gate
// with a message that names the partitioned server; healed, the same
// command resumes and completes; the probe of TestUpgradeScale, which
// reads the catalog from any Consul server that answers, loses nothing.
func TestNetnsUpgradePartition(t *testing.T) {
	upgradeBinaries(t)
	c, l := newNetnsCluster(t, "e2enpart", "10.213.10.0/24")
	spec := fmt.Sprintf(`name = "e2enpart"
versions {
  nomad  = %q
  consul = %q
}
vault {
  enabled = false
}
pool "default" {
  count = 2
}
provider "netns" {
  subnet = "10.213.10.0/24"
}
`, upgNomadFrom, upgConsulFrom)
	if err := os.WriteFile(c.spec, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	// up with live progress (as on a terminal: TestPTY proves auto picks
	// it there): a line per machine and per phase, redrawn in place.
	start := time.Now()
	out, err := c.steppe(15*time.Minute, "up", "-spec", c.spec, "-state", c.state, "-progress=tty")
	took := time.Since(start)
	if err != nil {
		t.Fatalf("steppe up: %v\n%s", err, out)
	}
	t.Logf("steppe up (netns, nomad %s) with live progress took %v", upgNomadFrom, took.Round(time.Millisecond))
	checkLive(t, "up", out, `steppe up +\d+s  agents healthy`, `e2enpart-server-1 +\d+s  \S`)
	st := c.status()
	if !st.Healthy {
		t.Fatalf("not healthy after up: %q\n%s", st.Problems, out)
	}
	byAddr := map[string]string{}
	var servers []string
	for _, s := range st.Servers {
		servers = append(servers, s.Address)
		byAddr[s.Address] = strings.TrimSuffix(s.Name, ".global")
	}
	env := c.envMap()
	nc := c.nomadClient(env)
	pr := newProbe(t, env, servers)
	c.runUpgradeWebJob(nc, pr, false)
	pr.start()

	// Partition the leader once a second server step has restarted its
	// server: that step is then at its gate.
	var (
		mu       sync.Mutex
		restarts = map[string]bool{}
		victim   string
		link     netlink.Link
	)
	partition := func() {
		leader, err := nc.Status().Leader()
		if err != nil {
			t.Errorf("nomad leader before the partition: %v", err)
			return
		}
		host := strings.Split(leader, ":")[0]
		victim = byAddr[host]
		if link, err = netlink.LinkByName(l.VethName(victim)); err != nil {
			t.Errorf("%s's veth: %v", victim, err)
			return
		}
		if err := netlink.LinkSetDown(link); err != nil {
			t.Errorf("partition %s: %v", victim, err)
		}
	}
	c.onUpgradeLine = func(line string) {
		mu.Lock()
		defer mu.Unlock()
		id := serverStepRE.FindString(line)
		if id == "" || !strings.Contains(line, ": restart done in") || restarts[id] {
			return
		}
		restarts[id] = true
		if len(restarts) == 2 && victim == "" {
			partition()
			t.Logf("partitioned the Nomad leader %s as %s waits at its gate", victim, id)
		}
	}
	args := []string{"-nomad", upgNomadTo, "-gate-timeout", "60s", "-stable", "5s"}
	r := c.runUpgrade(10*time.Minute, false, args...)
	c.onUpgradeLine = nil
	mu.Lock()
	v := victim
	mu.Unlock()
	if link != nil {
		defer netlink.LinkSetUp(link)
	}
	if v == "" {
		t.Fatalf("the upgrade never had a second server at its gate to partition the leader during:\n%s", r.out.String())
	}
	if r.err == nil {
		t.Fatalf("the upgrade completed with its leader %s partitioned:\n%s", v, r.out.String())
	}
	t.Logf("upgrade with %s partitioned stopped after %v: %v\n%s", v, r.took.Round(100*time.Millisecond), r.err, r.out.String())
	ust := c.upgradeState()
	if ust == nil || ust.Done {
		t.Fatalf("upgrade state after the stop: %+v", ust)
	}
	var failed *upgrade.Step
	for i := range ust.Steps {
		if ust.Steps[i].Status == upgrade.StatusFailed {
			failed = &ust.Steps[i]
		}
	}
	if failed == nil || !strings.Contains(failed.Error, "gate") || !strings.Contains(failed.Error, v) {
		t.Errorf("the failed step %+v: want a gate error naming %s", failed, v)
	} else if strings.Contains(failed.Error, "Unexpected response") {
		// Nomad's 429 carries the health report: it is read, not shown.
		t.Errorf("the gate's error shows Nomad's 429 instead of reading its report: %s", failed.Error)
	}
	if !strings.Contains(r.out.String(), v) {
		t.Errorf("the upgrade's output does not name the partitioned %s", v)
	}

	// Healed: one leader, 3 voters; the same command resumes to the end.
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	// Healthy but for the unfinished upgrade, which status names.
	c.waitStatus("healthy after the partition healed, but for the unfinished upgrade", 3*time.Minute, func(s *deploy.Status) bool {
		return s.Raft != nil && s.Raft.Voters == 3 && s.Raft.Leader != "" && len(s.Problems) == 1 &&
			strings.Contains(s.Problems[0], "an upgrade to nomad "+upgNomadTo+" is unfinished: run steppe upgrade")
	})
	r2 := c.runUpgrade(10*time.Minute, false, args...)
	if r2.err != nil {
		t.Fatalf("the resumed upgrade: %v\n%s", r2.err, r2.out.String())
	}
	if !strings.Contains(r2.out.String(), "resum") {
		t.Errorf("the second run did not say it resumed:\n%s", r2.out.String())
	}
	t.Logf("resumed upgrade: %v\n%s", r2.took.Round(100*time.Millisecond), r2.out.String())
	pr.stop()
	if ust := c.upgradeState(); ust == nil || !ust.Done {
		t.Errorf("upgrade state after the resumed run: %+v", ust)
	}
	st = *c.waitHealthy("healthy on the new Nomad", 2*time.Minute, func(s *deploy.Status) bool { return true })
	checkDaemonVersions(t, "after the resumed upgrade", &st, upgConsulFrom, upgNomadTo, true)
	counts := pr.counts()
	t.Logf("probe: %s", counts)
	if counts.failed > 0 || counts.ok == 0 {
		t.Errorf("the probe failed %d times through the partition and the upgrade:\n%s", counts.failed, counts.failureLines())
	}

	// down with live progress: a line per machine while it is removed.
	out, err = c.steppe(5*time.Minute, "down", "-state", c.state, "-progress=tty")
	if err != nil {
		t.Fatalf("steppe down: %v\n%s", err, out)
	}
	c.downDone = true
	checkLive(t, "down", out, `e2enpart-default-1 +\d+s  stopping its agent`)
	if !strings.Contains(out, "cluster e2enpart removed in") {
		t.Errorf("steppe down's output lacks its last line:\n%q", out)
	}
}

// checkLive checks that a command's output (with -progress=tty) redrew
// lines in place and showed each live line matching one of lines.
func checkLive(t *testing.T, what, out string, lines ...string) {
	t.Helper()
	if !strings.Contains(out, "\x1b[1A") || !strings.Contains(out, "\r\x1b[J") {
		t.Errorf("steppe %s -progress=tty redrew nothing in place:\n%q", what, out)
	}
	for _, l := range lines {
		if !regexp.MustCompile(`  ` + l).MatchString(out) {
			t.Errorf("steppe %s -progress=tty showed no live line %q:\n%q", what, l, out)
		}
	}
}
