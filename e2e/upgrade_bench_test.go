package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/upgrade"
)

// BenchmarkUpgradeCluster is issue 6's figure: the wall time of the
// rolling upgrade of TestUpgradeScale's cluster (3 servers, 3 clients,
// the 3-instance web job) from nomad 1.9.3 / consul 1.14.8 to 1.10.5 /
// 1.14.11 with the default gate (10 s of stability per server), with its
// breakdown per phase, against the stabilisation waits the procedure
// requires: each of the 6 server steps' stable period, and for each
// allocation a drain migrates, the waits its job sets and no drain can
// skip: the migrate block's min_healthy_time for the replacement, then
// the group's shutdown_delay for the old one (read from the job). The
// probe runs through it, as in the test.
//
//	go test -count=1 -run '^$' -bench BenchmarkUpgradeCluster -benchtime 1x -timeout 30m ./e2e/
func BenchmarkUpgradeCluster(b *testing.B) {
	const stable = 10 * time.Second
	b.StopTimer()
	for i := range b.N {
		c := newUpgradeCluster(b, fmt.Sprintf("e2ebench%d", i), 41)
		c.up()
		c.waitHealthy("3 ready clients", 3*time.Minute, func(st *deploy.Status) bool { return readyClients(st) == 3 })
		env := c.envMap()
		nc := c.nomadClient(env)
		st0, err := c.statusJSON()
		if err != nil {
			b.Fatal(err)
		}
		var servers []string
		for _, m := range st0.Consul {
			if m.Server {
				servers = append(servers, strings.Split(m.Address, ":")[0])
			}
		}
		pr := newProbe(b, env, servers)
		c.runUpgradeWebJob(nc, pr, true)
		pr.start()
		before := pr.counts()
		b.StartTimer()
		run := c.runUpgrade(30*time.Minute, false, "-nomad", upgNomadTo, "-consul", upgConsulTo, "-stable", stable.String(), "-drain-deadline", "3m")
		b.StopTimer()
		win := pr.counts().sub(before)
		pr.stop()
		if run.err != nil {
			b.Fatalf("upgrade: %v\n%s", run.err, run.out.String())
		}
		st := c.upgradeState()
		if st == nil || !st.Done {
			b.Fatalf("no finished upgrade state")
		}
		var serverSteps, drained int
		for _, s := range st.Steps {
			switch s.Kind {
			case upgrade.KindServer:
				serverSteps++
			case upgrade.KindClient:
				drained += s.Drained
			}
		}
		serverWaits := time.Duration(serverSteps) * stable
		job, _, err := nc.Jobs().Info("web", nil)
		if err != nil {
			b.Fatal(err)
		}
		tg := job.TaskGroups[0]
		perAlloc := *tg.Migrate.MinHealthyTime + *tg.ShutdownDelay
		migrateWaits := time.Duration(drained) * perAlloc
		wall := run.took
		b.ReportMetric(wall.Seconds(), "s-wall")
		b.ReportMetric(serverWaits.Seconds(), "s-server-waits")
		b.ReportMetric((serverWaits + migrateWaits).Seconds(), "s-required-waits")
		b.ReportMetric(wall.Seconds()/(serverWaits+migrateWaits).Seconds(), "x-required")
		b.ReportMetric(wall.Seconds()/serverWaits.Seconds(), "x-server-waits")
		b.ReportMetric(100*win.rate(), "%-probe")
		if testing.Verbose() {
			b.Logf("steppe upgrade's output:\n%s", run.out.String())
		}
		b.Logf("upgrade %v: %d server steps × %v, %d allocations migrated × %v; phases: %s; probe %s",
			wall.Round(100*time.Millisecond), serverSteps, stable, drained, perAlloc, phaseTotals(st), win)
	}
}
