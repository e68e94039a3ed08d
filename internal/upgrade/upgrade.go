// Package upgrade runs health-gated rolling upgrades of a cluster's
// Consul, Nomad and Vault: a preflight that refuses what is unsafe, snapshots
// first, servers one at a time (non-leaders first, the leader last or
// after a leadership transfer) each behind a gate, then clients drained
// and upgraded; every step recorded in the operator's state directory so
// that an interrupted upgrade resumes where it stopped.
package upgrade

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"
	vaultapi "github.com/hashicorp/vault/api"

	"github.com/steppe/steppe/internal/hashi"
)

// Products, in the order they are upgraded.
const (
	Consul = "consul"
	Nomad  = "nomad"
	Vault  = "vault" // servers only
)

// Machines replaces the daemons of a machine. The deploy side implements
// it by publishing the machine's bundle with new artifact versions.
type Machines interface {
	// Upgrade makes machine run the given versions (product → version)
	// and restarts the daemons whose version changed; it returns once
	// they are started again (the gates judge their health). Asking for
	// what a machine already runs changes nothing.
	Upgrade(ctx context.Context, machine string, versions map[string]string) error
}

// Artifacts says whether a product's version can be installed.
type Artifacts interface {
	Check(ctx context.Context, product, version string) error
}

// APIs gives management clients of the daemons on a machine address.
type APIs interface {
	Consul(addr string) (*consulapi.Client, error)
	Nomad(addr string) (*nomadapi.Client, error)
	Vault(addr string) (*vaultapi.Client, error)
}

// Server is a server machine (it runs a Consul and a Nomad server).
type Server struct {
	Machine string
	Address string // its address, as in the raft configuration
}

// Client is a client machine (a Consul client agent and a Nomad client).
type Client struct {
	Machine string // also its Consul node and Nomad node name
	Address string
	Pool    string
}

// ClientStrategy says how client machines are upgraded.
type ClientStrategy struct {
	// Parallelism is how many client machines of a pool are upgraded at
	// once (default 1).
	Parallelism int `json:"parallelism"`
	// DrainDeadline bounds each drain: jobs migrate as their migrate
	// blocks say, and what is left is stopped at the deadline (default 5m).
	DrainDeadline time.Duration `json:"drain_deadline"`
	// Surge replaces client machines instead of upgrading them in place:
	// new machines on the new versions first (Config.Pools creates them),
	// ready, then the old ones drained and destroyed.
	Surge bool `json:"surge,omitempty"`
}

// Pools creates and destroys client machines, for surge upgrades. The
// provider implements it.
type Pools interface {
	// Create makes one new machine in pool for each machine of
	// replacing, running versions (product → version), and returns them
	// in that order once their daemons are started. Asked again for the
	// same replacing machines (a resumed upgrade) it returns the machines
	// it made the first time instead of making more.
	Create(ctx context.Context, pool string, replacing []string, versions map[string]string) ([]Client, error)
	// Destroy stops a machine's daemons and removes it; a machine that
	// is already gone is not an error (a resumed upgrade may ask again).
	Destroy(ctx context.Context, machine string) error
}

// Event is a line of progress.
type Event struct {
	Step    string
	Machine string
	Phase   string
	Message string
}

// Config is an upgrade.
type Config struct {
	// StateDir is the operator's state directory: the upgrade's state
	// file and snapshots live there.
	StateDir string
	// Target maps products to the versions to run ("consul" →
	// "1.14.11"); a product not named is left alone.
	Target  map[string]string
	Servers []Server
	Clients []Client
	// Force skips the version policy (downgrades, jumps); never the
	// health checks.
	Force bool

	APIs      APIs
	Machines  Machines
	Pools     Pools // needed for ClientStrategy.Surge
	Artifacts Artifacts
	// Unsealer unseals the Vault servers the upgrade restarts; needed
	// when Vault is upgraded.
	Unsealer Unsealer
	Gate     Gate
	ClientStrategy

	// Progress, if set, is told of every phase as it ends.
	Progress func(Event)
	Log      *slog.Logger
}

// Upgrader runs one upgrade.
type Upgrader struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex // st and its file
	st    *State
	prods map[string]product

	slowMu sync.Mutex
	slow   map[string]slowServer // by address: servers that last failed to answer
}

// slowServer is a server's last failure to answer a query.
type slowServer struct {
	machine string
	at      time.Time
	err     error
}

// New checks cfg and prepares an upgrade.
func New(cfg Config) (*Upgrader, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("upgrade: no state directory")
	}
	if len(cfg.Servers) == 0 {
		return nil, errors.New("upgrade: no servers")
	}
	if cfg.APIs == nil || cfg.Machines == nil || cfg.Artifacts == nil {
		return nil, errors.New("upgrade: APIs, Machines and Artifacts are required")
	}
	for p, v := range cfg.Target {
		if p != Consul && p != Nomad && p != Vault {
			return nil, fmt.Errorf("upgrade: cannot upgrade %q (consul, nomad and vault can be)", p)
		}
		if v == "" {
			return nil, fmt.Errorf("upgrade: no target version for %s", p)
		}
	}
	if _, ok := cfg.Target[Vault]; ok && cfg.Unsealer == nil {
		return nil, errors.New("upgrade: upgrading vault needs an Unsealer")
	}
	if cfg.Surge && cfg.Pools == nil {
		return nil, errors.New("upgrade: a surge of client machines needs Pools")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Parallelism <= 0 {
		cfg.Parallelism = 1
	}
	if cfg.DrainDeadline <= 0 {
		cfg.DrainDeadline = 5 * time.Minute
	}
	cfg.Gate = cfg.Gate.withDefaults()
	// The gates ask the servers several times a second: one client per
	// address, so its connections are reused. A client made per call
	// leaves its idle connections open, and Nomad answers 429 once an
	// address holds 100 of them (limits.http_max_conns_per_client).
	cfg.APIs = CacheClients(cfg.APIs)
	u := &Upgrader{cfg: cfg, log: cfg.Log}
	u.prods = products(u)
	return u, nil
}

// Run runs the upgrade, or resumes the one recorded in the state
// directory, until every step is done. It stops at the first step that
// fails, with what is wrong; run it again to resume. It returns the state
// (the report) in every case where one was made.
func (u *Upgrader) Run(ctx context.Context) (*State, error) {
	if err := os.MkdirAll(u.cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	release, err := lock(u.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	defer release()

	st, err := LoadState(u.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if st != nil && !st.Done {
		if !maps.Equal(st.Target, u.cfg.Target) {
			return st, fmt.Errorf("an upgrade to %s is in progress (%s): run it to the end first", DescribeVersions(st.Target), filepath.Join(u.cfg.StateDir, StateFile))
		}
		u.log.Info("resuming the upgrade", "target", DescribeVersions(st.Target))
	} else {
		pre, err := u.Preflight(ctx)
		if err != nil {
			return nil, err
		}
		if st != nil {
			// Keep the report of the last upgrade.
			old := filepath.Join(u.cfg.StateDir, fmt.Sprintf("upgrade-%s.json", st.Created.UTC().Format("20060102T150405.000Z")))
			if err := os.Rename(filepath.Join(u.cfg.StateDir, StateFile), old); err != nil {
				return nil, fmt.Errorf("upgrade: keep the last report: %w", err)
			}
		}
		st = u.plan(pre)
	}
	u.st = st
	if err := u.save(); err != nil {
		return st, err
	}
	for {
		i, err := u.next(ctx)
		if err != nil {
			return st, err
		}
		if i < 0 {
			break
		}
		if err := ctx.Err(); err != nil {
			return st, fmt.Errorf("upgrade interrupted before %s: %w", st.Steps[i].ID, err)
		}
		if st.Steps[i].Kind == KindClient {
			err = u.runClients(ctx)
		} else {
			err = u.runStep(ctx, i)
		}
		if err != nil {
			return st, err
		}
	}
	u.mu.Lock()
	st.Done = true
	u.mu.Unlock()
	return st, u.save()
}

// next picks the step to run: an interrupted one first (to verify it);
// then in plan order, except that among the servers of a product a
// non-leader goes before the leader.
func (u *Upgrader) next(ctx context.Context) (int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	steps := u.st.Steps
	for i, s := range steps {
		if s.Status == StatusRunning && s.Kind != KindClient {
			return i, nil
		}
	}
	for i, s := range steps {
		if s.Status == StatusDone {
			continue
		}
		if s.Kind != KindServer {
			return i, nil
		}
		// The first server step not done: if it is the leader and another
		// of the same product is pending, that one goes first.
		u.mu.Unlock()
		h, err := u.prods[s.Product].health(ctx, "")
		u.mu.Lock()
		if err != nil {
			return i, nil // the step's own checks will say what is wrong
		}
		for j := i; j < len(steps); j++ {
			o := steps[j]
			if o.Kind != KindServer || o.Product != s.Product || o.Status == StatusDone {
				continue
			}
			if sh, ok := h.ByHost(o.Address); ok && !sh.Leader {
				return j, nil
			}
		}
		return i, nil
	}
	return -1, nil
}

func (u *Upgrader) save() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.st.save(u.cfg.StateDir)
}

// update changes step i under the lock and saves the state.
func (u *Upgrader) update(i int, f func(*Step)) error {
	u.mu.Lock()
	f(&u.st.Steps[i])
	err := u.st.save(u.cfg.StateDir)
	u.mu.Unlock()
	return err
}

func (u *Upgrader) progress(s *Step, phase, msg string) {
	u.log.Info(msg, "step", s.ID, "phase", phase)
	if u.cfg.Progress != nil {
		u.cfg.Progress(Event{Step: s.ID, Machine: s.Machine, Phase: phase, Message: msg})
	}
}

// phase times f as a phase of step i, and records it only once it
// completed: a phase cut short by a kill or an error is not done, and a
// resumed step must not take it for done.
func (u *Upgrader) phase(i int, name string, f func() error) error {
	start := time.Now()
	if err := f(); err != nil {
		return err
	}
	d := time.Since(start)
	if err := u.update(i, func(s *Step) { s.Phases = append(s.Phases, Phase{Name: name, Seconds: d.Seconds()}) }); err != nil {
		return err
	}
	u.mu.Lock()
	s := u.st.Steps[i]
	u.mu.Unlock()
	u.progress(&s, name, fmt.Sprintf("%s: %s done in %v", s.ID, name, d.Round(time.Millisecond)))
	return nil
}

// fail records the failure of step i and returns err.
func (u *Upgrader) fail(i int, err error) error {
	u.update(i, func(s *Step) {
		s.Status = StatusFailed
		s.Error = err.Error()
		s.Finished = time.Now()
	})
	return err
}

func (u *Upgrader) runStep(ctx context.Context, i int) error {
	return u.runRecorded(ctx, i, func(s Step, prev StepStatus) error {
		switch s.Kind {
		case KindSnapshot:
			return u.snapshot(ctx, i, s)
		case KindServer:
			return u.server(ctx, i, s, prev)
		default:
			return fmt.Errorf("step %s: unknown kind %q", s.ID, s.Kind)
		}
	})
}

// runRecorded runs step i through run, recording it as running, then done or
// failed. run is told the status the step had: a step found running was
// interrupted, and is verified before anything is redone.
func (u *Upgrader) runRecorded(ctx context.Context, i int, run func(s Step, prev StepStatus) error) error {
	var prev StepStatus
	var s Step
	if err := u.update(i, func(st *Step) {
		prev = st.Status
		st.Resumed = st.Resumed || st.Status == StatusRunning
		st.Status = StatusRunning
		st.Attempts++
		st.Error = ""
		if st.Started.IsZero() {
			st.Started = time.Now()
		}
		s = *st
	}); err != nil {
		return err
	}
	// Said at the start too: a step's gate waits for tens of seconds
	// with nothing else to say.
	what := fmt.Sprintf("%s: %s → %s", s.ID, s.From, s.To)
	if s.To == "" {
		what = s.ID + ": started"
	}
	if prev == StatusRunning {
		what += " (resumed: verified before anything is redone)"
	}
	u.progress(&s, "start", what)
	if err := run(s, prev); err != nil {
		if ctx.Err() != nil {
			// Interrupted: the step stays running, to be verified by the
			// next run.
			return fmt.Errorf("upgrade interrupted in %s: %w", s.ID, err)
		}
		return u.fail(i, fmt.Errorf("%s: %w", s.ID, err))
	}
	if err := u.update(i, func(st *Step) {
		st.Status = StatusDone
		st.Finished = time.Now()
		s = *st
	}); err != nil {
		return err
	}
	u.progress(&s, "done", fmt.Sprintf("%s: done in %v", s.ID, s.Duration().Round(100*time.Millisecond)))
	return nil
}

func (u *Upgrader) snapshot(ctx context.Context, i int, s Step) error {
	path := filepath.Join(u.cfg.StateDir, SnapshotsDir, fmt.Sprintf("%s-%s-%s.snap", s.Product, s.From, time.Now().UTC().Format("20060102T150405Z")))
	var info hashi.SnapshotInfo
	err := u.phase(i, "snapshot", func() error {
		var err error
		info, err = u.prods[s.Product].snapshot(ctx, path)
		return err
	})
	if err != nil {
		return err
	}
	return u.update(i, func(s *Step) {
		s.Snapshot = info.Path
		s.Note = fmt.Sprintf("%d bytes, %s checked", info.Bytes, strings.Join(info.Files, ", "))
	})
}

// server upgrades one server: the cluster must be fit to lose it; if it
// leads and the product can hand leadership over to an upgraded server,
// it does; then its daemon is replaced and the gate waits for it. A step
// interrupted after its restart, or whose server already runs the target
// version, is only verified by the gate, not restarted again.
func (u *Upgrader) server(ctx context.Context, i int, s Step, prev StepStatus) error {
	p := u.prods[s.Product]
	n := len(u.cfg.Servers)
	members, err := p.members(ctx, "")
	if err != nil {
		return err
	}
	current := memberAt(members, s.Address)
	// A restart phase is recorded only once it completed (see phase), so
	// a step cut short before that is restarted again; one cut short
	// after it, or whose daemon already reports the target, goes to the
	// gate, which decides from what the daemon reports.
	switch {
	case prev == StatusRunning && hasPhase(s.Phases, "restart"):
		u.update(i, func(st *Step) {
			st.Note = joinNote(st.Note, "interrupted after its restart: verified, not restarted again")
		})
	case current != nil && current.Alive && current.Version == s.To:
		u.update(i, func(st *Step) { st.Note = joinNote(st.Note, "found on "+s.To+": verified, not restarted") })
	default:
		// Nothing proceeds on an unhealthy cluster.
		h, err := p.health(ctx, "")
		if err != nil {
			return err
		}
		if probs := h.Problems(n); len(probs) > 0 {
			if prev == StatusPending {
				return fmt.Errorf("refused: the %s cluster is not healthy: %s", s.Product, strings.Join(probs, "; "))
			}
			// A retried step's server may be the one missing; the others
			// must be fine.
			if err := othersHealthy(h, s.Address); err != nil {
				return fmt.Errorf("refused: %w", err)
			}
		}
		if err := pingAll(ctx, u, p, s.Address); err != nil {
			return fmt.Errorf("refused: %w", err)
		}
		if me, ok := h.ByHost(s.Address); ok && me.Leader {
			if err := u.handOver(ctx, i, p, h, s); err != nil {
				return err
			}
		}
		err = u.phase(i, "restart", func() error {
			return u.cfg.Machines.Upgrade(ctx, s.Machine, map[string]string{s.Product: s.To})
		})
		if err != nil {
			return fmt.Errorf("upgrade %s on %s: %w", s.Product, s.Machine, err)
		}
	}
	if st, ok := p.(settler); ok {
		// Also when resumed or found on the target: a server restarted
		// by an interrupted step may still be sealed.
		if err := u.phase(i, "unseal", func() error { return st.settle(ctx, s) }); err != nil {
			return fmt.Errorf("unseal %s on %s: %w", s.Product, s.Machine, err)
		}
	}
	return u.cfg.Gate.server(ctx, u, i, p, s, n)
}

// products are the upgrade's products, each asking the servers through u.
func products(u *Upgrader) map[string]product {
	return map[string]product{
		Consul: &consulProduct{u: u},
		Nomad:  &nomadProduct{u: u},
		Vault:  &vaultProduct{u: u},
	}
}

func hasPhase(ps []Phase, name string) bool {
	for _, p := range ps {
		if p.Name == name {
			return true
		}
	}
	return false
}

// handOver moves leadership away from the server of step s before it
// restarts: to an upgraded, healthy server where the product can, else
// it is the last one of its product anyway (next orders leaders last).
func (u *Upgrader) handOver(ctx context.Context, i int, p product, h hashi.ClusterHealth, s Step) error {
	if !p.canTransfer() {
		u.update(i, func(st *Step) {
			st.Note = joinNote(st.Note, "the leader, restarted last: "+s.Product+" cannot transfer leadership here")
		})
		return nil
	}
	members, err := p.members(ctx, "")
	if err != nil {
		return err
	}
	for _, o := range h.Servers {
		m := memberAt(members, o.Host())
		if o.Leader || !o.Healthy || !o.Voter || m == nil || m.Version != s.To {
			continue
		}
		err := u.phase(i, "transfer", func() error { return p.transfer(ctx, o.ID, "") })
		if err != nil {
			return err
		}
		// Who leads now, as the cluster says: Vault's step-down lets any
		// standby take over.
		to := o.Name
		if h2, err := p.health(ctx, ""); err == nil {
			if l, ok := h2.Leader(); ok {
				to = l.Name
			}
		}
		u.update(i, func(st *Step) { st.Note = joinNote(st.Note, "leadership transferred to "+to) })
		return nil
	}
	u.update(i, func(st *Step) { st.Note = joinNote(st.Note, "the leader: no upgraded server to hand leadership to") })
	return nil
}

func othersHealthy(h hashi.ClusterHealth, host string) error {
	var probs []string
	for _, s := range h.Servers {
		if s.Host() != host && (!s.Healthy || !s.Voter) {
			probs = append(probs, fmt.Sprintf("server %s is unhealthy or not a voter", s.Name))
		}
	}
	if _, ok := h.Leader(); !ok {
		probs = append(probs, "no leader")
	}
	if len(probs) > 0 {
		return errors.New(strings.Join(probs, "; "))
	}
	return nil
}

func memberAt(ms []hashi.Member, addr string) *hashi.Member {
	for i := range ms {
		if ms[i].Addr == addr && ms[i].Server {
			return &ms[i]
		}
	}
	return nil
}

func joinNote(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// DescribeVersions is "consul 1.14.11, nomad 1.10.5".
func DescribeVersions(m map[string]string) string {
	var parts []string
	for _, p := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, p+" "+m[p])
	}
	return strings.Join(parts, ", ")
}

// CacheClients returns APIs that make one client per address and
// product through apis and then reuse it, with its connections. Caching
// what is cached already changes nothing.
func CacheClients(apis APIs) APIs {
	if c, ok := apis.(*cachedAPIs); ok {
		return c
	}
	return &cachedAPIs{apis: apis, consul: map[string]*consulapi.Client{}, nomad: map[string]*nomadapi.Client{}, vault: map[string]*vaultapi.Client{}}
}

// cachedAPIs makes one client per address and product.
type cachedAPIs struct {
	apis   APIs
	mu     sync.Mutex
	consul map[string]*consulapi.Client
	nomad  map[string]*nomadapi.Client
	vault  map[string]*vaultapi.Client
}

func (c *cachedAPIs) Consul(addr string) (*consulapi.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.consul[addr]; ok {
		return cl, nil
	}
	cl, err := c.apis.Consul(addr)
	if err == nil {
		c.consul[addr] = cl
	}
	return cl, err
}

func (c *cachedAPIs) Nomad(addr string) (*nomadapi.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.nomad[addr]; ok {
		return cl, nil
	}
	cl, err := c.apis.Nomad(addr)
	if err == nil {
		c.nomad[addr] = cl
	}
	return cl, err
}

func (c *cachedAPIs) Vault(addr string) (*vaultapi.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.vault[addr]; ok {
		return cl, nil
	}
	cl, err := c.apis.Vault(addr)
	if err == nil {
		c.vault[addr] = cl
	}
	return cl, err
}
