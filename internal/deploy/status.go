package deploy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/upgrade"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/provider"
)

// Status is the whole cluster at a glance.
type Status struct {
	Cluster  string         `json:"cluster"`
	StateDir string         `json:"state_dir"`
	Servers  []ServerStatus `json:"servers"`
	Clients  []ClientStatus `json:"clients"`
	Agents   []AgentStatus  `json:"agents"`
	Consul   []ConsulMember `json:"consul_members"`
	Problems []string       `json:"problems,omitempty"`
	Healthy  bool           `json:"healthy"`
	Took     time.Duration  `json:"took"`
	Raft     *RaftStatus    `json:"raft,omitempty"`
	Vault    *VaultStatus   `json:"vault,omitempty"`
	// DNS says what the machines' resolvers answer (coredns.go).
	DNS string `json:"dns,omitempty"`
}

// RaftStatus sums up the Nomad servers' raft.
type RaftStatus struct {
	Leader string `json:"leader"`
	Voters int    `json:"voters"`
	Peers  int    `json:"peers"`
}

// ServerStatus is one Nomad server.
type ServerStatus struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	Status  string `json:"status"` // serf: alive, failed, left
	Leader  bool   `json:"leader"`
	Voter   bool   `json:"voter"`
	Version string `json:"nomad_version"`
}

// ClientStatus is one Nomad client node.
type ClientStatus struct {
	Name     string `json:"name"`
	Address  string `json:"address"`
	Status   string `json:"status"` // ready, down, initializing
	Eligible bool   `json:"eligible"`
	Drain    bool   `json:"drain"`
	Version  string `json:"nomad_version"`
	Class    string `json:"node_class,omitempty"`
	Pool     string `json:"node_pool"`
}

// ConsulMember is one agent of Consul's LAN pool.
type ConsulMember struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	Server  bool   `json:"server"`
	Status  string `json:"status"`
	Version string `json:"consul_version"`
}

// AgentStatus is one machine's steppe agent, through its local API.
type AgentStatus struct {
	Machine  string          `json:"machine"`
	Address  string          `json:"address"`
	Role     string          `json:"role"`
	Running  bool            `json:"running"`
	PID      int             `json:"pid,omitempty"`
	Release  uint64          `json:"release"`
	Error    string          `json:"error,omitempty"`
	Services []ServiceStatus `json:"services"`
	// Versions are what the machine is set to run (product → version):
	// its bundle's artifacts. Runs is what its daemons report running,
	// as Consul and Nomad see them; the two differ while an upgrade or a
	// new release is on its way.
	Versions map[string]string `json:"versions,omitempty"`
	Runs     map[string]string `json:"runs,omitempty"`
	// Steppe is the version of steppe the machine's agent runs, and
	// SelfUpgrade its last self-upgrade (upgrade_steppe.go).
	Steppe      string                   `json:"steppe,omitempty"`
	SelfUpgrade *agent.SelfUpgradeStatus `json:"self_upgrade,omitempty"`
	// Resolver is the machine's resolv.conf: switched to its CoreDNS, on
	// its fallback, or the host's (coredns.go).
	Resolver string `json:"resolver,omitempty"`
	// resolverProblem is what Resolver makes a problem of, if anything.
	resolverProblem string
}

// ServiceStatus is one service an agent supervises.
type ServiceStatus struct {
	Name     string `json:"name"`
	State    string `json:"state"`
	Ready    bool   `json:"ready"`
	PID      int    `json:"pid,omitempty"`
	Restarts int    `json:"restarts"`
	// LastExit is how its last run ended ("oom" for a kill by the OOM
	// killer, its cgroup's limit or the whole machine's memory), and
	// OOMKills how many runs ended so.
	LastExit string `json:"last_exit,omitempty"`
	OOMKills int    `json:"oom_kills,omitempty"`
}

// GetStatus asks every agent, and Nomad and Consul with the management
// tokens, how the cluster is. What cannot be reached is a problem in the
// report, not an error: status is what one runs when things are broken.
func GetStatus(ctx context.Context, opts Options) (*Status, error) {
	start := time.Now()
	e, err := open(opts)
	if err != nil {
		return nil, err
	}
	if err := e.needState(); err != nil {
		return nil, err
	}
	s := &Status{Cluster: e.spec.Name, StateDir: e.stateDir}
	ms, err := e.local.List(ctx)
	if err != nil {
		return nil, err
	}
	slices.SortFunc(ms, func(a, b provider.Machine) int { return strings.Compare(a.Name, b.Name) })
	s.Agents = make([]AgentStatus, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.Agents[i] = agentStatus(ctx, m)
		}()
	}
	wg.Wait()
	for _, a := range s.Agents {
		if !a.Running {
			s.Problems = append(s.Problems, fmt.Sprintf("machine %s: agent not running", a.Machine))
		} else if a.Error != "" {
			s.Problems = append(s.Problems, fmt.Sprintf("machine %s: %s", a.Machine, a.Error))
		}
		for _, sv := range a.Services {
			if !sv.Ready {
				s.Problems = append(s.Problems, fmt.Sprintf("machine %s: %s is %s, not ready", a.Machine, sv.Name, sv.State))
			}
		}
		if a.resolverProblem != "" {
			s.Problems = append(s.Problems, a.resolverProblem)
		}
	}
	s.DNS = dnsSummary(e.spec)

	st, err := cluster.OpenState(e.stateDir)
	if err != nil {
		return nil, err
	}
	op, err := st.OperatorCert()
	if err != nil {
		return nil, err
	}
	files := hashi.TLSFiles{CAFile: st.CAFile(), CertFile: op.CertFile, KeyFile: op.KeyFile}
	s.Problems = append(s.Problems, certProblems(st, time.Now())...)
	servers := serverAddrs(ms)
	if len(servers) == 0 {
		s.Problems = append(s.Problems, "no server machine")
		return s, nil
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := nomadStatus(qctx, s, st, files, servers); err != nil {
		s.Problems = append(s.Problems, "nomad: "+err.Error())
	}
	for _, sv := range s.Servers {
		// failed, not left: a server that left on purpose is no problem.
		if sv.Status == "failed" {
			s.Problems = append(s.Problems, fmt.Sprintf("Nomad server %s (%s) is %s: the others do not reach it (partitioned, or down)", sv.Name, sv.Address, sv.Status))
		}
	}
	if err := consulStatus(qctx, s, st, files, servers); err != nil {
		s.Problems = append(s.Problems, "consul: "+err.Error())
	}
	if e.spec.Versions.Vault != "" {
		vaultStatus(qctx, s, st, files, serverMachines(ms))
	}
	want := e.spec.Machines() - e.spec.Servers.Count
	if f, err := loadFleet(e.stateDir); err == nil && f != nil {
		want = len(f.machines(cluster.RoleClient, ""))
		for i := range s.Agents {
			if m := f.machine(s.Agents[i].Machine); m != nil {
				s.Agents[i].Versions = m.Versions
			}
		}
	}
	s.fillRuns()
	for _, a := range s.Agents {
		for _, sv := range a.Services {
			if sv.OOMKills > 0 {
				s.Problems = append(s.Problems, fmt.Sprintf("%s/%s was killed by the OOM killer %d times (last run ended: %s): raise its memory in the spec (servers or pool block, memory = { %s = \"...\" }) or find what grows (steppe agent logs %s)",
					a.Machine, sv.Name, sv.OOMKills, sv.LastExit, sv.Name, sv.Name))
			}
		}
	}
	if st, err := pendingUpgrade(e.stateDir); err == nil && st != nil {
		s.Problems = append(s.Problems, fmt.Sprintf("an upgrade to %s is unfinished: run steppe upgrade to finish it", upgrade.DescribeVersions(st.Target)))
	}
	ready := 0
	for _, c := range s.Clients {
		if c.Status == "ready" && c.Eligible && !c.Drain {
			ready++
		}
	}
	if ready < want {
		s.Problems = append(s.Problems, fmt.Sprintf("%d of %d Nomad clients ready and eligible", ready, want))
	}
	if s.Raft == nil || s.Raft.Leader == "" {
		s.Problems = append(s.Problems, "no Nomad leader")
	}
	s.Healthy = len(s.Problems) == 0
	s.Took = time.Since(start)
	return s, nil
}

// fillRuns sets each agent's Runs from the daemons' own reports.
func (s *Status) fillRuns() {
	for i := range s.Agents {
		a := &s.Agents[i]
		runs := map[string]string{}
		for _, m := range s.Consul {
			if m.Name == a.Machine && m.Status == "alive" {
				runs[cluster.ConsulProduct] = m.Version
			}
		}
		for _, sv := range s.Servers {
			if sv.Name == a.Machine && sv.Status == "alive" {
				runs[cluster.NomadProduct] = sv.Version
			}
		}
		for _, c := range s.Clients {
			if c.Name == a.Machine && c.Status == "ready" {
				runs[cluster.NomadProduct] = c.Version
			}
		}
		if a.Steppe != "" {
			runs[agent.SteppeProduct] = a.Steppe
		}
		if len(runs) > 0 {
			a.Runs = runs
		}
	}
}

func serverAddrs(ms []provider.Machine) []string {
	var out []string
	for _, m := range ms {
		if m.Role == cluster.RoleServer && m.Running {
			out = append(out, m.Address)
		}
	}
	return out
}

func agentStatus(ctx context.Context, m provider.Machine) AgentStatus {
	a := AgentStatus{Machine: m.Name, Address: m.Address, Role: cluster.RoleName(m.Cluster()), Running: m.Running, PID: m.PID}
	if !m.Running {
		return a
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := agent.NewClient(m.Socket).Status(ctx)
	if err != nil {
		a.Error = err.Error()
		return a
	}
	a.Steppe, a.SelfUpgrade = st.Agent.Version, st.Agent.SelfUpgrade
	if st.Bundle != nil {
		a.Release = st.Bundle.Version
		if st.Bundle.LastError != "" {
			a.Error = "last pull: " + st.Bundle.LastError
		}
	}
	for _, sv := range st.Services {
		a.Services = append(a.Services, ServiceStatus{Name: sv.Name, State: string(sv.State), Ready: sv.Ready, PID: sv.PID, Restarts: sv.Restarts,
			LastExit: sv.LastExit, OOMKills: sv.OOMKills})
	}
	a.Resolver, a.resolverProblem = resolverStatus(m.Name, st, time.Now())
	return a
}

// firstAnswering tries addresses in turn: a server that is down must not
// hide the others.
func firstAnswering(addrs []string, try func(addr string) error) error {
	var errs []error
	for _, a := range addrs {
		err := try(a)
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func nomadStatus(ctx context.Context, s *Status, st *cluster.State, files hashi.TLSFiles, servers []string) error {
	tok, ok := st.LookupToken(cluster.TokenNomadBootstrap)
	if !ok {
		return errors.New("no management token in the state directory (up has not finished)")
	}
	return firstAnswering(servers, func(addr string) error {
		c, err := hashi.NomadClient(fmt.Sprintf("%s:%d", addr, cluster.NomadHTTPPort), files, tok)
		if err != nil {
			return err
		}
		peers, err := hashi.NomadServers(ctx, c)
		if err != nil {
			return err
		}
		members, err := c.Agent().Members()
		if err != nil {
			return fmt.Errorf("nomad members: %w", err)
		}
		s.Raft = &RaftStatus{Peers: len(peers)}
		s.Servers = nil
		for _, mb := range members.Members {
			name := strings.TrimSuffix(mb.Name, "."+mb.Tags["region"])
			ss := ServerStatus{Name: name, Address: mb.Addr, Status: mb.Status, Version: mb.Tags["build"]}
			for _, p := range peers {
				if p.Name == mb.Name || strings.HasPrefix(p.Addr, mb.Addr+":") {
					ss.Leader, ss.Voter = p.Leader, p.Voter
				}
			}
			if ss.Leader {
				s.Raft.Leader = name
			}
			if ss.Voter {
				s.Raft.Voters++
			}
			s.Servers = append(s.Servers, ss)
		}
		slices.SortFunc(s.Servers, func(a, b ServerStatus) int { return strings.Compare(a.Name, b.Name) })
		nodes, _, err := c.Nodes().List(nil)
		if err != nil {
			return fmt.Errorf("nomad nodes: %w", err)
		}
		s.Clients = nil
		for _, n := range nodes {
			s.Clients = append(s.Clients, ClientStatus{Name: n.Name, Address: n.Address, Status: n.Status,
				Eligible: n.SchedulingEligibility == "eligible", Drain: n.Drain, Version: n.Version, Class: n.NodeClass, Pool: n.NodePool})
		}
		slices.SortFunc(s.Clients, func(a, b ClientStatus) int { return strings.Compare(a.Name, b.Name) })
		return nil
	})
}

func consulStatus(ctx context.Context, s *Status, st *cluster.State, files hashi.TLSFiles, servers []string) error {
	tok, ok := st.LookupToken(cluster.TokenConsulBootstrap)
	if !ok {
		return errors.New("no management token in the state directory (up has not finished)")
	}
	return firstAnswering(servers, func(addr string) error {
		c, err := hashi.ConsulClient(fmt.Sprintf("%s:%d", addr, cluster.ConsulHTTPSPort), files, tok)
		if err != nil {
			return err
		}
		ms, err := c.Agent().Members(false)
		if err != nil {
			return fmt.Errorf("consul members: %w", err)
		}
		s.Consul = nil
		alive := 0
		for _, m := range ms {
			status := map[int]string{0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}[m.Status]
			if m.Status == 1 {
				alive++
			}
			s.Consul = append(s.Consul, ConsulMember{Name: m.Name, Address: m.Addr, Server: m.Tags["role"] == "consul", Status: status, Version: strings.SplitN(m.Tags["build"], ":", 2)[0]})
		}
		slices.SortFunc(s.Consul, func(a, b ConsulMember) int { return strings.Compare(a.Name, b.Name) })
		if alive < len(s.Agents) {
			s.Problems = append(s.Problems, fmt.Sprintf("%d of %d Consul members alive%s", alive, len(s.Agents), notAliveMembers(s)))
		}
		return nil
	})
}

// notAliveMembers names the machines that are not alive members of
// Consul's LAN pool: "; not alive: m1 (failed), m2 (no member)".
func notAliveMembers(s *Status) string {
	var out []string
	for _, a := range s.Agents {
		i := slices.IndexFunc(s.Consul, func(m ConsulMember) bool { return m.Name == a.Machine })
		switch {
		case i < 0:
			out = append(out, a.Machine+" (no member)")
		case s.Consul[i].Status != "alive":
			out = append(out, fmt.Sprintf("%s (%s)", a.Machine, s.Consul[i].Status))
		}
	}
	if len(out) == 0 {
		return ""
	}
	return "; not alive: " + strings.Join(out, ", ")
}

// Env returns the shell exports that point the real nomad and consul
// CLIs at the cluster as its operator (`eval "$(steppe env)"`). They hold
// the management tokens: print them only to the operator.
func Env(ctx context.Context, opts Options) ([]string, error) {
	e, err := open(opts)
	if err != nil {
		return nil, err
	}
	if err := e.needState(); err != nil {
		return nil, err
	}
	ms, err := e.local.List(ctx)
	if err != nil {
		return nil, err
	}
	servers := serverAddrs(ms)
	if len(servers) == 0 {
		return nil, fmt.Errorf("cluster %s: no server machine is running (steppe up)", e.spec.Name)
	}
	st, err := cluster.OpenState(e.stateDir)
	if err != nil {
		return nil, err
	}
	env, err := cluster.CLIEnv(st, answering(ctx, servers, cluster.ConsulHTTPSPort), answering(ctx, servers, cluster.NomadHTTPPort))
	if err != nil || e.spec.Versions.Vault == "" {
		return env, err
	}
	return append(env, cluster.VaultCLIEnv(st, unsealedVault(ctx, st, servers))...), nil
}

// answering is host:port of the first server that accepts a connection on
// port, so that the CLIs do not point at a dead server; the first server
// when none does (the CLIs then say what is wrong).
func answering(ctx context.Context, servers []string, port int) string {
	var d net.Dialer
	for _, s := range servers {
		addr := net.JoinHostPort(s, strconv.Itoa(port))
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := d.DialContext(dctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return addr
		}
	}
	return net.JoinHostPort(servers[0], strconv.Itoa(port))
}

// CLIBinDir returns a directory holding the cluster's own nomad and consul
// binaries (links into the artifact cache, made on first use), so that the
// CLIs an operator runs are of the versions the cluster runs.
func CLIBinDir(opts Options) (string, error) {
	e, err := open(opts)
	if err != nil {
		return "", err
	}
	if err := e.needState(); err != nil {
		return "", err
	}
	dir := filepath.Join(e.stateDir, "bin")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("cli bin dir: %w", err)
	}
	products := map[string]string{"nomad": e.spec.Versions.Nomad, "consul": e.spec.Versions.Consul}
	if e.spec.Versions.Vault != "" {
		products["vault"] = e.spec.Versions.Vault
	}
	for product, version := range products {
		bin, err := artifact.BinaryPath(e.cacheDir, product, version)
		if err != nil {
			return "", err
		}
		link := filepath.Join(dir, product)
		if cur, err := os.Readlink(link); err == nil && cur == bin {
			continue
		}
		if err := atomicfile.Symlink(bin, link); err != nil {
			return "", fmt.Errorf("cli bin dir: %w", err)
		}
	}
	return dir, nil
}

// ShellQuote quotes s for a POSIX shell.
func ShellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Down stops every machine of the cluster and removes every process,
// cgroup, mount and file up made: the machines, the bundles, the shared
// artifact cache and the state directory (CA, keys and tokens of a
// cluster that no longer exists). The artifact build cache stays: it is
// not the cluster's.
func Down(ctx context.Context, opts Options) error {
	e, err := open(opts)
	if err != nil {
		return err
	}
	if !e.exists() {
		if _, err := os.Stat(e.stateDir); err == nil {
			return fmt.Errorf("%s is not a steppe cluster's state directory (no %s): not touching it", e.stateDir, markerFile)
		}
		e.printf("no cluster %q in %s: nothing to do", e.spec.Name, e.stateDir)
		return nil
	}
	start := time.Now()
	ms, err := e.local.List(ctx)
	if err != nil {
		return err
	}
	e.printf("==> stopping %d machines of cluster %s", len(ms), e.spec.Name)
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.Now()
			task := e.task(m.Name, "stopping its agent and services, removing its files")
			errs[i] = e.local.Destroy(ctx, m.Name)
			if errs[i] != nil {
				task.Fail(errs[i])
				return
			}
			task.Done(fmt.Sprintf("    %-24s %-15s removed in %s", m.Name, m.Address, time.Since(t).Round(10*time.Millisecond)))
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("down: %w (run steppe down again to retry)", err)
	}
	if err := e.local.Cleanup(ctx); err != nil {
		return fmt.Errorf("down: %w", err)
	}
	if store, err := e.bundleStoreDir(); err == nil && !strings.HasPrefix(store, "s3://") && !strings.HasPrefix(store, e.stateDir+string(filepath.Separator)) {
		if err := os.RemoveAll(filepath.Join(store, e.spec.Name)); err != nil {
			return fmt.Errorf("down: bundles: %w", err)
		}
	}
	if err := os.RemoveAll(e.stateDir); err != nil {
		return fmt.Errorf("down: state dir: %w", err)
	}
	if opts.StateDir == "" {
		// The default directory's parent (.../steppe) was made by up too;
		// it stays while it holds another cluster.
		_ = os.Remove(filepath.Dir(e.stateDir))
	}
	e.printf("cluster %s removed in %s (state directory %s deleted)", e.spec.Name, time.Since(start).Round(10*time.Millisecond), e.stateDir)
	return nil
}
