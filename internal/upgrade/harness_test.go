package upgrade

import (
	"context"
	"fmt"
	"sync"
	"testing"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

// The upgrade pairs built on these machines (DESIGN: facts).
const (
	consulFrom, consulTo = "1.14.8", "1.14.11"
	nomadFrom, nomadTo   = "1.9.3", "1.10.5"
)

// testCluster is a real secured cluster of 3 servers under real
// supervisors, with what an Upgrader needs to act on it.
type testCluster struct {
	*hashitest.Cluster
	consulMgmt, nomadMgmt cluster.Secret
	machines              *swapMachines
}

// newTestCluster starts 3 servers, and with clients the default pool's 2
// client machines (Nomad clients need withNomad).
func newTestCluster(ctx context.Context, tb testing.TB, withNomad, clients bool, addrs ...string) *testCluster {
	tb.Helper()
	consulBin := hashitest.Binary(tb, "consul", consulFrom)
	hashitest.Binary(tb, "consul", consulTo)
	var nomadBin string
	if withNomad {
		nomadBin = hashitest.Binary(tb, "nomad", nomadFrom)
		hashitest.Binary(tb, "nomad", nomadTo)
	}
	spec := cluster.DefaultSpec()
	if !clients {
		spec.Pools = nil
	}
	c := hashitest.New(tb, spec, addrs)
	tc := &testCluster{Cluster: c}
	var err error
	if tc.consulMgmt, err = c.StartConsul(ctx, consulBin); err != nil {
		tb.Fatal(err)
	}
	if withNomad {
		if tc.nomadMgmt, err = c.StartNomad(ctx, nomadBin, c.Machines); err != nil {
			tb.Fatal(err)
		}
	}
	tc.machines = &swapMachines{tb: tb, c: c, calls: map[string]int{}}
	return tc
}

func (tc *testCluster) config(stateDir string, target map[string]string) Config {
	cfg := Config{StateDir: stateDir, Target: target, APIs: tc, Machines: tc.machines, Artifacts: cacheArtifacts{}}
	for _, m := range tc.ServerMachines() {
		cfg.Servers = append(cfg.Servers, Server{Machine: m.Name, Address: m.Address})
	}
	for _, m := range tc.ClientMachines() {
		cfg.Clients = append(cfg.Clients, Client{Machine: m.Name, Address: m.Address, Pool: m.Pool})
	}
	return cfg
}

func (tc *testCluster) Consul(addr string) (*consulapi.Client, error) {
	return hashi.ConsulClient(fmt.Sprintf("%s:%d", addr, cluster.ConsulHTTPSPort), tc.Op, tc.consulMgmt)
}

func (tc *testCluster) Nomad(addr string) (*nomadapi.Client, error) {
	return hashi.NomadClient(fmt.Sprintf("%s:%d", addr, cluster.NomadHTTPPort), tc.Op, tc.nomadMgmt)
}

// swapMachines upgrades a machine by swapping the binary in its
// supervisor's spec: the supervisor restarts the daemon on the new
// binary, as it would when the agent applies a bundle with new artifact
// versions. Nothing is faked: the new process is the new release.
type swapMachines struct {
	tb    testing.TB
	c     *hashitest.Cluster
	mu    sync.Mutex
	calls map[string]int // machine → Upgrade calls that restarted something
}

func (s *swapMachines) Upgrade(ctx context.Context, machine string, versions map[string]string) error {
	for _, m := range s.c.Machines {
		if m.Name != machine {
			continue
		}
		cache, err := artifact.DefaultCacheDir()
		if err != nil {
			return err
		}
		restarted := false
		for _, product := range sortedKeys(versions) {
			bin, err := artifact.BinaryPath(cache, product, versions[product])
			if err != nil {
				return err
			}
			if m.Binary(product) == bin {
				continue
			}
			if err := s.c.SetBinary(ctx, m, product, bin); err != nil {
				return err
			}
			restarted = true
		}
		if restarted {
			s.mu.Lock()
			s.calls[machine]++
			s.mu.Unlock()
		}
		return nil
	}
	return fmt.Errorf("no machine %s", machine)
}

func (s *swapMachines) restarts(machine string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[machine]
}

// cacheArtifacts finds target versions in the artifact cache, where
// `steppe artifact build` puts them.
type cacheArtifacts struct{}

func (cacheArtifacts) Check(ctx context.Context, product, version string) error {
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		return err
	}
	_, err = artifact.BinaryPath(cache, product, version)
	return err
}
