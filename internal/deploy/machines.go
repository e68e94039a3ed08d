package deploy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/upgrade"
)

// fleetOps acts on the machines of one cluster: up, upgrade and scale
// share it. Each machine pulls its own bundle (role = its name), so that
// an upgrade can move one machine to new versions while the others of
// its role stay where they are.
type fleetOps struct {
	*env
	st             *cluster.State
	opFiles        hashi.TLSFiles
	key            bundle.PrivateKey
	bundlePub      string
	storeURL       string
	artifactKeys   []string // files of the keys trusted to sign the store's SHA256SUMS
	keyring        *artifact.Keyring
	machineTimeout time.Duration

	mu    sync.Mutex // fleet and its file
	fleet *fleet

	apiOnce sync.Once
	apis    upgrade.APIs // management clients, one per address
}

// newProvider makes the spec's provider: local (machines on loopback
// addresses of the host) or netns (a network namespace per machine on
// the cluster's bridge). Both keep the machines in the state directory.
func newProvider(spec *cluster.Spec, stateDir, binary string) (*provider.Local, error) {
	known := map[string][]string{"local": {"first_address"}, "netns": {"subnet"}}
	opts, ok := known[spec.Provider.Name]
	if !ok {
		return nil, fmt.Errorf("provider %q: not built; known providers: local, netns", spec.Provider.Name)
	}
	for k := range spec.Provider.Options {
		if !slices.Contains(opts, k) {
			return nil, fmt.Errorf("provider %q: unknown option %q (known: %s)", spec.Provider.Name, k, strings.Join(opts, ", "))
		}
	}
	lo := provider.LocalOptions{
		Dir:           filepath.Join(stateDir, machinesDir),
		Cluster:       spec.Name,
		FirstAddress:  spec.Provider.Options["first_address"],
		Binary:        binary,
		ArtifactCache: filepath.Join(stateDir, artifactsCache),
	}
	if spec.Provider.Name == "netns" {
		return provider.NewNetns(provider.NetnsOptions{Local: lo, Subnet: spec.Provider.Options["subnet"]})
	}
	return provider.NewLocal(lo)
}

// loadSecrets opens the state directory's secrets and the bundle key.
func (o *fleetOps) loadSecrets() error {
	st, err := cluster.OpenState(o.stateDir)
	if err != nil {
		return err
	}
	o.st = st
	op, err := st.OperatorCert()
	if err != nil {
		return err
	}
	o.opFiles = hashi.TLSFiles{CAFile: st.CAFile(), CertFile: op.CertFile, KeyFile: op.KeyFile}
	o.key, o.bundlePub, err = o.bundleKey()
	return err
}

// ensureArtifacts makes sure every version of versions (product →
// versions) is in the artifact store, verified, and in the cache the
// local machines share. With the default store, the versions are built
// from source into steppe's own store: the release site is not reachable
// from these machines (DESIGN: facts) and its signing key is not pinned
// here, so steppe never tries it on its own. A store the spec gives keys
// for (the release site with HashiCorp's key, or a mirror in the release
// layout over HTTP(S) or file://) must hold them, signed by those keys.
func (o *fleetOps) ensureArtifacts(ctx context.Context, versions map[string][]string) error {
	versions = withCoreDNS(o.spec, versions)
	type want struct{ product, version string }
	var all []want
	for _, p := range slices.Sorted(maps.Keys(versions)) {
		vs := slices.Clone(versions[p])
		slices.Sort(vs)
		for _, v := range slices.Compact(vs) {
			all = append(all, want{p, v})
		}
	}
	if err := os.MkdirAll(o.stateDir, 0o700); err != nil {
		return err
	}
	// Keys name a store to fetch from, the release site included; without
	// keys (only the default store may go without) the versions are built.
	mirror := len(o.spec.ArtifactKeys) > 0
	if mirror {
		o.storeURL = o.spec.ArtifactStore
		keys, err := o.storeKeyFiles()
		if err != nil {
			return err
		}
		o.artifactKeys = keys
	} else {
		b := &artifact.Builder{CacheDir: o.cacheDir, Log: indent{o.out, "    "}, Progress: o.reporter()}
		for _, a := range all {
			if a.product == agent.SteppeProduct {
				continue // not built from module sources: published (upgrade_steppe.go), checked below
			}
			if _, err := b.Build(ctx, a.product, a.version); err != nil {
				return fmt.Errorf("missing artifact %s %s, and building it failed: %w", a.product, a.version, err)
			}
		}
		store := artifact.DefaultStoreDir(o.cacheDir)
		o.storeURL = "file://" + store
		o.artifactKeys = []string{filepath.Join(store, artifact.StoreKeyFile)}
	}
	var err error
	if o.keyring, err = artifact.ReadKeyringFile(o.artifactKeys...); err != nil {
		return fmt.Errorf("artifact store keys: %w", err)
	}
	// Each check hashes and copies 100 MB or more: side by side, they use
	// both cores of a small machine.
	errs := make([]error, len(all))
	var wg sync.WaitGroup
	for i, a := range all {
		wg.Go(func() { errs[i] = o.Check(ctx, a.product, a.version) })
	}
	wg.Wait()
	for i, a := range all {
		if err := errs[i]; err != nil {
			if mirror {
				return fmt.Errorf("missing artifact: %w (publish it in that store, for example with steppe artifact build %s@%s, or leave artifact_store out to have steppe build it)", err, a.product, a.version)
			}
			return err
		}
		o.printf("    %s %s: verified (store %s)", a.product, a.version, o.storeURL)
	}
	return nil
}

// storeKeyFiles are the spec's artifact_keys as copies in the state
// directory, made when the spec file is given (its keys are relative to
// it), so that the machines and later commands do not depend on where
// the operator kept them.
func (o *fleetOps) storeKeyFiles() ([]string, error) {
	dir := filepath.Join(o.stateDir, artifactKeysDir)
	var out []string
	if o.opts.SpecPath == "" {
		for i := range o.spec.ArtifactKeys {
			p := filepath.Join(dir, fmt.Sprintf("%d.asc", i))
			if _, err := os.Stat(p); err != nil {
				return nil, fmt.Errorf("artifact_keys: %w (run steppe up -spec with the spec and its keys)", err)
			}
			out = append(out, p)
		}
		return out, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	for i, k := range o.spec.ArtifactKeys {
		src := k
		if !filepath.IsAbs(src) {
			src = filepath.Join(filepath.Dir(o.opts.SpecPath), k)
		}
		b, err := os.ReadFile(src)
		if err != nil {
			return nil, fmt.Errorf("artifact_keys: %w", err)
		}
		if _, err := artifact.ReadKeyring(b); err != nil {
			return nil, fmt.Errorf("artifact_keys: %s: %w", src, err)
		}
		p := filepath.Join(dir, fmt.Sprintf("%d.asc", i))
		if err := atomicfile.WriteFile(p, b, 0o600); err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// Check implements upgrade.Artifacts: the version is in the store, its
// SHA256SUMS signed by the pinned key and its archive as they say.
func (o *fleetOps) Check(ctx context.Context, product, version string) error {
	f := &artifact.Fetcher{CacheDir: filepath.Join(o.stateDir, artifactsCache), Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if _, err := f.Fetch(ctx, o.storeURL, product, version, runtime.GOOS, runtime.GOARCH, o.keyring); err != nil {
		return fmt.Errorf("artifact %s %s from %s: %w", product, version, o.storeURL, err)
	}
	return nil
}

// fleetVersions are every version some machine of the fleet runs.
func fleetVersions(f *fleet) map[string][]string {
	out := map[string][]string{}
	for p, v := range f.Versions {
		out[p] = append(out[p], v)
	}
	for _, m := range f.Machines {
		for p, v := range m.Versions {
			out[p] = append(out[p], v)
		}
	}
	return out
}

func (o *fleetOps) saveFleet() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.fleet.save(o.stateDir)
}

// withFleet changes the fleet and saves it.
func (o *fleetOps) withFleet(f func(*fleet)) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	f(o.fleet)
	return o.fleet.save(o.stateDir)
}

func (o *fleetOps) fleetMachine(name string) (fleetMachine, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	m := o.fleet.machine(name)
	if m == nil {
		return fleetMachine{}, false
	}
	c := *m
	c.Versions = maps.Clone(m.Versions)
	return c, true
}

// provisioned are the provider's machines, by name.
func (o *fleetOps) provisioned(ctx context.Context) (map[string]provider.Machine, error) {
	ms, err := o.local.List(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]provider.Machine{}
	for _, m := range ms {
		out[m.Name] = m
	}
	return out, nil
}

// serverMachines are the fleet's servers with their addresses, as
// planning needs them (retry_join).
func (o *fleetOps) serverMachines(ctx context.Context) ([]cluster.Machine, error) {
	have, err := o.provisioned(ctx)
	if err != nil {
		return nil, err
	}
	o.mu.Lock()
	servers := o.fleet.machines(cluster.RoleServer, "")
	o.mu.Unlock()
	var out []cluster.Machine
	for _, s := range servers {
		m, ok := have[s.Name]
		if !ok {
			return nil, fmt.Errorf("server %s does not exist (run steppe up)", s.Name)
		}
		out = append(out, m.Cluster())
	}
	return out, nil
}

// create makes the machines ms exist with their secrets and running
// agents that pull their own bundles. It checks every new address is
// free before it starts anything.
func (o *fleetOps) create(ctx context.Context, ms []cluster.Machine) ([]provider.Machine, error) {
	want, err := o.local.Assign(ctx, ms)
	if err != nil {
		return nil, err
	}
	if err := o.local.CheckFree(ctx, want); err != nil {
		return nil, err
	}
	store, err := o.bundleStoreDir()
	if err != nil {
		return nil, err
	}
	out := make([]provider.Machine, len(want))
	errs := make([]error, len(want))
	var wg sync.WaitGroup
	for i, m := range want {
		fm, _ := o.fleetMachine(m.Name)
		wg.Go(func() {
			out[i], errs[i] = o.local.Create(ctx, provider.CreateRequest{
				Machine: m,
				Agent: provider.AgentConfig{
					Cluster: o.spec.Name, Region: o.spec.Region, Datacenter: o.spec.Datacenter,
					BundleRole: m.Name, BundleStore: store,
					BundleKeys: []string{o.bundlePub}, ArtifactKeys: o.artifactKeys,
					HealthTimeout: o.machineTimeout, MinBundleVersion: fm.MinBundle,
				},
				Secrets: func(cm cluster.Machine, dir string) (map[string][]byte, error) {
					return cluster.MachineSecrets(o.spec, o.st, cm, dir)
				},
			})
		})
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

// publish publishes the bundle of one machine: its role's plan on the
// machine's versions. Publishing what is already published changes
// nothing.
func (o *fleetOps) publish(ctx context.Context, name string, servers []cluster.Machine) (published, error) {
	fm, ok := o.fleetMachine(name)
	if !ok {
		return published{}, fmt.Errorf("machine %s is not in the cluster", name)
	}
	spec := *o.spec
	spec.Versions.Consul = fm.Versions[cluster.ConsulProduct]
	spec.Versions.Nomad = fm.Versions[cluster.NomadProduct]
	spec.Versions.Vault = fm.Versions[cluster.VaultProduct]
	spec.Servers.Count = len(servers)
	if fm.Role == cluster.RoleClient && !slices.ContainsFunc(spec.Pools, func(p cluster.Pool) bool { return p.Name == fm.Pool }) {
		// A pool the spec no longer names keeps its machines configured
		// as a plain pool.
		spec.Pools = append(slices.Clone(spec.Pools), cluster.Pool{Name: fm.Pool, Meta: map[string]string{}})
	}
	plans, err := cluster.Plan(&spec, servers)
	if err != nil {
		return published{}, err
	}
	role := cluster.RoleName(fm.cluster())
	i := slices.IndexFunc(plans, func(p cluster.RolePlan) bool { return p.Role == role })
	if i < 0 {
		return published{}, fmt.Errorf("machine %s: no plan for role %s", name, role)
	}
	p := plans[i]
	p.Role = name
	if v := fm.Versions[agent.SteppeProduct]; v != "" {
		// The agent's own binary (upgrade_steppe.go).
		p.Artifacts = append(slices.Clone(p.Artifacts), cluster.ArtifactRef{Product: agent.SteppeProduct, Version: v})
	}
	store, err := o.bundleStoreDir()
	if err != nil {
		return published{}, err
	}
	o.mu.Lock()
	after := o.fleet.BundleVersions[name]
	o.mu.Unlock()
	pub, err := publishRole(ctx, store, o.spec.Name, p, o.storeURL, o.key, after)
	if err != nil || !pub.Changed {
		return pub, err
	}
	return pub, o.withFleet(func(f *fleet) { f.published(name, pub.Version) })
}

// waitMachine waits until a machine runs its published release (version
// or later) with every service ready.
func (o *fleetOps) waitMachine(ctx context.Context, m provider.Machine, version uint64) error {
	client := agent.NewClient(m.Socket)
	var last agent.StatusReport
	var lastErr error
	wait := "waiting until healthy"
	if version > 0 {
		wait = fmt.Sprintf("waiting for release %d", version)
	}
	t := o.task(m.Name, wait)
	for {
		st, err := client.Status(ctx)
		if err == nil {
			last, lastErr = st, nil
			if machineHealthy(st, version) {
				var names []string
				for _, s := range st.Services {
					names = append(names, s.Name)
				}
				t.Done(fmt.Sprintf("    %-24s release %d healthy: %s", m.Name, version, strings.Join(names, ", ")))
				return nil
			}
		} else {
			lastErr = err
		}
		t.Phase("%s: %s", wait, failingCheck(last, lastErr, version))
		select {
		case <-ctx.Done():
			err := fmt.Errorf("machine %s (%s) did not become healthy: %s\n%s", m.Name, m.Address, failingCheck(last, lastErr, version), machineLogs(m, last))
			t.Fail(err)
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// publishAndWait publishes the bundles of the machines named and waits
// until each runs its release healthy.
func (o *fleetOps) publishAndWait(ctx context.Context, ms []provider.Machine) error {
	servers, err := o.serverMachines(ctx)
	if err != nil {
		return err
	}
	versions := make([]uint64, len(ms))
	for i, m := range ms {
		pub, err := o.publish(ctx, m.Name, servers)
		if err != nil {
			return err
		}
		versions[i] = pub.Version
		if pub.Changed {
			o.printf("    %-24s bundle version %d published (signed)", m.Name, pub.Version)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, o.machineTimeout)
	defer cancel()
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() { errs[i] = o.waitMachine(ctx, m, versions[i]) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Upgrade implements upgrade.Machines: the machine's bundle on the new
// versions, published; its agent restarts exactly the daemons whose
// binary changed, and this returns once the machine runs that release
// healthy.
func (o *fleetOps) Upgrade(ctx context.Context, machine string, versions map[string]string) error {
	err := o.withFleet(func(f *fleet) {
		if m := f.machine(machine); m != nil {
			maps.Copy(m.Versions, versions)
		}
	})
	if err != nil {
		return err
	}
	have, err := o.provisioned(ctx)
	if err != nil {
		return err
	}
	m, ok := have[machine]
	if !ok {
		return fmt.Errorf("machine %s does not exist", machine)
	}
	return o.publishAndWait(ctx, []provider.Machine{m})
}

// Consul implements upgrade.APIs with the management token, one client
// per address (polling must reuse connections: Consul and Nomad refuse an
// address that holds too many).
func (o *fleetOps) Consul(addr string) (*consulapi.Client, error) {
	return o.clients().Consul(addr)
}

// Nomad implements upgrade.APIs with the management token, one client per
// address.
func (o *fleetOps) Nomad(addr string) (*nomadapi.Client, error) {
	return o.clients().Nomad(addr)
}

func (o *fleetOps) clients() upgrade.APIs {
	o.apiOnce.Do(func() { o.apis = upgrade.CacheClients(mgmtAPIs{o}) })
	return o.apis
}

// mgmtAPIs makes a new management client per call.
type mgmtAPIs struct{ o *fleetOps }

func (m mgmtAPIs) Consul(addr string) (*consulapi.Client, error) {
	tok, err := m.o.st.Token(cluster.TokenConsulBootstrap)
	if err != nil {
		return nil, err
	}
	return hashi.ConsulClient(fmt.Sprintf("%s:%d", addr, cluster.ConsulHTTPSPort), m.o.opFiles, tok)
}

func (m mgmtAPIs) Nomad(addr string) (*nomadapi.Client, error) {
	tok, err := m.o.st.Token(cluster.TokenNomadBootstrap)
	if err != nil {
		return nil, err
	}
	return hashi.NomadClient(fmt.Sprintf("%s:%d", addr, cluster.NomadHTTPPort), m.o.opFiles, tok)
}

// anyServer runs f against the first server whose API answers.
func anyServer[C any](ctx context.Context, o *fleetOps, client func(string) (C, error), f func(C) error) error {
	servers, err := o.serverMachines(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, s := range servers {
		c, err := client(s.Address)
		if err == nil {
			if err = f(c); err == nil {
				return nil
			}
		}
		errs = append(errs, fmt.Errorf("server %s: %w", s.Name, err))
		if ctx.Err() != nil {
			break
		}
	}
	return errors.Join(errs...)
}

// Create implements upgrade.Pools: one new machine of pool per machine
// replaced, on versions. Each is recorded in the fleet (Replaces) before
// it is made, so asked again for the same machines it makes no more.
func (o *fleetOps) Create(ctx context.Context, pool string, replacing []string, versions map[string]string) ([]upgrade.Client, error) {
	var names []string
	err := o.withFleet(func(f *fleet) {
		// Products not being upgraded stay on the cluster's versions.
		want := maps.Clone(f.Versions)
		maps.Copy(want, versions)
		for _, old := range replacing {
			i := slices.IndexFunc(f.Machines, func(m fleetMachine) bool { return m.Replaces == old })
			if i < 0 {
				names = append(names, f.add(o.spec.Name, cluster.RoleClient, pool, want, old).Name)
				continue
			}
			maps.Copy(f.Machines[i].Versions, want)
			names = append(names, f.Machines[i].Name)
		}
	})
	if err != nil {
		return nil, err
	}
	made, err := o.grow(ctx, names)
	if err != nil {
		return nil, err
	}
	out := make([]upgrade.Client, len(made))
	for i, m := range made {
		out[i] = upgrade.Client{Machine: m.Name, Address: m.Address, Pool: m.Pool}
	}
	return out, nil
}

// grow makes the fleet machines named exist: their Consul tokens first
// (the agents use them from their first second), then the machines, then
// their bundles, healthy.
func (o *fleetOps) grow(ctx context.Context, names []string) ([]provider.Machine, error) {
	var ms []cluster.Machine
	for _, n := range names {
		fm, ok := o.fleetMachine(n)
		if !ok {
			return nil, fmt.Errorf("machine %s is not in the cluster", n)
		}
		ms = append(ms, fm.cluster())
	}
	plan, err := cluster.ConsulACL(o.spec, o.st, ms)
	if err != nil {
		return nil, err
	}
	err = anyServer(ctx, o, o.Consul, func(c *consulapi.Client) error { return hashi.ApplyConsulACL(ctx, c, plan) })
	if err != nil {
		return nil, fmt.Errorf("consul tokens of %s: %w", strings.Join(names, ", "), err)
	}
	made, err := o.create(ctx, ms)
	if err != nil {
		return nil, err
	}
	for _, m := range made {
		o.printf("    %-24s %-15s agent pid %d", m.Name, m.Address, m.PID)
	}
	if err := o.publishAndWait(ctx, made); err != nil {
		return nil, err
	}
	return made, nil
}

// Destroy implements upgrade.Pools: the machine's agent and everything
// it ran stopped and removed, its Consul tokens deleted, and it leaves
// the fleet. A machine already gone is not an error.
func (o *fleetOps) Destroy(ctx context.Context, machine string) error {
	if err := o.local.Destroy(ctx, machine); err != nil {
		return err
	}
	names := []string{cluster.TokenConsulAgent(machine), cluster.TokenNomadConsul(machine)}
	err := anyServer(ctx, o, o.Consul, func(c *consulapi.Client) error {
		if err := hashi.ConsulForceLeave(ctx, c, machine); err != nil {
			return err
		}
		return hashi.DeleteConsulTokens(ctx, c, o.st, names)
	})
	if err != nil {
		return fmt.Errorf("machine %s: %w", machine, err)
	}
	// Its bundles go too: nothing pulls them any more.
	// (An S3 store keeps them: its bucket's lifecycle rules expire them.)
	if store, err := o.bundleStoreDir(); err == nil && !strings.HasPrefix(store, "s3://") && bundle.CheckName("machine", machine) == nil {
		if err := os.RemoveAll(filepath.Join(store, o.spec.Name, machine)); err != nil {
			return fmt.Errorf("machine %s: bundles: %w", machine, err)
		}
	}
	return o.withFleet(func(f *fleet) { f.remove(machine) })
}
