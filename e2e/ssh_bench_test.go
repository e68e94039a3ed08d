package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/provider"
)

// BenchmarkSSHCreate5: the ssh provider makes machines of 5 fresh test
// hosts (3 runit, 2 OpenRC) at once, as up's machine phase does: connect
// (TCP, SSH handshake, key auth), probe the init, copy steppe (about 19 MB
// over SFTP, fsync, rename), write config, keys, secrets and the service
// definition, start it under the init and wait for the agent's API.
// Each op ends with the 5 Destroyed (not timed). Reported per phase: the
// slowest host's seconds.
//
//	cd e2e && flock -o /tmp/steppe-e2e.lock ../scripts/offline /tmp/ssh.test -test.run '^$' -test.bench '^BenchmarkSSHCreate5$' -test.benchtime 3x
func BenchmarkSSHCreate5(b *testing.B) {
	lab := newSSHLab(b)
	var hosts []*testHost
	var spec []provider.SSHHost
	for i := range 5 {
		init := "runit"
		if i >= 3 {
			init = "openrc"
		}
		h := lab.start(fmt.Sprintf("b%d", i), init)
		hosts = append(hosts, h)
		spec = append(spec, provider.SSHHost{Address: h.addr, Key: lab.keyFile, HostKey: h.hostKey})
	}
	bundles := newSSHBundles(b)
	bundles.publish()
	var mu sync.Mutex
	worst := map[string]time.Duration{}
	sum := map[string]time.Duration{}
	p, err := provider.NewSSH(provider.SSHOptions{Dir: b.TempDir(), Hosts: spec, Binary: steppeBinary(b),
		Phase: func(_, phase string, d time.Duration) {
			mu.Lock()
			worst[phase] = max(worst[phase], d)
			mu.Unlock()
		}})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ResetTimer()
	for range b.N {
		clear(worst)
		var wg sync.WaitGroup
		errs := make([]error, len(hosts))
		for i, h := range hosts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				req := sshRequest(fmt.Sprintf("m%d", i), bundles.agentConfig())
				req.Machine.Address = h.addr
				_, errs[i] = p.Create(ctx, req)
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		for k, v := range worst {
			sum[k] += v
		}
		for i := range hosts {
			if err := p.Destroy(ctx, fmt.Sprintf("m%d", i)); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
	for k, v := range sum {
		b.ReportMetric(v.Seconds()/float64(b.N), k+"-s")
	}
}
