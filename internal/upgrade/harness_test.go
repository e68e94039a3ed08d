package upgrade

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"
	vaultapi "github.com/hashicorp/vault/api"

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
	started               int // machines started, in plan order
}

// newTestCluster starts 3 servers and clients client machines of the
// default pool (Nomad clients need withNomad); spares more client
// machines are planned, with their secrets, but not started (surgePools
// starts them).
func newTestCluster(ctx context.Context, tb testing.TB, withNomad bool, clients, spares int, addrs ...string) *testCluster {
	tb.Helper()
	consulBin := hashitest.Binary(tb, "consul", consulFrom)
	hashitest.Binary(tb, "consul", consulTo)
	var nomadBin string
	if withNomad {
		nomadBin = hashitest.Binary(tb, "nomad", nomadFrom)
		hashitest.Binary(tb, "nomad", nomadTo)
	}
	spec := cluster.DefaultSpec()
	spec.Pools[0].Count = clients + spares
	if clients+spares == 0 {
		spec.Pools = nil
	}
	c := hashitest.New(tb, spec, addrs)
	tc := &testCluster{Cluster: c}
	var err error
	started := c.Machines[:spec.Servers.Count+clients]
	if tc.consulMgmt, err = c.StartConsul(ctx, consulBin, started); err != nil {
		tb.Fatal(err)
	}
	if withNomad {
		if tc.nomadMgmt, err = c.StartNomad(ctx, nomadBin, started); err != nil {
			tb.Fatal(err)
		}
	}
	tc.machines = &swapMachines{tb: tb, c: c, calls: map[string]int{}, products: map[string]int{}}
	tc.started = len(started)
	return tc
}

// surgePools creates client machines by starting the next spare machine
// of the plan (its daemons on the asked versions, under its own
// supervisor) and destroys one by stopping its daemons: what the local
// provider does with an agent process.
type surgePools struct{ tc *testCluster }

func (p surgePools) Create(ctx context.Context, pool string, replacing []string, versions map[string]string) ([]Client, error) {
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		return nil, err
	}
	bins := map[string]string{}
	for product, v := range versions {
		if bins[product], err = artifact.BinaryPath(cache, product, v); err != nil {
			return nil, err
		}
	}
	var out []Client
	for range replacing {
		if p.tc.started >= len(p.tc.Machines) {
			return out, fmt.Errorf("no spare machine left in pool %s", pool)
		}
		m := p.tc.Machines[p.tc.started]
		p.tc.started++
		if err := p.tc.Start(ctx, m, bins, "consul", "nomad"); err != nil {
			return out, err
		}
		out = append(out, Client{Machine: m.Name, Address: m.Address, Pool: m.Pool})
	}
	return out, nil
}

func (p surgePools) Destroy(ctx context.Context, machine string) error {
	for _, m := range p.tc.Machines {
		if m.Name == machine {
			if err := p.tc.Stop(ctx, m, "nomad"); err != nil {
				return err
			}
			if err := p.tc.Stop(ctx, m, "consul"); err != nil {
				return err
			}
			// A stop is not a departure (leave_on_terminate is off): a
			// machine removed for good is force-left, as the local
			// provider's removal does (deploy: fleetOps.Destroy).
			c, err := p.tc.Consul(p.tc.Machines[0].Address)
			if err != nil {
				return err
			}
			return hashi.ConsulForceLeave(ctx, c, machine)
		}
	}
	return fmt.Errorf("no machine %s", machine)
}

func (tc *testCluster) config(stateDir string, target map[string]string) Config {
	cfg := Config{StateDir: stateDir, Target: target, APIs: tc, Machines: tc.machines, Artifacts: cacheArtifacts{}}
	for _, m := range tc.ServerMachines() {
		cfg.Servers = append(cfg.Servers, Server{Machine: m.Name, Address: m.Address})
	}
	for _, m := range tc.Machines[len(tc.ServerMachines()):tc.started] {
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

// Vault: the harness's clusters run no Vault (its upgrade path is tested
// end to end in e2e, where steppe up initialises and unseals it).
func (tc *testCluster) Vault(addr string) (*vaultapi.Client, error) {
	return nil, fmt.Errorf("no vault in the upgrade harness (%s)", addr)
}

// swapMachines upgrades a machine by swapping the binary in its
// supervisor's spec: the supervisor restarts the daemon on the new
// binary, as it would when the agent applies a bundle with new artifact
// versions. Nothing is faked: the new process is the new release.
type swapMachines struct {
	tb       testing.TB
	c        *hashitest.Cluster
	mu       sync.Mutex
	calls    map[string]int // machine → Upgrade calls that restarted something
	products map[string]int // machine/product → restarts of that daemon
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
		for _, product := range slices.Sorted(maps.Keys(versions)) {
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
			s.mu.Lock()
			s.products[machine+"/"+product]++
			s.mu.Unlock()
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

// productRestarts counts the restarts of one daemon of a machine.
func (s *swapMachines) productRestarts(machine, product string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.products[machine+"/"+product]
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
