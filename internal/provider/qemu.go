package provider

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hcllit"
	"github.com/steppe/steppe/internal/image"
)

// The qemu provider (DESIGN decision 14) boots each machine as a QEMU VM
// from a steppe image (KVM where /dev/kvm exists, TCG otherwise). A
// machine's directory holds its config disk (identity, agent config,
// trusted keys, secrets: image.ConfigDisk, 0600), its data disk (the
// agent's state, kept across reboots), its serial console log and the
// host's ends of its API port and QMP socket. Its network is a tap on
// the cluster's bridge, the netns provider's (the same subnet, the host
// at its first address): no slirp, no route anywhere else. The agent's
// local API is reached through the VM's virtio-serial port at
// <dir>/api.sock, which speaks the agent socket's protocol, so
// Machine.Socket works for status as it does for local machines.

// DefaultQEMUFirstHost is the host number of the first qemu machine in
// the subnet: netns machines count up from 2, VMs from here, so that both
// providers can share one bridge.
const DefaultQEMUFirstHost = 100

// Files of a qemu machine's directory.
const (
	qemuConfigDisk = "config.img"
	qemuDataDisk   = "data.img"
)

// QEMUOptions configure the qemu provider.
type QEMUOptions struct {
	Dir     string // one directory per machine
	Cluster string
	// Subnet is the cluster's bridge subnet; "": DefaultSubnet.
	Subnet string
	// FirstHost is the host number of the first VM's address; 0:
	// DefaultQEMUFirstHost.
	FirstHost int
	// Bridge is the bridge the taps join; "": the netns provider's for
	// Dir (the same name a NewNetns on Dir uses).
	Bridge string
	// Image is the steppe image the VMs boot through UEFI firmware.
	// Kernel, Initrd and Cmdline boot directly instead (faster: tests).
	Image                   string
	Kernel, Initrd, Cmdline string
	MemoryMiB, CPUs         int   // per VM; 0: image.DefaultMemory, DefaultCPUs
	DataDiskSize            int64 // 0: 4 GiB (sparse)
	// StartTimeout bounds how long Create waits for the agent to answer;
	// 0: 3 minutes (TCG on two busy cores).
	StartTimeout time.Duration
	StopTimeout  time.Duration // 0: 2 minutes
	// TrustedCA (PEM) is what the VMs trust for TLS, the bundle server's
	// certificate among it: written as the machine's system roots.
	TrustedCA []byte
}

// QEMU is the qemu provider.
type QEMU struct {
	opts QEMUOptions
	net  *netnsNet
	mu   sync.Mutex
}

// NewQEMU returns the qemu provider. It needs root (taps, the bridge).
func NewQEMU(opts QEMUOptions) (*QEMU, error) {
	if opts.Dir == "" || opts.Cluster == "" {
		return nil, errors.New("qemu provider: Dir and Cluster are required")
	}
	if opts.Image == "" && opts.Kernel == "" {
		return nil, errors.New("qemu provider: an image to boot is required (steppe image build)")
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("qemu provider: %w", err)
	}
	opts.Dir = dir
	s := opts.Subnet
	if s == "" {
		s = DefaultSubnet
	}
	subnet, err := parseSubnet(s)
	if err != nil {
		return nil, fmt.Errorf("qemu provider: subnet %q: %w", s, err)
	}
	if opts.FirstHost == 0 {
		opts.FirstHost = DefaultQEMUFirstHost
	}
	if opts.DataDiskSize == 0 {
		opts.DataDiskSize = 4 << 30
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 3 * time.Minute
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 2 * time.Minute
	}
	br := opts.Bridge
	if br == "" {
		sum := sha256.Sum256([]byte(dir))
		br = netnsLinkNS + hex.EncodeToString(sum[:4])
	}
	return &QEMU{opts: opts, net: &netnsNet{subnet: subnet, bridge: br, dir: dir}}, nil
}

func (q *QEMU) machineDir(name string) string { return filepath.Join(q.opts.Dir, name) }

// TapName is the host's tap device of a machine.
func (q *QEMU) TapName(name string) string {
	h := fnv.New32a()
	h.Write([]byte(q.opts.Dir + "/" + name))
	return fmt.Sprintf("stq-%08x", h.Sum32())
}

// mac is the VM's stable MAC address (locally administered).
func (q *QEMU) mac(name string) string {
	h := fnv.New32a()
	h.Write([]byte(q.opts.Dir + "/" + name))
	v := h.Sum32()
	return fmt.Sprintf("52:54:%02x:%02x:%02x:%02x", byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

// List implements Provider.
func (q *QEMU) List(ctx context.Context) ([]Machine, error) {
	entries, err := os.ReadDir(q.opts.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("qemu provider: %w", err)
	}
	var out []Machine
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		m, err := q.load(e.Name())
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

func (q *QEMU) load(name string) (Machine, error) {
	b, err := os.ReadFile(filepath.Join(q.machineDir(name), machineFile))
	if err != nil {
		return Machine{}, err
	}
	var m Machine
	if err := json.Unmarshal(b, &m); err != nil {
		return Machine{}, fmt.Errorf("qemu machine %s: %s: %w", name, machineFile, err)
	}
	m.PID, m.Running = q.qemuPID(m)
	return m, nil
}

// qemuPID is the machine's QEMU process, if its pidfile names a QEMU of
// this machine's directory.
func (q *QEMU) qemuPID(m Machine) (int, bool) {
	b, err := os.ReadFile(filepath.Join(m.Dir, image.PIDFile))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte(filepath.Join(m.Dir, image.QMPSocket))) {
		return 0, false
	}
	return pid, true
}

// Create implements Provider: the machine's record, disks and tap, then
// its VM, and it returns once the agent answers through the API port.
func (q *QEMU) Create(ctx context.Context, req CreateRequest) (Machine, error) {
	m, err := q.prepare(req)
	if err != nil {
		return Machine{}, err
	}
	files, err := req.Secrets(m.Cluster(), image.SecretsDir)
	if err != nil {
		return m, err
	}
	changed, err := q.writeConfigDisk(m, req.Agent, files)
	if err != nil {
		return m, err
	}
	if m.Running {
		// A VM reads its config disk at boot: new secrets reach it when
		// it restarts (the caller restarts what reads them).
		m.SecretsChanged = changed
		return m, nil
	}
	if err := image.MakeDisk(filepath.Join(m.Dir, qemuDataDisk), q.opts.DataDiskSize); err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	if _, err := q.net.ensureBridge(); err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	if err := image.MakeTap(q.TapName(m.Name), q.net.bridge); err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	return q.start(ctx, m)
}

func (q *QEMU) prepare(req CreateRequest) (Machine, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	name := req.Machine.Name
	if m, err := q.load(name); err == nil {
		if m.Role != req.Machine.Role || m.Pool != req.Machine.Pool {
			return m, fmt.Errorf("qemu machine %s exists as %s %s, not %s %s: remove it first (steppe down)", name, m.Role, m.Pool, req.Machine.Role, req.Machine.Pool)
		}
		return m, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return Machine{}, err
	}
	addr := req.Machine.Address
	if addr == "" {
		var err error
		if addr, err = q.nextAddress(); err != nil {
			return Machine{}, err
		}
	}
	a, err := netip.ParseAddr(addr)
	if err != nil || !q.net.subnet.Contains(a) || a == q.net.hostAddr() || a == q.net.subnet.Addr() || a == broadcast(q.net.subnet) {
		return Machine{}, fmt.Errorf("qemu machine %s: address %q is not a machine address of the subnet %s (the first address is the host's)", name, addr, q.net.subnet)
	}
	dir := q.machineDir(name)
	m := Machine{
		Name: name, Role: req.Machine.Role, Pool: req.Machine.Pool, Address: addr,
		Dir: dir, Socket: filepath.Join(dir, image.APISocket), Log: filepath.Join(dir, image.ConsoleLog),
		Created: time.Now().UTC().Round(time.Second),
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", name, err)
	}
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(dir, machineFile), append(b, '\n'), 0o600); err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", name, err)
	}
	return m, nil
}

func (q *QEMU) nextAddress() (string, error) {
	ms, err := q.List(context.Background())
	if err != nil {
		return "", err
	}
	used := map[string]bool{}
	for _, m := range ms {
		used[m.Address] = true
	}
	a := q.net.subnet.Addr()
	for range q.opts.FirstHost {
		a = a.Next()
	}
	for ; q.net.subnet.Contains(a) && a != broadcast(q.net.subnet); a = a.Next() {
		if !used[a.String()] {
			return a.String(), nil
		}
	}
	return "", fmt.Errorf("qemu provider: no free address in %s from host %d", q.net.subnet, q.opts.FirstHost)
}

// Deliver implements Provider: the secrets go onto the machine's config
// disk, read at its next boot.
func (q *QEMU) Deliver(ctx context.Context, m Machine, files map[string][]byte) (bool, error) {
	b, err := os.ReadFile(filepath.Join(m.Dir, qemuConfigDisk))
	if err != nil {
		return false, fmt.Errorf("deliver secrets to %s: %w", m.Name, err)
	}
	c, err := image.ReadConfigDisk(bytes.NewReader(b))
	if err != nil {
		return false, fmt.Errorf("deliver secrets to %s: %w", m.Name, err)
	}
	kept := slices.DeleteFunc(c.Files, func(f image.ConfigFile) bool { return strings.HasPrefix(f.Path, image.SecretsDir+"/") })
	c.Files = append(kept, secretFiles(files)...)
	return q.writeDisk(m, c)
}

func secretFiles(files map[string][]byte) []image.ConfigFile {
	var out []image.ConfigFile
	for n, data := range files {
		out = append(out, image.ConfigFile{Path: image.SecretsDir + "/" + n, Mode: 0o600, Data: data})
	}
	return out
}

// writeConfigDisk writes the machine's config disk: identity, network,
// the agent's config, the trusted keys and the secrets.
func (q *QEMU) writeConfigDisk(m Machine, a AgentConfig, secrets map[string][]byte) (bool, error) {
	for n := range secrets {
		if strings.ContainsRune(n, '/') || n == "" || n[0] == '.' {
			return false, fmt.Errorf("deliver secrets to %s: bad file name %q", m.Name, n)
		}
	}
	if !strings.HasPrefix(a.BundleStore, "http://") && !strings.HasPrefix(a.BundleStore, "https://") {
		return false, fmt.Errorf("qemu machine %s: bundle store %q: a VM needs a bundle server's URL on the bridge (%s), not a directory of the host", m.Name, a.BundleStore, q.net.hostAddr())
	}
	var files []image.ConfigFile
	keys := func(kind string, paths []string) ([]string, error) {
		var in []string
		for i, p := range paths {
			b, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("qemu machine %s: %s key: %w", m.Name, kind, err)
			}
			dst := fmt.Sprintf("%s/%s-%d%s", image.KeysDir, kind, i, filepath.Ext(p))
			files = append(files, image.ConfigFile{Path: dst, Mode: 0o644, Data: b})
			in = append(in, dst)
		}
		return in, nil
	}
	bundleKeys, err := keys("bundle", a.BundleKeys)
	if err != nil {
		return false, err
	}
	artifactKeys, err := keys("artifact", a.ArtifactKeys)
	if err != nil {
		return false, err
	}
	health := a.HealthTimeout
	if health == 0 {
		health = 5 * time.Minute
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Written by steppe's qemu provider for machine %s.\n", m.Name)
	fmt.Fprintf(&b, "agent {\n  state_dir = %s\n}\n\n", hcllit.String(agent.DefaultStateDir))
	tags := ""
	if m.Role == cluster.RoleClient {
		tags = fmt.Sprintf("  tags       = { task_interface = %s }\n", hcllit.String(netnsIfName))
	}
	fmt.Fprintf(&b, "machine {\n  name       = %s\n  address    = %s\n  pool       = %s\n  region     = %s\n  datacenter = %s\n%s}\n\n",
		hcllit.String(m.Name), hcllit.String(m.Address), hcllit.String(m.Pool), hcllit.String(a.Region), hcllit.String(a.Datacenter), tags)
	fmt.Fprintf(&b, "bundle {\n  store          = %s\n  cluster        = %s\n  role           = %s\n  keys           = %s\n  wait           = \"30s\"\n  health_timeout = %s\n",
		hcllit.String(a.BundleStore), hcllit.String(a.Cluster), hcllit.String(a.BundleRole), hcllit.List(bundleKeys), hcllit.String(health.String()))
	if a.MinBundleVersion > 0 {
		fmt.Fprintf(&b, "  min_version    = %d\n", a.MinBundleVersion)
	}
	b.WriteString("}\n")
	if len(artifactKeys) > 0 {
		fmt.Fprintf(&b, "\nartifacts {\n  keys = %s\n}\n", hcllit.List(artifactKeys))
	}
	files = append(files, secretFiles(secrets)...)
	if len(q.opts.TrustedCA) > 0 {
		files = append(files, image.ConfigFile{Path: "/etc/ssl/certs/ca-certificates.crt", Mode: 0o644, Data: q.opts.TrustedCA})
	}
	c := image.ConfigDisk{
		Machine: image.MachineConfig{
			Name:    m.Name,
			Address: fmt.Sprintf("%s/%d", m.Address, q.net.subnet.Bits()),
			Hosts:   []string{q.net.hostAddr().String() + " steppe-host"},
		},
		Agent: []byte(b.String()),
		Files: files,
	}
	return q.writeDisk(m, c)
}

// writeDisk writes c as the machine's config disk and says whether it
// changed.
func (q *QEMU) writeDisk(m Machine, c image.ConfigDisk) (bool, error) {
	disk, err := c.Marshal()
	if err != nil {
		return false, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	p := filepath.Join(m.Dir, qemuConfigDisk)
	if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, disk) {
		return false, nil
	}
	if err := atomicfile.WriteFile(p, disk, 0o600); err != nil {
		return false, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	return true, nil
}

// start boots the machine's VM (detached) and waits for its agent.
func (q *QEMU) start(ctx context.Context, m Machine) (Machine, error) {
	vm := q.vm(m)
	// Stale sockets of a VM that died would be taken for live ones.
	for _, f := range []string{image.APISocket, image.QMPSocket, image.PIDFile} {
		_ = os.Remove(filepath.Join(m.Dir, f))
	}
	cmd, err := vm.Command(ctx)
	if err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return m, fmt.Errorf("qemu machine %s: start qemu: %w: %s", m.Name, err, bytes.TrimSpace(out))
	}
	deadline := time.Now().Add(q.opts.StartTimeout)
	client := agent.NewClient(m.Socket)
	var lastErr error
	for time.Now().Before(deadline) {
		if _, ok := q.qemuPID(m); !ok {
			return m, fmt.Errorf("qemu machine %s: the VM stopped while booting; its console: %s", m.Name, m.Log)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := client.Status(cctx)
		cancel()
		if err == nil {
			m.PID, m.Running = q.qemuPID(m)
			return m, nil
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return m, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return m, fmt.Errorf("qemu machine %s: no agent answered within %s (last: %v); its console: %s", m.Name, q.opts.StartTimeout, lastErr, m.Log)
}

func (q *QEMU) vm(m Machine) image.VM {
	return image.VM{
		Dir: m.Dir, Image: q.opts.Image, Kernel: q.opts.Kernel, Initrd: q.opts.Initrd, Cmdline: q.opts.Cmdline,
		ConfigDisk: filepath.Join(m.Dir, qemuConfigDisk), DataDisk: filepath.Join(m.Dir, qemuDataDisk),
		Tap: q.TapName(m.Name), MAC: q.mac(m.Name), MemoryMiB: q.opts.MemoryMiB, CPUs: q.opts.CPUs, Daemonize: true,
	}
}

// Stop powers the machine's VM off: the ACPI power button (init stops the
// agent and its services, syncs and powers off), or, when hard is set or
// that takes longer than the stop timeout, a kill. Its disks stay.
func (q *QEMU) Stop(ctx context.Context, name string, hard bool) error {
	m, err := q.load(name)
	if err != nil {
		return fmt.Errorf("qemu machine %s: %w", name, err)
	}
	pid, ok := q.qemuPID(m)
	if !ok {
		return nil
	}
	if !hard {
		if _, err := image.QMP(ctx, m.Dir, "system_powerdown"); err == nil {
			deadline := time.Now().Add(q.opts.StopTimeout)
			for time.Now().Before(deadline) {
				if _, ok := q.qemuPID(m); !ok {
					return nil
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for range 100 {
		if _, ok := q.qemuPID(m); !ok {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("qemu machine %s: qemu (pid %d) does not die", name, pid)
}

// Start boots a stopped machine again with the disks it has.
func (q *QEMU) Start(ctx context.Context, name string) (Machine, error) {
	m, err := q.load(name)
	if err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", name, err)
	}
	if m.Running {
		return m, nil
	}
	if err := image.MakeTap(q.TapName(m.Name), q.net.bridge); err != nil {
		return m, fmt.Errorf("qemu machine %s: %w", m.Name, err)
	}
	return q.start(ctx, m)
}

// Destroy implements Provider: the VM stopped, its tap and every file
// (disks included) removed.
func (q *QEMU) Destroy(ctx context.Context, name string) error {
	if _, err := q.load(name); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := q.Stop(ctx, name, false); err != nil {
		return err
	}
	if l, err := netlink.LinkByName(q.TapName(name)); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			return fmt.Errorf("qemu machine %s: remove tap: %w", name, err)
		}
	}
	if err := os.RemoveAll(q.machineDir(name)); err != nil {
		return fmt.Errorf("qemu machine %s: %w", name, err)
	}
	return nil
}
