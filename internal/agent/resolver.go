package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/hcl/v2"
	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/supervise"
)

// The machine's resolv.conf is switched to its local resolver (CoreDNS,
// a bundle service) only once that resolver answers a consul. query, and
// switched back to what it was when the resolver has not answered for
// FallbackAfter (DESIGN: decision 12; the seed's two-pass DNS bootstrap
// made one step). "Answers" means a DNS response for consul.service.consul
// that is NOERROR or NXDOMAIN: the machine's Consul spoke through it. A
// SERVFAIL (CoreDNS could not reach Consul), a REFUSED (no consul. zone)
// or silence is not an answer.

// Resolver says which resolv.conf the agent manages (config: a resolver
// block, written by providers whose machines have a resolv.conf of their
// own; none on the local provider, whose resolv.conf is the host's).
type Resolver struct {
	// ResolvConf is the file the agent writes: replaced atomically, or,
	// with Mount, rewritten in place under cover (rewriteCovered).
	ResolvConf string
	// Mount, when set, is where the machine sees ResolvConf through a
	// bind mount in its own mount namespace (the netns provider's
	// /etc/resolv.conf), which holds the file's inode.
	Mount string
	// Address is the local resolver's IP address (port 53), what the
	// switched resolv.conf names.
	Address string
	// FallbackAfter is how long the resolver may not answer before the
	// previous resolv.conf comes back.
	FallbackAfter time.Duration
}

// DefaultResolverFallback is FallbackAfter when the block sets none.
const DefaultResolverFallback = 10 * time.Second

// Resolver states (ResolverStatus.State).
const (
	ResolverWaiting  = "waiting"  // never answered yet: resolv.conf is as it was
	ResolverSwitched = "switched" // resolv.conf names the local resolver
	ResolverFallback = "fallback" // it stopped answering: the previous resolv.conf is back
)

// ResolverStatus is the resolver part of the agent's status.
type ResolverStatus struct {
	ResolvConf    string    `json:"resolv_conf"`
	Address       string    `json:"address"`
	State         string    `json:"state"`
	Since         time.Time `json:"since"`
	Switches      int       `json:"switches"`
	FallbackAfter string    `json:"fallback_after"`
	LastAnswer    time.Time `json:"last_answer,omitzero"`
	LastError     string    `json:"last_error,omitempty"`
}

// previousResolvConf keeps, in the state dir, the resolv.conf as it was
// before the switch: an agent restarted while switched restores it too.
const previousResolvConf = "resolver/previous-resolv.conf"

// resolverProbeName is what the probe asks: Consul's own service, which
// every Consul server registers.
const resolverProbeName = "consul.service.consul."

// resolver runs the switch of one machine.
type resolver struct {
	cfg      Resolver
	stateDir string
	log      *slog.Logger
	interval time.Duration
	// hostMountNS is the namespace file of the host's mount namespace.
	hostMountNS string

	done chan struct{} // closed when run returns

	mu       sync.Mutex
	st       ResolverStatus
	previous []byte // only run (and stop, after it) use it
}

func newResolver(cfg Resolver, stateDir string, log *slog.Logger) *resolver {
	if cfg.FallbackAfter == 0 {
		cfg.FallbackAfter = DefaultResolverFallback
	}
	// Several probes within FallbackAfter, so that one lost datagram does
	// not decide; at most one a second.
	interval := min(time.Second, max(cfg.FallbackAfter/5, 100*time.Millisecond))
	return &resolver{cfg: cfg, stateDir: stateDir, log: log, interval: interval, hostMountNS: "/proc/1/ns/mnt", done: make(chan struct{}), st: ResolverStatus{
		ResolvConf: cfg.ResolvConf, Address: cfg.Address, State: ResolverWaiting, Since: time.Now(), FallbackAfter: cfg.FallbackAfter.String(),
	}}
}

func (r *resolver) status() ResolverStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.st
}

// ours is the resolv.conf that names the local resolver.
func (r *resolver) ours() []byte {
	return fmt.Appendf(nil, "# Written by steppe's agent: the machine's local resolver (CoreDNS), which\n"+
		"# answered a consul. query. The previous resolv.conf is kept in %s\n"+
		"# and comes back if the resolver does not answer for %s.\nnameserver %s\n",
		filepath.Join(r.stateDir, filepath.FromSlash(previousResolvConf)), r.cfg.FallbackAfter, r.cfg.Address)
}

// start reads where the machine is: a resolv.conf that is ours already
// (an agent restarted after a switch) is switched, with the previous one
// from the state dir.
func (r *resolver) start() error {
	if r.cfg.Mount != "" {
		if err := recoverCover(r.cfg.ResolvConf, r.cfg.Mount); err != nil {
			return fmt.Errorf("resolver: %w", err)
		}
	}
	cur, err := os.ReadFile(r.cfg.ResolvConf)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("resolver: %w", err)
	}
	if !bytes.Equal(cur, r.ours()) {
		r.previous = cur
		return nil
	}
	prev, err := os.ReadFile(filepath.Join(r.stateDir, filepath.FromSlash(previousResolvConf)))
	if err != nil {
		r.log.Warn("resolver: resolv.conf names the local resolver but the one before it is lost; a fallback will leave it without nameservers", "err", err)
		prev = []byte("# Written by steppe's agent: the resolv.conf before the local resolver was lost.\n")
	}
	r.previous = prev
	r.mu.Lock()
	r.st.State = ResolverSwitched
	r.mu.Unlock()
	return nil
}

// run probes the resolver until ctx ends, switching as it answers or not.
func (r *resolver) run(ctx context.Context) {
	defer close(r.done)
	// Silence is counted from the last answer, or from the start when
	// the agent found resolv.conf switched already.
	lastAnswer := time.Now()
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		err := probeResolver(ctx, r.cfg.Address, r.interval)
		if ctx.Err() != nil {
			return
		}
		now := time.Now()
		r.mu.Lock()
		state := r.st.State
		if err == nil {
			r.st.LastAnswer, r.st.LastError = now, ""
		} else {
			r.st.LastError = err.Error()
		}
		r.mu.Unlock()
		switch {
		case err == nil:
			lastAnswer = now
			if state != ResolverSwitched {
				r.switchTo()
			}
		case state == ResolverSwitched && now.Sub(lastAnswer) >= r.cfg.FallbackAfter:
			r.fallBack(fmt.Sprintf("no answer for %s (%v)", now.Sub(lastAnswer).Round(time.Millisecond), err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// switchTo names the local resolver in resolv.conf, after keeping what
// was there (the state dir's copy first: a crash in between must not lose
// it).
func (r *resolver) switchTo() {
	cur, err := os.ReadFile(r.cfg.ResolvConf)
	if err == nil && !bytes.Equal(cur, r.ours()) {
		r.previous = cur // an operator's edit while on the fallback wins
	}
	prev := filepath.Join(r.stateDir, filepath.FromSlash(previousResolvConf))
	if err := os.MkdirAll(filepath.Dir(prev), 0o700); err != nil {
		r.failed("switch", err)
		return
	}
	if err := atomicfile.WriteFile(prev, r.previous, 0o600); err != nil {
		r.failed("switch", err)
		return
	}
	if err := r.show(r.ours()); err != nil {
		r.failed("switch", err)
		return
	}
	r.mu.Lock()
	from := r.st.State
	r.st.State, r.st.Since = ResolverSwitched, time.Now()
	r.st.Switches++
	r.mu.Unlock()
	r.log.Info("resolv.conf switched to the local resolver", "resolv_conf", r.cfg.ResolvConf, "nameserver", r.cfg.Address, "was", from)
}

// fallBack restores the previous resolv.conf.
func (r *resolver) fallBack(why string) {
	if err := r.show(r.previous); err != nil {
		r.failed("fall back", err)
		return
	}
	r.mu.Lock()
	r.st.State, r.st.Since = ResolverFallback, time.Now()
	r.st.Switches++
	r.mu.Unlock()
	r.log.Warn("resolv.conf switched back to the previous one: the local resolver stopped answering", "resolv_conf", r.cfg.ResolvConf, "nameserver", r.cfg.Address, "why", why, "previous_nameservers", nameservers(r.previous))
}

// stop puts the previous resolv.conf back when the agent stops: its
// services, the resolver among them, stop with it.
func (r *resolver) stop() {
	<-r.done
	if r.status().State == ResolverSwitched {
		r.fallBack("the agent is stopping, and the resolver with it")
	}
}

func (r *resolver) failed(what string, err error) {
	r.mu.Lock()
	r.st.LastError = fmt.Sprintf("%s: %v", what, err)
	r.mu.Unlock()
	r.log.Error("resolver: "+what+" resolv.conf", "resolv_conf", r.cfg.ResolvConf, "err", err)
}

// show makes content what the machine reads as its resolv.conf.
func (r *resolver) show(content []byte) error {
	if r.cfg.Mount == "" {
		return atomicfile.WriteFile(r.cfg.ResolvConf, content, 0o644)
	}
	if err := ownMountNamespace(r.hostMountNS); err != nil {
		return fmt.Errorf("mount %s over %s: %w", r.cfg.ResolvConf, r.cfg.Mount, err)
	}
	return rewriteCovered(r.cfg.ResolvConf, r.cfg.Mount, content)
}

// rewriteCovered changes a file the machine sees through a bind mount.
// The mount holds the file's inode: a file replaced by a rename is not
// what it shows, and a mount over the replaced one fails (its dentry is
// gone). So the file is rewritten in place, under cover: the new content
// is written whole to a file beside it, mounted over the machine's path,
// the file rewritten in place underneath, and the cover taken off.
// Readers in the machine's mount namespace see one whole file or the
// other, never a part;
// the file itself stays the inode the machine's start mounted, so that
// processes still in the mount namespace of an earlier agent of the
// machine (adopted daemons, their tasks) see the change too (without the
// cover: a rewrite of a few bytes in place).
func rewriteCovered(file, mount string, content []byte) error {
	next := coverName(file)
	if err := atomicfile.WriteFile(next, content, 0o644); err != nil {
		return err
	}
	defer os.Remove(next)
	if err := unix.Mount(next, mount, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("mount %s over %s: %w", next, mount, err)
	}
	// A reader that opened the file just before the cover reads it
	// within microseconds (resolv.conf is a few lines): let it finish
	// before the file changes under it.
	time.Sleep(coverGrace)
	werr := rewriteInPlace(file, content)
	// Detached: a reader holding the cover open keeps it, new ones get
	// the file.
	if err := unix.Unmount(mount, unix.MNT_DETACH); err != nil {
		return errors.Join(werr, fmt.Errorf("unmount %s from %s: %w", next, mount, err))
	}
	return werr
}

// coverGrace is how long a cover is up before the file under it changes.
const coverGrace = 100 * time.Millisecond

// coverName is the file beside file that covers it while it is rewritten.
func coverName(file string) string {
	return filepath.Join(filepath.Dir(file), "."+filepath.Base(file)+".next")
}

// recoverCover finishes a rewrite a crash cut short: the cover file is
// whole (written atomically), the file under it may not be.
func recoverCover(file, mount string) error {
	next := coverName(file)
	content, err := os.ReadFile(next)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if top, err := topMountRoot(mount); err == nil && strings.Contains(top, filepath.Base(next)) {
		if err := unix.Unmount(mount, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount the cover of %s: %w", mount, err)
		}
	}
	if err := rewriteInPlace(file, content); err != nil {
		return err
	}
	return os.Remove(next)
}

func rewriteInPlace(file string, content []byte) error {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(content)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("rewrite %s: %w", file, err)
	}
	return nil
}

// ownMountNamespace fails in the host's mount namespace (host: PID 1's,
// unless the agent is PID 1 of its own machine), where a mount over the
// machine's resolv.conf would change the host's own file. Where PID 1's
// cannot be read (a container), the provider's word stands: the netns
// trampoline refuses to start an agent outside a mount namespace of its own.
func ownMountNamespace(host string) error {
	if os.Getpid() == 1 {
		return nil
	}
	self, err1 := os.Readlink("/proc/self/ns/mnt")
	init, err2 := os.Readlink(host)
	if err1 == nil && err2 == nil && self == init {
		return errors.New("the agent is in the host's mount namespace: refusing to mount over the host's file (only a provider that gives the machine a mount namespace of its own sets mount in the resolver block)")
	}
	return nil
}

// topMountRoot is the root (within its file system) of the last mount on
// path in this mount namespace: for a bind mount of a file, its path.
func topMountRoot(path string) (string, error) {
	mounts, err := supervise.Mounts()
	if err != nil {
		return "", err
	}
	root := ""
	for _, m := range mounts {
		if m.Point == path {
			root = m.Root
		}
	}
	return root, nil
}

// nameservers lists a resolv.conf's nameservers, for the log.
func nameservers(conf []byte) []string {
	var out []string
	for line := range strings.SplitSeq(string(conf), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "nameserver" {
			out = append(out, f[1])
		}
	}
	return out
}

// probeResolver asks addr:53 (UDP) for consul.service.consul A and
// returns nil when a NOERROR or NXDOMAIN response comes within timeout.
func probeResolver(ctx context.Context, addr string, timeout time.Duration) error {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		return fmt.Errorf("resolver address %q: %w", addr, err)
	}
	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	name := dnsmessage.MustNewName(resolverProbeName)
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
	}
	packet, err := q.Pack()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", netip.AddrPortFrom(ip, 53).String())
	if err != nil {
		return fmt.Errorf("ask %s: %w", addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write(packet); err != nil {
		return fmt.Errorf("ask %s: %w", addr, err)
	}
	buf := make([]byte, 1500)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("ask %s for %s: %w", addr, resolverProbeName, err)
		}
		var p dnsmessage.Parser
		h, err := p.Start(buf[:n])
		if err != nil || h.ID != id || !h.Response {
			continue // not the answer to this query
		}
		switch h.RCode {
		case dnsmessage.RCodeSuccess, dnsmessage.RCodeNameError:
			return nil
		default:
			return fmt.Errorf("%s answered %s for %s", addr, h.RCode, resolverProbeName)
		}
	}
}

// startResolver starts the switch of cfg's resolver block; it stops with
// ctx, and stop puts the previous resolv.conf back.
func (a *Agent) startResolver(ctx context.Context, cfg *Config) *resolver {
	r := newResolver(*cfg.Resolver, cfg.StateDir, a.log)
	if err := r.start(); err != nil {
		r.failed("read", err)
	}
	go r.run(ctx)
	return r
}

func (a *Agent) resolverStatus() *ResolverStatus {
	if a.resolver == nil {
		return nil
	}
	st := a.resolver.status()
	return &st
}

func sameResolver(x, y *Resolver) bool {
	if x == nil || y == nil {
		return x == y
	}
	return *x == *y
}

// resolver reads the resolver block.
func (p *parser) resolver(b *hcl.Block) *Resolver {
	r := &Resolver{FallbackAfter: DefaultResolverFallback}
	c := p.content(b.Body, &hcl.BodySchema{Attributes: []hcl.AttributeSchema{
		{Name: "resolv_conf", Required: true}, {Name: "mount"}, {Name: "address", Required: true}, {Name: "fallback_after"},
	}})
	if c == nil {
		return r
	}
	at := c.Attributes
	p.str(at, "resolv_conf", &r.ResolvConf)
	if a, ok := at["resolv_conf"]; ok && !filepath.IsAbs(r.ResolvConf) {
		p.errorf(a.Expr.Range(), "Invalid resolv_conf", "resolver resolv_conf = %q: want an absolute path", r.ResolvConf)
	}
	p.str(at, "mount", &r.Mount)
	if a, ok := at["mount"]; ok && !filepath.IsAbs(r.Mount) {
		p.errorf(a.Expr.Range(), "Invalid mount", "resolver mount = %q: want the absolute path where the machine sees its resolv.conf, such as /etc/resolv.conf", r.Mount)
	}
	p.str(at, "address", &r.Address)
	if a, ok := at["address"]; ok {
		if _, err := netip.ParseAddr(r.Address); err != nil {
			p.errorf(a.Expr.Range(), "Invalid address", "resolver address = %q: want the local resolver's IP address (it answers on port 53, the only port resolv.conf can name)", r.Address)
		}
	}
	p.duration(at, "fallback_after", &r.FallbackAfter)
	if a, ok := at["fallback_after"]; ok && r.FallbackAfter <= 0 {
		p.errorf(a.Expr.Range(), "Invalid fallback_after", "resolver fallback_after must be more than 0, such as \"10s\"")
	}
	return r
}
