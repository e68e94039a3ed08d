package provider

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hcllit"
)

// DefaultFirstAddress is where the local provider starts numbering its
// machines' loopback addresses (all of 127/8 is loopback on Linux).
const DefaultFirstAddress = "127.0.0.11"

// LocalOptions configure the local provider.
type LocalOptions struct {
	// Dir holds one directory per machine: the machine's whole disk.
	Dir string
	// Cluster names the cgroup parent of the machines' services (see
	// CgroupParent).
	Cluster string
	// FirstAddress is the first machine's address; the next ones count
	// up from it. "" means DefaultFirstAddress.
	FirstAddress string
	// Binary is the steppe binary the machines run as their agent; ""
	// means this process's own executable.
	Binary string
	// ArtifactCache, when set, is a directory every machine shares as its
	// agent's artifact cache (content-addressed, verified on every use):
	// local machines share one disk, so a binary is stored once.
	ArtifactCache string
	// StopTimeout bounds how long Destroy waits for an agent to stop its
	// services before it kills what is left; 0 means 2 minutes.
	StopTimeout time.Duration
}

// Local runs each machine as a detached `steppe agent` process on its own
// loopback address, with its own directory and cgroup parent. It needs
// root for cgroups, as the agent does.
type Local struct {
	opts  LocalOptions
	mu    sync.Mutex // orders address assignment
	netns *netnsNet  // nil: machines share the host's network (see netns.go)
}

// Ports each local machine must have free on its address: TCP, and the
// UDP ones gossip and DNS use.
var (
	localTCPPorts = []int{cluster.ConsulHTTPSPort, cluster.ConsulDNSPort, cluster.ConsulRPCPort, cluster.ConsulSerfLAN, cluster.ConsulSerfWAN,
		cluster.NomadHTTPPort, cluster.NomadRPCPort, cluster.NomadSerfPort}
	localUDPPorts = []int{cluster.ConsulDNSPort, cluster.ConsulSerfLAN, cluster.ConsulSerfWAN, cluster.NomadSerfPort}
)

// Files of a local machine's directory.
const (
	machineFile  = "machine.json"
	agentConfig  = "agent.hcl"
	agentLog     = "agent.log"
	agentPIDFile = "agent.pid"
	agentSocket  = "agent.sock"
	agentState   = "state"
	agentBinary  = "steppe"
	hostFile     = ".host.json"
)

// NewLocal returns the local provider.
func NewLocal(opts LocalOptions) (*Local, error) {
	if opts.Dir == "" || opts.Cluster == "" {
		return nil, errors.New("local provider: Dir and Cluster are required")
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	opts.Dir = dir
	if opts.FirstAddress == "" {
		opts.FirstAddress = DefaultFirstAddress
	}
	ip := net.ParseIP(opts.FirstAddress).To4()
	if ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("local provider: first_address %q: want an IPv4 loopback address such as %s", opts.FirstAddress, DefaultFirstAddress)
	}
	if opts.Binary == "" {
		if opts.Binary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("local provider: find the steppe binary: %w", err)
		}
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 2 * time.Minute
	}
	return &Local{opts: opts}, nil
}

// CgroupParent is the cgroup (below the v2 mount) under which every
// machine of the cluster keeps its services: steppe-<cluster>-<8 hex
// digits of the SHA-256 of the machines' directory>, so that two clusters
// of one name in different state directories never share it (a `down` of
// one must not touch the other's processes).
func (l *Local) CgroupParent() string {
	sum := sha256.Sum256([]byte(l.opts.Dir))
	return "steppe-" + l.opts.Cluster + "-" + hex.EncodeToString(sum[:4])
}

func (l *Local) machineDir(name string) string { return filepath.Join(l.opts.Dir, name) }

// StateDir is the agent state directory of a machine.
func (l *Local) StateDir(name string) string { return filepath.Join(l.machineDir(name), agentState) }

// SecretsDir is where a machine's secrets are delivered (the agent's
// secrets_dir).
func (l *Local) SecretsDir(name string) string { return filepath.Join(l.StateDir(name), "secrets") }

// List implements Provider.
func (l *Local) List(ctx context.Context) ([]Machine, error) {
	entries, err := os.ReadDir(l.opts.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("local provider: %w", err)
	}
	var out []Machine
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		m, err := l.load(e.Name())
		if errors.Is(err, fs.ErrNotExist) {
			continue // not a machine (or one whose creation was cut short before its record)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

func (l *Local) load(name string) (Machine, error) {
	b, err := os.ReadFile(filepath.Join(l.machineDir(name), machineFile))
	if err != nil {
		return Machine{}, err
	}
	var m Machine
	if err := json.Unmarshal(b, &m); err != nil {
		return Machine{}, fmt.Errorf("local machine %s: %s: %w", name, machineFile, err)
	}
	m.PID, m.Running = l.agentPID(m)
	return m, nil
}

// agentPID finds the machine's agent: the pid in its pidfile, if that
// process is a steppe agent running this machine's config.
func (l *Local) agentPID(m Machine) (int, bool) {
	b, err := os.ReadFile(filepath.Join(m.Dir, agentPIDFile))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return 0, false
	}
	want := []byte("\x00" + filepath.Join(m.Dir, agentConfig) + "\x00")
	if !bytes.Contains(append(cmdline, 0), want) {
		return 0, false // the pid was reused by another process
	}
	if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// A zombie (exited, not yet reaped by its parent) is not running.
		if f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return 0, false
		}
	}
	return pid, true
}

// Create implements Provider.
func (l *Local) Create(ctx context.Context, req CreateRequest) (Machine, error) {
	m, err := l.prepare(req)
	if err != nil {
		return Machine{}, err
	}
	files, err := req.Secrets(m.Cluster(), l.SecretsDir(m.Name))
	if err != nil {
		return m, err
	}
	changed, err := l.Deliver(ctx, m, files)
	if err != nil {
		return m, err
	}
	if m.Running {
		m.SecretsChanged = changed
		return m, nil
	}
	if l.netns != nil {
		if err := l.netns.setup(m); err != nil {
			return m, err
		}
	} else if m.Role == cluster.RoleClient {
		addr, err := netip.ParseAddr(m.Address)
		if err != nil {
			return m, fmt.Errorf("local machine %s: address %q: %w", m.Name, m.Address, err)
		}
		if err := ensureLink(LinkName(m.Name), addr); err != nil {
			return m, fmt.Errorf("local machine %s: task interface: %w", m.Name, err)
		}
	}
	if err := l.writeAgentConfig(m, req.Agent); err != nil {
		return m, err
	}
	return l.start(ctx, m)
}

// prepare loads the machine or makes its directory and record, assigning
// its address.
func (l *Local) prepare(req CreateRequest) (Machine, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	name := req.Machine.Name
	if m, err := l.load(name); err == nil {
		if m.Role != req.Machine.Role || m.Pool != req.Machine.Pool {
			return m, fmt.Errorf("local machine %s exists as %s %s, not %s %s: remove it first (steppe down)", name, m.Role, m.Pool, req.Machine.Role, req.Machine.Pool)
		}
		return m, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return Machine{}, err
	}
	if err := l.recordHost(); err != nil {
		return Machine{}, err
	}
	addr := req.Machine.Address
	if addr == "" {
		var err error
		if addr, err = l.nextAddress(); err != nil {
			return Machine{}, err
		}
	}
	if err := l.checkFree(addr); err != nil {
		return Machine{}, fmt.Errorf("machine %s: %w", name, err)
	}
	dir := l.machineDir(name)
	m := Machine{
		Name: name, Role: req.Machine.Role, Pool: req.Machine.Pool, Address: addr,
		Dir: dir, Socket: filepath.Join(dir, agentSocket), Log: filepath.Join(dir, agentLog),
		Created: time.Now().UTC().Round(time.Second),
	}
	if err := os.MkdirAll(filepath.Join(dir, agentState), 0o700); err != nil {
		return m, fmt.Errorf("local machine %s: %w", name, err)
	}
	if l.opts.ArtifactCache != "" {
		if err := os.MkdirAll(l.opts.ArtifactCache, 0o755); err != nil {
			return m, fmt.Errorf("local machine %s: %w", name, err)
		}
		link := filepath.Join(dir, agentState, "artifacts")
		if err := os.Symlink(l.opts.ArtifactCache, link); err != nil && !errors.Is(err, fs.ErrExist) {
			return m, fmt.Errorf("local machine %s: %w", name, err)
		}
	}
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(dir, machineFile), append(b, '\n'), 0o600); err != nil {
		return m, fmt.Errorf("local machine %s: %w", name, err)
	}
	return m, nil
}

// nextAddress is the lowest address from FirstAddress that no machine of
// this provider has.
func (l *Local) nextAddress() (string, error) {
	ms, err := l.List(context.Background())
	if err != nil {
		return "", err
	}
	used := map[string]bool{}
	for _, m := range ms {
		used[m.Address] = true
	}
	ip := net.ParseIP(l.opts.FirstAddress).To4()
	for l.addressOK(ip) {
		if !used[ip.String()] {
			return ip.String(), nil
		}
		ip = nextIP(ip)
	}
	return "", fmt.Errorf("local provider: no free address from %s", l.opts.FirstAddress)
}

// portsFree fails naming the first port of addr that something holds.
func portsFree(addr string) error {
	for _, p := range localTCPPorts {
		hp := net.JoinHostPort(addr, strconv.Itoa(p))
		ln, err := net.Listen("tcp", hp)
		if err != nil {
			return fmt.Errorf("address %s (tcp) is in use by another process: stop it, or give the cluster other addresses (provider \"local\" { first_address = \"127.0.0.N\" })", hp)
		}
		ln.Close()
	}
	for _, p := range localUDPPorts {
		hp := net.JoinHostPort(addr, strconv.Itoa(p))
		pc, err := net.ListenPacket("udp", hp)
		if err != nil {
			return fmt.Errorf("address %s (udp) is in use by another process: stop it, or give the cluster other addresses (provider \"local\" { first_address = \"127.0.0.N\" })", hp)
		}
		pc.Close()
	}
	return nil
}

// Deliver implements Provider.
func (l *Local) Deliver(ctx context.Context, m Machine, files map[string][]byte) (bool, error) {
	dir := l.SecretsDir(m.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("deliver secrets to %s: %w", m.Name, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
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
		p := filepath.Join(dir, n)
		if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, files[n]) {
			if st, err := os.Stat(p); err == nil && st.Mode().Perm() == 0o600 {
				continue
			}
		}
		if err := atomicfile.WriteFile(p, files[n], 0o600); err != nil {
			return false, fmt.Errorf("deliver secrets to %s: %w", m.Name, err)
		}
		changed = true
	}
	return changed, nil
}

// writeAgentConfig writes the agent's boot config. Nothing in it is
// secret: it names the secrets directory, not its content.
func (l *Local) writeAgentConfig(m Machine, a AgentConfig) error {
	health := a.HealthTimeout
	if health == 0 {
		health = 5 * time.Minute
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by steppe's local provider for machine %s.\n", m.Name)
	fmt.Fprintf(&b, "agent {\n  state_dir = %s\n  socket    = %s\n  cgroup    = %s\n}\n\n",
		// Absolute (below the v2 mount): local machines share the host,
		// and down finds their cgroups there wherever up ran.
		hcllit.String(l.StateDir(m.Name)), hcllit.String(m.Socket), hcllit.String("/"+l.CgroupParent()+"/"+m.Name))
	// A client's tasks listen on its own interface (see link.go).
	tags := ""
	if m.Role == cluster.RoleClient {
		tags = fmt.Sprintf("  tags       = { task_interface = %s }\n", hcllit.String(l.taskInterface(m)))
	}
	fmt.Fprintf(&b, "machine {\n  name       = %s\n  address    = %s\n  pool       = %s\n  region     = %s\n  datacenter = %s\n%s}\n\n",
		hcllit.String(m.Name), hcllit.String(m.Address), hcllit.String(m.Pool), hcllit.String(a.Region), hcllit.String(a.Datacenter), tags)
	fmt.Fprintf(&b, "bundle {\n  store          = %s\n  cluster        = %s\n  role           = %s\n  keys           = %s\n  wait           = \"30s\"\n  health_timeout = %s\n",
		hcllit.String(a.BundleStore), hcllit.String(a.Cluster), hcllit.String(a.BundleRole), hcllit.List(a.BundleKeys), hcllit.String(health.String()))
	if a.MinBundleVersion > 0 {
		fmt.Fprintf(&b, "  min_version    = %d\n", a.MinBundleVersion)
	}
	b.WriteString("}\n")
	if len(a.ArtifactKeys) > 0 {
		fmt.Fprintf(&b, "\nartifacts {\n  keys = %s\n}\n", hcllit.List(a.ArtifactKeys))
	}
	b.WriteString(l.resolverBlock(m))
	cfg := filepath.Join(m.Dir, agentConfig)
	if _, err := agent.ParseConfig(cfg, []byte(b.String())); err != nil {
		return fmt.Errorf("local machine %s: agent config: %w", m.Name, err)
	}
	if err := atomicfile.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("local machine %s: %w", m.Name, err)
	}
	return nil
}

// start runs the machine's agent detached: its own session (no terminal
// can hang it up), stdin /dev/null, output appended to agent.log, a
// pidfile. It returns once the agent's local API answers.
func (l *Local) start(ctx context.Context, m Machine) (Machine, error) {
	logf, err := os.OpenFile(m.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return m, fmt.Errorf("local machine %s: %w", m.Name, err)
	}
	defer logf.Close()
	// Each machine runs its own copy of steppe, which its agent replaces
	// when it upgrades itself: the operator's binary is never touched. The
	// copy is made afresh at each start, from the binary up runs with; a
	// bundle that names another steppe then moves the agent to it.
	bin := filepath.Join(m.Dir, agentBinary)
	if err := atomicfile.CopyFile(l.opts.Binary, bin, 0o755); err != nil {
		return m, fmt.Errorf("local machine %s: copy the steppe binary: %w", m.Name, err)
	}
	pidfile := filepath.Join(m.Dir, agentPIDFile)
	// -pidfile: an agent whose self-upgrade was rolled back runs again
	// under another pid, and says so there.
	var cmd *exec.Cmd
	// The machine's copy of steppe was just written: a fork of another
	// goroutine (machines start side by side) may still hold its write
	// descriptor for a moment, and exec then fails with ETXTBSY.
	for attempt := 0; ; attempt++ {
		cmd = l.agentCmd(bin, m, pidfile, logf)
		if l.netns != nil {
			if err := l.netns.enter(cmd, m); err != nil {
				return m, fmt.Errorf("local machine %s: %w", m.Name, err)
			}
		}
		err := cmd.Start()
		if err == nil {
			break
		}
		if errors.Is(err, syscall.ETXTBSY) && attempt < 20 {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		return m, fmt.Errorf("local machine %s: start agent: %w", m.Name, err)
	}
	exited := make(chan error, 1)

	go func() { exited <- cmd.Wait() }()
	if err := atomicfile.WriteFile(pidfile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600); err != nil {
		_ = cmd.Process.Kill()
		return m, fmt.Errorf("local machine %s: %w", m.Name, err)
	}
	m.PID, m.Running = cmd.Process.Pid, true
	client := agent.NewClient(m.Socket)
	deadline := time.Now().Add(60 * time.Second)
	for {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := client.Status(sctx)
		cancel()
		if err == nil {
			return m, nil
		}
		select {
		case werr := <-exited:
			return m, fmt.Errorf("local machine %s: the agent exited at start (%v):\n%s", m.Name, werr, TailFile(m.Log, 20))
		case <-ctx.Done():
			return m, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return m, fmt.Errorf("local machine %s: the agent's API %s did not answer within 60s: %v\n%s", m.Name, m.Socket, err, TailFile(m.Log, 20))
		}
	}
}

// TailFile returns the last n lines of a file, for error messages.
func TailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Assign gives every machine of ms without an address the one it has (an
// existing machine) or the next free one, in order: servers first in the
// spec's order get the lowest addresses, the same on every run.
func (l *Local) Assign(ctx context.Context, ms []cluster.Machine) ([]cluster.Machine, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	existing, err := l.List(ctx)
	if err != nil {
		return nil, err
	}
	have := map[string]string{}
	used := map[string]bool{}
	for _, m := range existing {
		have[m.Name] = m.Address
		used[m.Address] = true
	}
	out := slices.Clone(ms)
	ip := net.ParseIP(l.opts.FirstAddress).To4()
	for i := range out {
		if out[i].Address != "" {
			continue
		}
		if a, ok := have[out[i].Name]; ok {
			out[i].Address = a
			continue
		}
		for used[ip.String()] {
			ip = nextIP(ip)
		}
		if !l.addressOK(ip) {
			return nil, fmt.Errorf("local provider: no free address from %s", l.opts.FirstAddress)
		}
		out[i].Address = ip.String()
		used[ip.String()] = true
	}
	return out, nil
}

func nextIP(ip net.IP) net.IP {
	next := make(net.IP, 4)
	copy(next, ip.To4())
	for i := 3; i >= 0; i-- {
		next[i]++
		if next[i] != 0 {
			break
		}
	}
	return next
}

// CheckFree fails naming the first address and port that something else
// holds, among the machines of ms that do not exist yet: checked for all
// before any is created, so that a conflict starts nothing.
func (l *Local) CheckFree(ctx context.Context, ms []cluster.Machine) error {
	existing, err := l.List(ctx)
	if err != nil {
		return err
	}
	for _, m := range ms {
		if slices.ContainsFunc(existing, func(e Machine) bool { return e.Name == m.Name }) {
			continue
		}
		if err := l.checkFree(m.Address); err != nil {
			return fmt.Errorf("machine %s: %w", m.Name, err)
		}
	}
	return nil
}

// agentCmd is the command that runs machine m's agent.
func (l *Local) agentCmd(bin string, m Machine, pidfile string, logf *os.File) *exec.Cmd {
	cmd := exec.Command(bin, "agent", "-config", filepath.Join(m.Dir, agentConfig), "-pidfile", pidfile)
	cmd.Dir = m.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// A clean environment: the operator's shell may hold CONSUL_HTTP_TOKEN
	// and friends (steppe env), which the daemons must not inherit.
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + m.Dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	return cmd
}
