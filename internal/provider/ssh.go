package provider

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	sshagent "golang.org/x/crypto/ssh/agent"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hcllit"
)

// The ssh provider (DESIGN: decision 14) makes machines of hosts that
// already exist. Over SSH only (golang.org/x/crypto/ssh, files over SFTP)
// it detects the host's init system with a few lines of POSIX sh, copies
// the static steppe binary (temporary name, fsync, rename), writes the
// agent's config and the machine's secrets (0700 directories, 0600
// files), installs the agent as a service of the host's init and waits
// for its local API, reached through SSH (a forwarded Unix socket). From
// then on the machine pulls its bundles like any other. Nothing but
// steppe's own files is written; Destroy removes all of them and every
// process the agent ran.
//
// Host keys are checked before anything is sent: against the key the spec
// gives, else the known_hosts files it names, else the provider's own
// known_hosts. A key that differs is always refused; an unknown one is
// refused unless the operator said to trust it on first use, and then it
// is recorded in the provider's known_hosts.

// SSHHost is an existing host the ssh provider may make a machine of.
type SSHHost struct {
	// Address is the host's IP address or name: the machine's address.
	Address string
	// Port is sshd's port; 0 means 22.
	Port int
	// User logs in; "" means root. The agent needs root.
	User string
	// Key is a private key file; "" means the operator's SSH agent
	// (SSH_AUTH_SOCK).
	Key string
	// HostKey is the host's public key in authorized_keys form.
	HostKey string
	// KnownHosts is a known_hosts file that holds the host's key.
	KnownHosts string
}

func (h SSHHost) addr() string {
	p := h.Port
	if p == 0 {
		p = 22
	}
	return net.JoinHostPort(h.Address, strconv.Itoa(p))
}

// SSHOptions configure the ssh provider.
type SSHOptions struct {
	// Dir holds the provider's records: a file per machine (which host it
	// is) and the known_hosts of keys trusted on first use.
	Dir string
	// Hosts are the hosts machines are made of, in the order they are
	// taken.
	Hosts []SSHHost
	// Binary is the steppe binary installed on the hosts (static); ""
	// means this process's own executable.
	Binary string
	// TrustOnFirstUse accepts (and records) the key of a host none of the
	// above knows. A key that differs from a known one is refused anyway.
	TrustOnFirstUse bool
	// ConnectTimeout bounds each connection and handshake; 0 means 10 s.
	ConnectTimeout time.Duration
	// StartTimeout bounds the wait for an agent's API; 0 means 60 s.
	StartTimeout time.Duration
	// Phase, when set, is told how long each phase of a Create took:
	// connect (TCP, handshake, auth), probe, binary, files (config,
	// keys, secrets, service definition), start (until the API answers).
	Phase func(machine, phase string, d time.Duration)
}

// SSH is the ssh provider.
type SSH struct {
	opts SSHOptions
	mu   sync.Mutex // orders host assignment and known_hosts writes
}

// sshRecord is what the provider keeps of a machine.
type sshRecord struct {
	Machine Machine `json:"machine"`
	Host    string  `json:"host"` // SSHHost.addr()
	Init    Init    `json:"init"`
	// RunsvDir is runit's service directory on the host.
	RunsvDir string `json:"runsvdir,omitempty"`
}

const sshKnownHosts = "known_hosts"

// NewSSH returns the ssh provider.
func NewSSH(opts SSHOptions) (*SSH, error) {
	if opts.Dir == "" {
		return nil, errors.New("ssh provider: Dir is required")
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("ssh provider: %w", err)
	}
	opts.Dir = dir
	seen := map[string]bool{}
	for i, h := range opts.Hosts {
		if h.Address == "" {
			return nil, fmt.Errorf("ssh provider: host %d has no address", i+1)
		}
		if seen[h.addr()] {
			return nil, fmt.Errorf("ssh provider: host %s is listed twice", h.addr())
		}
		seen[h.addr()] = true
		if h.HostKey != "" {
			if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(h.HostKey)); err != nil {
				return nil, fmt.Errorf("ssh provider: host %s: host_key: want a public key such as \"ssh-ed25519 AAAA...\": %w", h.addr(), err)
			}
		}
	}
	if opts.Binary == "" {
		if opts.Binary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("ssh provider: find the steppe binary: %w", err)
		}
	}
	if opts.ConnectTimeout == 0 {
		opts.ConnectTimeout = 10 * time.Second
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 60 * time.Second
	}
	return &SSH{opts: opts}, nil
}

func (s *SSH) recordPath(name string) string {
	return filepath.Join(s.opts.Dir, "machines", name+".json")
}

func (s *SSH) load(name string) (sshRecord, error) {
	var r sshRecord
	b, err := os.ReadFile(s.recordPath(name))
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("ssh machine %s: %s: %w", name, s.recordPath(name), err)
	}
	return r, nil
}

func (s *SSH) save(r sshRecord) error {
	if err := os.MkdirAll(filepath.Dir(s.recordPath(r.Machine.Name)), 0o700); err != nil {
		return fmt.Errorf("ssh machine %s: %w", r.Machine.Name, err)
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	if err := atomicfile.WriteFile(s.recordPath(r.Machine.Name), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("ssh machine %s: %w", r.Machine.Name, err)
	}
	return nil
}

func (s *SSH) records() ([]sshRecord, error) {
	entries, err := os.ReadDir(filepath.Join(s.opts.Dir, "machines"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ssh provider: %w", err)
	}
	var out []sshRecord
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || e.IsDir() {
			continue
		}
		r, err := s.load(name)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func (s *SSH) host(addr string) (SSHHost, bool) {
	i := slices.IndexFunc(s.opts.Hosts, func(h SSHHost) bool { return h.addr() == addr })
	if i < 0 {
		return SSHHost{}, false
	}
	return s.opts.Hosts[i], true
}

// List implements Provider. A machine is Running when its agent's API
// answers through SSH; a host that cannot be reached is listed as not
// running.
func (s *SSH) List(ctx context.Context) ([]Machine, error) {
	recs, err := s.records()
	if err != nil {
		return nil, err
	}
	out := make([]Machine, len(recs))
	var wg sync.WaitGroup
	for i, r := range recs {
		out[i] = r.Machine
		wg.Add(1)
		go func() {
			defer wg.Done()
			h, ok := s.host(r.Host)
			if !ok {
				return
			}
			c, err := s.dial(ctx, h)
			if err != nil {
				return
			}
			defer c.Close()
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			if _, err := sshAgentClient(c).Status(sctx); err == nil {
				out[i].Running = true
			}
		}()
	}
	wg.Wait()
	return out, nil
}

// Assign gives every machine of ms without an address the host it is
// (a machine made before) or the next host no machine is, in the order
// the hosts are listed. More machines than hosts is an error naming how
// many hosts are missing.
func (s *SSH) Assign(ctx context.Context, ms []cluster.Machine) ([]cluster.Machine, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	recs, err := s.records()
	if err != nil {
		return nil, err
	}
	have := map[string]string{}
	used := map[string]bool{}
	for _, r := range recs {
		if h, ok := s.host(r.Host); ok {
			have[r.Machine.Name] = h.Address
		}
		used[r.Host] = true
	}
	out := slices.Clone(ms)
	next := 0
	for i := range out {
		if a, ok := have[out[i].Name]; ok {
			out[i].Address = a
			continue
		}
		if out[i].Address != "" {
			continue
		}
		for next < len(s.opts.Hosts) && used[s.opts.Hosts[next].addr()] {
			next++
		}
		if next == len(s.opts.Hosts) {
			return nil, fmt.Errorf("ssh provider: %d machines but only %d hosts listed: add hosts to the spec's provider \"ssh\" block, or fewer machines", len(ms), len(s.opts.Hosts))
		}
		out[i].Address = s.opts.Hosts[next].Address
		used[s.opts.Hosts[next].addr()] = true
	}
	return out, nil
}

// hostFor is the host machine m is (by its record) or will be (by its
// address).
func (s *SSH) hostFor(m cluster.Machine) (SSHHost, error) {
	if r, err := s.load(m.Name); err == nil {
		if h, ok := s.host(r.Host); ok {
			return h, nil
		}
		return SSHHost{}, fmt.Errorf("ssh machine %s is host %s, which the spec no longer lists: list it again, or steppe down first", m.Name, r.Host)
	}
	if m.Address == "" {
		as, err := s.Assign(context.Background(), []cluster.Machine{m})
		if err != nil {
			return SSHHost{}, err
		}
		m = as[0]
	}
	for _, h := range s.opts.Hosts {
		if h.Address == m.Address {
			return h, nil
		}
	}
	return SSHHost{}, fmt.Errorf("ssh machine %s: no host with address %s in the spec", m.Name, m.Address)
}

// sshConn is one authenticated connection to a host, with SFTP on it.
type sshConn struct {
	host   SSHHost
	client *ssh.Client
	sftp   *sftp.Client
}

func (c *sshConn) Close() error {
	if c.sftp != nil {
		c.sftp.Close()
	}
	return c.client.Close()
}

// dial connects and authenticates, checking the host key first: nothing
// is sent to a host whose key is refused.
func (s *SSH) dial(ctx context.Context, h SSHHost) (*sshConn, error) {
	auth, closeAuth, err := authMethod(h)
	if err != nil {
		return nil, fmt.Errorf("ssh host %s: %w", h.addr(), err)
	}
	defer closeAuth()
	user := h.User
	if user == "" {
		user = "root"
	}
	cfg := &ssh.ClientConfig{
		User:            user,
		Auth:            []ssh.AuthMethod{auth},
		HostKeyCallback: s.hostKeyCallback(h),
		Timeout:         s.opts.ConnectTimeout,
	}
	dctx, cancel := context.WithTimeout(ctx, s.opts.ConnectTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(dctx, "tcp", h.addr())
	if err != nil {
		return nil, fmt.Errorf("ssh host %s: %w", h.addr(), err)
	}
	_ = nc.SetDeadline(time.Now().Add(s.opts.ConnectTimeout))
	cc, chans, reqs, err := ssh.NewClientConn(nc, h.addr(), cfg)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("ssh host %s: %w", h.addr(), err)
	}
	_ = nc.SetDeadline(time.Time{})
	return &sshConn{host: h, client: ssh.NewClient(cc, chans, reqs)}, nil
}

func authMethod(h SSHHost) (ssh.AuthMethod, func(), error) {
	if h.Key != "" {
		b, err := os.ReadFile(h.Key)
		if err != nil {
			return nil, nil, fmt.Errorf("private key: %w", err)
		}
		signer, err := ssh.ParsePrivateKey(b)
		if err != nil {
			return nil, nil, fmt.Errorf("private key %s: %w (a key with a passphrase belongs in the SSH agent: leave key out)", h.Key, err)
		}
		return ssh.PublicKeys(signer), func() {}, nil
	}
	sock := os.Getenv("SSH_AUTH_SOCK")
	if sock == "" {
		return nil, nil, errors.New("no key file given and no SSH agent (SSH_AUTH_SOCK is empty): set the host's key, or start ssh-agent")
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return nil, nil, fmt.Errorf("SSH agent %s: %w", sock, err)
	}
	return ssh.PublicKeysCallback(sshagent.NewClient(conn).Signers), func() { conn.Close() }, nil
}

// session runs one sh command and returns its output; stderr is in the
// error.
func (c *sshConn) run(ctx context.Context, script string) (string, error) {
	sess, err := c.client.NewSession()
	if err != nil {
		return "", fmt.Errorf("ssh host %s: session: %w", c.host.addr(), err)
	}
	defer sess.Close()
	var out, errb bytes.Buffer
	sess.Stdout, sess.Stderr = &out, &errb
	sess.Stdin = strings.NewReader(script)
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()
	// The script goes on stdin: nothing of it is in the host's argv.
	if err := sess.Run("/bin/sh -s"); err != nil {
		if ctx.Err() != nil {
			return out.String(), ctx.Err()
		}
		return out.String(), fmt.Errorf("ssh host %s: %w: %s", c.host.addr(), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (c *sshConn) sftpClient() (*sftp.Client, error) {
	if c.sftp != nil {
		return c.sftp, nil
	}
	sc, err := sftp.NewClient(c.client)
	if err != nil {
		return nil, fmt.Errorf("ssh host %s: sftp: %w", c.host.addr(), err)
	}
	c.sftp = sc
	return sc, nil
}

// writeFile writes a file atomically over SFTP: a temporary name beside
// it, fsync, mode, rename over the old. Unchanged content is left alone
// (false).
func (c *sshConn) writeFile(name string, r io.Reader, mode os.FileMode) error {
	sc, err := c.sftpClient()
	if err != nil {
		return err
	}
	if err := sc.MkdirAll(path.Dir(name)); err != nil {
		return fmt.Errorf("ssh host %s: mkdir %s: %w", c.host.addr(), path.Dir(name), err)
	}
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	tmp := path.Join(path.Dir(name), "."+path.Base(name)+".steppe-"+hex.EncodeToString(rnd[:]))
	f, err := sc.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if err != nil {
		return fmt.Errorf("ssh host %s: create %s: %w", c.host.addr(), tmp, err)
	}
	fail := func(what string, err error) error {
		f.Close()
		_ = sc.Remove(tmp)
		return fmt.Errorf("ssh host %s: %s %s: %w", c.host.addr(), what, tmp, err)
	}
	// The mode first: a secret is never readable by others, even briefly.
	if err := f.Chmod(mode); err != nil {
		return fail("chmod", err)
	}
	if _, err := f.ReadFrom(r); err != nil {
		return fail("write", err)
	}
	if err := f.Sync(); err != nil {
		return fail("fsync", err)
	}
	if err := f.Close(); err != nil {
		return fail("close", err)
	}
	if err := sc.PosixRename(tmp, name); err != nil {
		_ = sc.Remove(tmp)
		return fmt.Errorf("ssh host %s: rename %s to %s: %w", c.host.addr(), tmp, name, err)
	}
	return nil
}

// readFile returns a remote file's content, or nil if it does not exist.
func (c *sshConn) readFile(name string) ([]byte, os.FileMode, error) {
	sc, err := c.sftpClient()
	if err != nil {
		return nil, 0, err
	}
	f, err := sc.Open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("ssh host %s: open %s: %w", c.host.addr(), name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, fmt.Errorf("ssh host %s: stat %s: %w", c.host.addr(), name, err)
	}
	b, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return nil, 0, fmt.Errorf("ssh host %s: read %s: %w", c.host.addr(), name, err)
	}
	return b, st.Mode().Perm(), nil
}

func (c *sshConn) mkdir(dir string, mode os.FileMode) error {
	sc, err := c.sftpClient()
	if err != nil {
		return err
	}
	if err := sc.MkdirAll(dir); err != nil {
		return fmt.Errorf("ssh host %s: mkdir %s: %w", c.host.addr(), dir, err)
	}
	if err := sc.Chmod(dir, mode); err != nil {
		return fmt.Errorf("ssh host %s: chmod %s: %w", c.host.addr(), dir, err)
	}
	return nil
}

// sshAgentClient reaches the host's agent API through the connection.
func sshAgentClient(c *sshConn) *agent.Client {
	cl := agent.NewClient(c.host.addr() + ":" + SSHSocket)
	cl.Dial = func(ctx context.Context) (net.Conn, error) { return c.client.DialContext(ctx, "unix", SSHSocket) }
	return cl
}

// Create implements Provider: probe, install, start, wait for the agent.
// Nothing is written on a host whose key is refused, that cannot be
// reached, where the login is not root or whose init is not one steppe
// knows. A host steppe was not on before is all or nothing: when a step
// after the first write fails, what was written is removed again
// (Destroy) before the error is returned, so a failed up leaves no host
// half-installed; hosts whose Create succeeded stay as they are, and up
// run again converges. A host that already was a machine is left as it
// is on failure (its agent and daemons may be running).
func (s *SSH) Create(ctx context.Context, req CreateRequest) (Machine, error) {
	_, err := s.load(req.Machine.Name)
	fresh := errors.Is(err, fs.ErrNotExist)
	m, written, err := s.create(ctx, req)
	if err != nil && fresh && written {
		if derr := s.Destroy(context.WithoutCancel(ctx), req.Machine.Name); derr != nil {
			return m, fmt.Errorf("%w; removing what was written failed too: %v (steppe down removes it)", err, derr)
		}
		return m, fmt.Errorf("%w; what was written on the host is removed again", err)
	}
	return m, err
}

func (s *SSH) create(ctx context.Context, req CreateRequest) (_ Machine, written bool, _ error) {
	name := req.Machine.Name
	h, err := s.hostFor(req.Machine)
	if err != nil {
		return Machine{}, false, err
	}
	t0 := time.Now()
	phase := func(p string) {
		if s.opts.Phase != nil {
			s.opts.Phase(name, p, time.Since(t0))
		}
		t0 = time.Now()
	}
	c, err := s.dial(ctx, h)
	if err != nil {
		return Machine{}, false, fmt.Errorf("ssh machine %s: %w", name, err)
	}
	defer c.Close()
	phase("connect")
	out, err := c.run(ctx, initProbe)
	if err != nil {
		return Machine{}, false, fmt.Errorf("ssh machine %s: probe the init system: %w", name, err)
	}
	p := parseProbe(out)
	if p.UID != "0" {
		return Machine{}, false, fmt.Errorf("ssh machine %s: host %s: logged in as uid %q, not root: the agent needs root (cgroups); give user = \"root\"", name, h.addr(), p.UID)
	}
	files, start, _, err := serviceDefinition(p.Init, p.RunsvDir)
	if err != nil {
		return Machine{}, false, fmt.Errorf("ssh machine %s: host %s: %w; nothing was written", name, h.addr(), err)
	}
	m := Machine{
		Name: name, Role: req.Machine.Role, Pool: req.Machine.Pool, Address: h.Address,
		Dir: SSHStateDir, Socket: h.addr() + ":" + SSHSocket, Log: sshLogDir,
		Created: time.Now().UTC().Round(time.Second),
	}
	if old, err := s.load(name); err == nil {
		if old.Machine.Role != m.Role || old.Machine.Pool != m.Pool {
			return old.Machine, false, fmt.Errorf("ssh machine %s exists as %s %s, not %s %s: remove it first (steppe down)", name, old.Machine.Role, old.Machine.Pool, m.Role, m.Pool)
		}
		m.Created = old.Machine.Created
	}
	phase("probe")
	rec := sshRecord{Machine: m, Host: h.addr(), Init: p.Init, RunsvDir: p.RunsvDir}
	// Recorded before the first write: a Create cut short is destroyed
	// like any machine.
	if err := s.save(rec); err != nil {
		return m, false, err
	}
	if err := s.installBinary(ctx, c); err != nil {
		return m, true, fmt.Errorf("ssh machine %s: %w", name, err)
	}
	phase("binary")
	if err := c.mkdir(SSHConfigDir, 0o700); err != nil {
		return m, true, err
	}
	if err := c.mkdir(SSHStateDir, 0o700); err != nil {
		return m, true, err
	}
	secrets, err := req.Secrets(m.Cluster(), SSHSecretsDir)
	if err != nil {
		return m, true, err
	}
	changed, err := s.deliver(c, m, secrets)
	if err != nil {
		return m, true, err
	}
	cfgChanged, err := s.writeAgentConfig(c, m, req.Agent)
	if err != nil {
		return m, true, err
	}
	for _, f := range files {
		if err := c.writeFile(f.Path, strings.NewReader(f.Content), os.FileMode(f.Mode)); err != nil {
			return m, true, fmt.Errorf("ssh machine %s: service definition: %w", name, err)
		}
	}
	phase("files")
	cl := sshAgentClient(c)
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = cl.Status(sctx)
	cancel()
	if err == nil && !cfgChanged {
		m.Running, m.SecretsChanged = true, changed
		return m, true, nil
	}
	// A running agent reads its config at start only: a changed one
	// means a restart of the agent (its daemons stay, adopted).
	script := start
	if err == nil {
		script = restartCommand(p.Init, p.RunsvDir)
	}
	if _, err := c.run(ctx, script); err != nil {
		return m, true, fmt.Errorf("ssh machine %s: start the agent under %s: %w", name, p.Init, err)
	}
	if err := s.waitAgent(ctx, c, m, p.Init); err != nil {
		return m, true, err
	}
	phase("start")
	m.Running = true
	return m, true, nil
}

func restartCommand(init Init, runsvDir string) string {
	switch init {
	case InitSystemd:
		return "systemctl restart " + sshService + ".service"
	case InitOpenRC:
		return "rc-service " + sshService + " restart"
	default:
		return "sv restart " + runitSvDir
	}
}

// waitAgent waits for the agent's API to answer.
func (s *SSH) waitAgent(ctx context.Context, c *sshConn, m Machine, init Init) error {
	cl := sshAgentClient(c)
	deadline := time.Now().Add(s.opts.StartTimeout)
	for {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := cl.Status(sctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			log, _ := c.run(ctx, "tail -n 20 "+sshLogDir+".log "+sshLogDir+"/current 2>/dev/null; journalctl -n 20 -u "+sshService+" 2>/dev/null; true")
			return fmt.Errorf("ssh machine %s: the agent's API on host %s did not answer within %v (%s): %v\n%s", m.Name, c.host.addr(), s.opts.StartTimeout, init, err, log)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// installBinary copies steppe to SSHBinary unless the host has the same
// one (same SHA-256, when the host has sha256sum).
func (s *SSH) installBinary(ctx context.Context, c *sshConn) error {
	f, err := os.Open(s.opts.Binary)
	if err != nil {
		return fmt.Errorf("steppe binary: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("steppe binary %s: %w", s.opts.Binary, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if out, err := c.run(ctx, "command -v sha256sum >/dev/null && [ -f "+SSHBinary+" ] && sha256sum "+SSHBinary+" || true"); err == nil && strings.HasPrefix(out, sum+" ") {
		return nil
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	return c.writeFile(SSHBinary, f, 0o755)
}

// Deliver implements Provider.
func (s *SSH) Deliver(ctx context.Context, m Machine, files map[string][]byte) (bool, error) {
	r, err := s.load(m.Name)
	if err != nil {
		return false, fmt.Errorf("ssh machine %s: %w", m.Name, err)
	}
	h, ok := s.host(r.Host)
	if !ok {
		return false, fmt.Errorf("ssh machine %s: host %s is not in the spec", m.Name, r.Host)
	}
	c, err := s.dial(ctx, h)
	if err != nil {
		return false, fmt.Errorf("ssh machine %s: %w", m.Name, err)
	}
	defer c.Close()
	return s.deliver(c, m, files)
}

func (s *SSH) deliver(c *sshConn, m Machine, files map[string][]byte) (bool, error) {
	if err := c.mkdir(SSHSecretsDir, 0o700); err != nil {
		return false, fmt.Errorf("deliver secrets to %s: %w", m.Name, err)
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	changed := false
	for _, n := range names {
		if strings.ContainsRune(n, '/') || n == "" || n[0] == '.' {
			return false, fmt.Errorf("deliver secrets to %s: bad file name %q", m.Name, n)
		}
		p := SSHSecretsDir + "/" + n
		if old, mode, err := c.readFile(p); err == nil && old != nil && bytes.Equal(old, files[n]) && mode == 0o600 {
			continue
		}
		if err := c.writeFile(p, bytes.NewReader(files[n]), 0o600); err != nil {
			return false, fmt.Errorf("deliver secrets to %s: %w", m.Name, err)
		}
		changed = true
	}
	return changed, nil
}

// writeAgentConfig writes the agent's config and the public keys it
// names (copied to the host) and says whether anything changed.
func (s *SSH) writeAgentConfig(c *sshConn, m Machine, a AgentConfig) (bool, error) {
	changed := false
	copyKeys := func(kind string, files []string) ([]string, error) {
		var out []string
		for i, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("ssh machine %s: %s key: %w", m.Name, kind, err)
			}
			p := fmt.Sprintf("%s/%s-%d-%s", SSHKeysDir, kind, i, filepath.Base(f))
			if old, _, err := c.readFile(p); err != nil || !bytes.Equal(old, b) {
				if err := c.writeFile(p, bytes.NewReader(b), 0o644); err != nil {
					return nil, err
				}
				changed = true
			}
			out = append(out, p)
		}
		return out, nil
	}
	bundleKeys, err := copyKeys("bundle", a.BundleKeys)
	if err != nil {
		return false, err
	}
	artifactKeys, err := copyKeys("artifact", a.ArtifactKeys)
	if err != nil {
		return false, err
	}
	health := a.HealthTimeout
	if health == 0 {
		health = 5 * time.Minute
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by steppe's ssh provider for machine %s.\n", m.Name)
	// The services' cgroups are below the agent's own: the unit's under
	// systemd (Delegate=yes), the init's elsewhere.
	fmt.Fprintf(&b, "agent {\n  state_dir = %s\n  socket    = %s\n  cgroup    = %s\n}\n\n",
		hcllit.String(SSHStateDir), hcllit.String(SSHSocket), hcllit.String(agent.DefaultCgroup))
	fmt.Fprintf(&b, "machine {\n  name       = %s\n  address    = %s\n  pool       = %s\n  region     = %s\n  datacenter = %s\n}\n\n",
		hcllit.String(m.Name), hcllit.String(m.Address), hcllit.String(m.Pool), hcllit.String(a.Region), hcllit.String(a.Datacenter))
	fmt.Fprintf(&b, "bundle {\n  store          = %s\n  cluster        = %s\n  role           = %s\n  keys           = %s\n  wait           = \"30s\"\n  health_timeout = %s\n",
		hcllit.String(a.BundleStore), hcllit.String(a.Cluster), hcllit.String(a.BundleRole), hcllit.List(bundleKeys), hcllit.String(health.String()))
	if a.MinBundleVersion > 0 {
		fmt.Fprintf(&b, "  min_version    = %d\n", a.MinBundleVersion)
	}
	b.WriteString("}\n")
	if len(artifactKeys) > 0 {
		fmt.Fprintf(&b, "\nartifacts {\n  keys = %s\n}\n", hcllit.List(artifactKeys))
	}
	old, _, err := c.readFile(SSHConfig)
	if err != nil {
		return false, err
	}
	if string(old) == b.String() {
		return changed, nil
	}
	if err := c.writeFile(SSHConfig, strings.NewReader(b.String()), 0o600); err != nil {
		return false, fmt.Errorf("ssh machine %s: %w", m.Name, err)
	}
	return true, nil
}

// Client returns a client of the machine's agent API through SSH, and a
// function that closes the connection.
func (s *SSH) Client(ctx context.Context, name string) (*agent.Client, func(), error) {
	r, err := s.load(name)
	if err != nil {
		return nil, nil, fmt.Errorf("ssh machine %s: %w", name, err)
	}
	h, ok := s.host(r.Host)
	if !ok {
		return nil, nil, fmt.Errorf("ssh machine %s: host %s is not in the spec", name, r.Host)
	}
	c, err := s.dial(ctx, h)
	if err != nil {
		return nil, nil, fmt.Errorf("ssh machine %s: %w", name, err)
	}
	return sshAgentClient(c), func() { c.Close() }, nil
}

// Destroy implements Provider: the agent's service stopped and removed
// from the init, every process left in the agent's cgroups killed, the
// mounts under its state directory unmounted, its cgroups and every file
// of steppe removed. The host is as it was before Create.
func (s *SSH) Destroy(ctx context.Context, name string) error {
	r, err := s.load(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	h, ok := s.host(r.Host)
	if !ok {
		return fmt.Errorf("ssh machine %s: host %s is not in the spec: list it again so that down can reach it", name, r.Host)
	}
	c, err := s.dial(ctx, h)
	if err != nil {
		return fmt.Errorf("ssh machine %s: %w", name, err)
	}
	defer c.Close()
	_, _, stop, err := serviceDefinition(r.Init, r.RunsvDir)
	if err != nil {
		return fmt.Errorf("ssh machine %s: %w", name, err)
	}
	// Where the agent keeps its services' cgroups, read while it runs.
	where, err := c.run(ctx, "[ -x "+SSHBinary+" ] && "+SSHBinary+" "+SSHTeardownArg+" locate || true")
	if err != nil {
		return fmt.Errorf("ssh machine %s: locate the agent's cgroups: %w", name, err)
	}
	var errs []error
	if _, err := c.run(ctx, stop); err != nil {
		errs = append(errs, fmt.Errorf("ssh machine %s: stop the agent under %s: %w", name, r.Init, err))
	}
	where = strings.TrimSpace(where)
	if where == "" {
		where = "{}"
	}
	script := "if [ -x " + SSHBinary + " ]; then " + SSHBinary + " " + SSHTeardownArg + " teardown '" + strings.ReplaceAll(where, "'", "") + "'; fi; " +
		"rm -rf " + SSHConfigDir + " " + SSHStateDir + " " + SSHSocketDir + " " + sshLogDir + " " + sshLogDir + ".log " + SSHBinary
	if _, err := c.run(ctx, script); err != nil {
		errs = append(errs, fmt.Errorf("ssh machine %s: remove steppe: %w", name, err))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.Remove(s.recordPath(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("ssh machine %s: %w", name, err)
	}
	return nil
}

// Cleanup removes the provider's records once no machine is left; the
// known_hosts of keys trusted on first use stays with the state directory.
func (s *SSH) Cleanup(ctx context.Context) error {
	recs, err := s.records()
	if err != nil {
		return err
	}
	if len(recs) > 0 {
		return fmt.Errorf("ssh provider: %d machines still exist", len(recs))
	}
	return os.RemoveAll(filepath.Join(s.opts.Dir, "machines"))
}
