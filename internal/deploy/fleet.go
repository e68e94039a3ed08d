package deploy

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	version "github.com/hashicorp/go-version"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/cluster"
)

// The fleet is what the cluster is made of as the operator's commands left
// it: which machines exist, in which pool, on which versions. The spec
// says what a new cluster is; once up has made it, versions change only
// through `steppe upgrade` (one machine at a time, behind gates) and pool
// sizes only through `steppe scale` (drains before removals): an edited
// spec run through `up` must not restart every server at once or remove
// machines without draining them. up reports where the spec and the
// fleet differ and which command applies the difference.
type fleet struct {
	// Established is set once up has brought the cluster up healthy;
	// until then up plans the fleet from the spec afresh on every run.
	Established bool `json:"established"`
	// Versions are what new machines run: the spec's at the first up,
	// then the target of each completed upgrade.
	Versions map[string]string `json:"versions"`
	// Pools are the client pools' sizes.
	Pools    map[string]int `json:"pools"`
	Machines []fleetMachine `json:"machines"`
	// BundleVersions is the highest bundle version ever published for
	// each machine name, kept after the machine is removed: a machine
	// made again under a name continues above it, and is told to accept
	// nothing lower (fleetMachine.MinBundle).
	BundleVersions map[string]uint64 `json:"bundle_versions,omitempty"`
}

// fleetMachine is one machine of the fleet.
type fleetMachine struct {
	Name     string            `json:"name"`
	Role     cluster.Role      `json:"role"`
	Pool     string            `json:"pool,omitempty"`
	Versions map[string]string `json:"versions"`
	// Replaces is the machine a surge made this one to replace, until
	// that machine is removed: recorded before the machine is created,
	// so that a resumed upgrade finds it instead of making another.
	Replaces string `json:"replaces,omitempty"`
	// MinBundle is the lowest bundle version the machine accepts, fixed
	// when it joins the fleet (its first bundle's version): a store that
	// replays an older bundle of its name, signed and not yet expired,
	// is refused.
	MinBundle uint64 `json:"min_bundle,omitempty"`
}

func (m fleetMachine) cluster() cluster.Machine {
	return cluster.Machine{Name: m.Name, Role: m.Role, Pool: m.Pool}
}

const (
	fleetFile = "fleet.json"
	lockName  = "steppe.lock"
)

// specVersions are the versions a spec asks for, by product.
func specVersions(spec *cluster.Spec) map[string]string {
	v := map[string]string{cluster.ConsulProduct: spec.Versions.Consul, cluster.NomadProduct: spec.Versions.Nomad}
	if spec.Versions.Vault != "" {
		v[cluster.VaultProduct] = spec.Versions.Vault
	}
	return v
}

// newFleet is the fleet a spec describes.
func newFleet(spec *cluster.Spec) *fleet {
	f := &fleet{Versions: specVersions(spec), Pools: map[string]int{}}
	for _, p := range spec.Pools {
		f.Pools[p.Name] = p.Count
	}
	for _, m := range spec.MachineList() {
		f.Machines = append(f.Machines, fleetMachine{Name: m.Name, Role: m.Role, Pool: m.Pool, Versions: maps.Clone(f.Versions)})
	}
	return f
}

// loadFleet reads the fleet of a state directory; nil when there is none.
func loadFleet(stateDir string) (*fleet, error) {
	p := filepath.Join(stateDir, fleetFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("fleet: %w", err)
	}
	var f fleet
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("fleet %s: %w", p, err)
	}
	return &f, nil
}

func (f *fleet) save(stateDir string) error {
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(stateDir, fleetFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	return nil
}

// reconcile adds to an established fleet the pools the spec has and the
// fleet has not, and says where else they differ.
func (f *fleet) reconcile(spec *cluster.Spec) (warnings []string) {
	for p, v := range specVersions(spec) {
		have := f.Versions[p]
		if have == v {
			continue
		}
		if have == "" {
			// A product the cluster did not run (Vault turned on):
			// nothing to roll, every machine gets it as it is.
			f.Versions[p] = v
			for i := range f.Machines {
				f.Machines[i].Versions[p] = v
			}
			continue
		}
		if older(v, have) {
			warnings = append(warnings, fmt.Sprintf("the spec asks %s %s, older than the %s the cluster runs: write %s in the spec", p, v, have, have))
			continue
		}
		warnings = append(warnings, fmt.Sprintf("the spec asks %s %s; the cluster runs %s (steppe upgrade rolls it, one machine at a time)", p, v, have))
	}
	if n := len(f.machines(cluster.RoleServer, "")); n != spec.Servers.Count {
		warnings = append(warnings, fmt.Sprintf("the spec asks %d servers; the cluster has %d (changing the number of servers is not built yet)", spec.Servers.Count, n))
	}
	for _, p := range spec.Pools {
		n, ok := f.Pools[p.Name]
		switch {
		case !ok:
			f.Pools[p.Name] = p.Count
			for range p.Count {
				f.add(spec.Name, cluster.RoleClient, p.Name, f.Versions, "")
			}
		case n != p.Count:
			warnings = append(warnings, fmt.Sprintf("the spec asks %d machines in pool %s; it has %d (steppe scale %s %d drains before it removes)", p.Count, p.Name, n, p.Name, p.Count))
		}
	}
	for name := range f.Pools {
		if !slices.ContainsFunc(spec.Pools, func(p cluster.Pool) bool { return p.Name == name }) {
			warnings = append(warnings, fmt.Sprintf("pool %s is not in the spec; its machines are left as they are (steppe scale %s 0 removes them)", name, name))
		}
	}
	slices.Sort(warnings)
	return warnings
}

// add appends a new machine to pool (or a server when role is server)
// numbered one past the highest number of its kind, and returns it. A
// number is not used again while the pool grows: a removed machine's
// name lingers for a while as a left Consul member and in reports, and a
// new machine must not be taken for it.
func (f *fleet) add(clusterName string, role cluster.Role, pool string, versions map[string]string, replaces string) fleetMachine {
	prefix := clusterName + "-server-"
	if role == cluster.RoleClient {
		prefix = clusterName + "-" + pool + "-"
	}
	n := 0
	for _, m := range f.Machines {
		if strings.HasPrefix(m.Name, prefix) {
			n = max(n, machineNumber(m.Name))
		}
	}
	name := prefix + strconv.Itoa(n+1)
	m := fleetMachine{Name: name, Role: role, Pool: pool, Versions: maps.Clone(versions), Replaces: replaces, MinBundle: f.BundleVersions[name] + 1}
	f.Machines = append(f.Machines, m)
	return m
}

// published records that version was published for machine name.
func (f *fleet) published(name string, version uint64) {
	if f.BundleVersions == nil {
		f.BundleVersions = map[string]uint64{}
	}
	f.BundleVersions[name] = max(f.BundleVersions[name], version)
}

func (f *fleet) machine(name string) *fleetMachine {
	for i := range f.Machines {
		if f.Machines[i].Name == name {
			return &f.Machines[i]
		}
	}
	return nil
}

func (f *fleet) remove(name string) {
	f.Machines = slices.DeleteFunc(f.Machines, func(m fleetMachine) bool { return m.Name == name })
	for i := range f.Machines {
		if f.Machines[i].Replaces == name {
			f.Machines[i].Replaces = ""
		}
	}
}

// machines are the fleet's machines of a role (and pool, for clients; ""
// means every pool), in the order of their numbers.
func (f *fleet) machines(role cluster.Role, pool string) []fleetMachine {
	var out []fleetMachine
	for _, m := range f.Machines {
		if m.Role == role && (pool == "" || m.Pool == pool) {
			out = append(out, m)
		}
	}
	slices.SortStableFunc(out, func(a, b fleetMachine) int {
		if c := strings.Compare(a.Pool, b.Pool); c != 0 {
			return c
		}
		return machineNumber(a.Name) - machineNumber(b.Name)
	})
	return out
}

// list is every machine, servers first.
func (f *fleet) list() []cluster.Machine {
	var out []cluster.Machine
	for _, m := range append(f.machines(cluster.RoleServer, ""), f.machines(cluster.RoleClient, "")...) {
		out = append(out, m.cluster())
	}
	return out
}

// machineNumber is the number a machine's name ends with.
func machineNumber(name string) int {
	i := strings.LastIndexByte(name, '-')
	n, _ := strconv.Atoi(name[i+1:])
	return n
}

// lockState takes the cluster's lock: up, upgrade and scale change the
// fleet and the machines, one at a time. It goes with the process.
func lockState(stateDir, what string) (release func(), err error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(stateDir, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: lock: %w", what, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: another steppe up, upgrade or scale is running on %s", what, stateDir)
		}
		return nil, fmt.Errorf("%s: lock: %w", what, err)
	}
	return func() { f.Close() }, nil
}

// older says whether version a is older than b; unparsable versions are
// not.
func older(a, b string) bool {
	va, err := version.NewVersion(a)
	if err != nil {
		return false
	}
	vb, err := version.NewVersion(b)
	if err != nil {
		return false
	}
	return va.LessThan(vb)
}
