package upgrade

import (
	"context"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

// BenchmarkServerRollingUpgrade times the rolling upgrade of 3 real
// servers, consul 1.14.8 → 1.14.11 then nomad 1.9.3 → 1.10.5, with the
// default gate (10 s of stability per server), and reports the breakdown
// by phase against the sum of the stabilisation waits the procedure
// requires (servers × Gate.Stable). Run with -benchtime=1x.
func BenchmarkServerRollingUpgrade(b *testing.B) {
	for range b.N {
		b.StopTimer()
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
		tc := newTestCluster(ctx, b, true, 0, 0, hashitest.Addrs(3)...)
		consul, _ := tc.Consul(tc.Machines[0].Address)
		nomad, _ := tc.Nomad(tc.Machines[0].Address)
		if err := hashi.SetupConsulWorkloadIdentity(ctx, consul, nomad, tc.State.CACertPEM(), []string{"default"}); err != nil {
			b.Fatal(err)
		}
		cfg := tc.config(b.TempDir(), map[string]string{Consul: consulTo, Nomad: nomadTo})
		u, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		st, err := u.Run(ctx)
		wall := time.Since(start)
		b.StopTimer()
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		phases := map[string]float64{}
		perProduct := map[string]float64{}
		servers := 0
		for _, s := range st.Steps {
			for _, p := range s.Phases {
				phases[p.Name] += p.Seconds
			}
			if s.Kind == KindServer {
				servers++
				perProduct[s.Product] += s.Duration().Seconds()
			}
			b.Logf("%-32s %v %v %s", s.ID, s.Duration().Round(time.Millisecond), s.Phases, s.Note)
		}
		required := float64(servers) * u.cfg.Gate.Stable.Seconds()
		b.ReportMetric(wall.Seconds(), "wall-s")
		b.ReportMetric(required, "required-stable-s")
		b.ReportMetric(wall.Seconds()/required, "wall/required")
		b.ReportMetric(perProduct[Consul], "consul-servers-s")
		b.ReportMetric(perProduct[Nomad], "nomad-servers-s")
		for _, name := range []string{"snapshot", "transfer", "restart", "back", "healthy", "stable"} {
			b.ReportMetric(phases[name], name+"-s")
		}
	}
}
