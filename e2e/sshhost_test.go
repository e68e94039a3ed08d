package e2e

// Test hosts for the ssh provider: real hosts as far as steppe can tell,
// each reached only through SSH. A host is a network namespace with its
// own address on a bridge of the test's (10.214.0.0/24: not the netns
// provider's 10.213.0.0/24), plus mount, PID, UTS and IPC namespaces
// chrooted into an overlay of the Debian rootfs scripts/prepare-rootfs
// caches, with /proc, /sys, /dev and the host's cgroup hierarchies mounted,
// its own v2 cgroup and v1 memory cgroup, Debian's sshd with a host key
// the test made, and a real init system as the service manager: runit's
// runsvdir, or OpenRC (its /run/openrc state and softlevel made as its
// boot would). PID 1 is this test binary (hostInitMain): it sets the host
// up, starts sshd and the init's supervisor, and reaps orphans as an init
// does. systemd cannot be PID 1 here (no systemd boot in a namespace of a
// host that does not run systemd); its unit is checked with
// systemd-analyze verify instead.

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

// hostInitEnv carries a test host's (non-secret) setup to its PID 1.
const hostInitEnv = "STEPPE_E2E_SSH_HOST_INIT"

func TestMain(m *testing.M) {
	if cfg := os.Getenv(hostInitEnv); cfg != "" {
		if err := hostInitMain(cfg); err != nil {
			fmt.Fprintf(os.Stderr, "test host init: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// hostInit is what PID 1 of a test host is told.
type hostInit struct {
	Rootfs, Upper, Work, Merged string
	Hostname                    string
	Address                     string // CIDR, on eth0
	Init                        string // runit | openrc
}

const hostPATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func hostInitMain(cfgJSON string) error {
	var c hostInit
	if err := json.Unmarshal([]byte(cfgJSON), &c); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("overlay", c.Merged, "overlay", 0, "lowerdir="+c.Rootfs+",upperdir="+c.Upper+",workdir="+c.Work); err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	r := func(p string) string { return filepath.Join(c.Merged, p) }
	mounts := []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", r("proc"), "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", r("sys"), "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"/sys/fs/cgroup", r("sys/fs/cgroup"), "", unix.MS_BIND | unix.MS_REC, ""},
		{"/dev", r("dev"), "", unix.MS_BIND | unix.MS_REC, ""},
		{"tmpfs", r("run"), "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=755"},
		{"tmpfs", r("tmp"), "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	}
	for _, m := range mounts {
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.src, m.dst, err)
		}
	}
	for _, d := range []string{"run/sshd", "run/lock"} {
		if err := os.MkdirAll(r(d), 0o755); err != nil {
			return err
		}
	}
	if c.Init == "openrc" {
		// What openrc's boot makes before any service runs.
		for _, d := range []string{"started", "starting", "stopping", "inactive", "wasinactive", "failed", "scheduled", "hotplugged", "exclusive", "daemons", "options", "tmp"} {
			if err := os.MkdirAll(r("run/openrc/"+d), 0o755); err != nil {
				return err
			}
		}
		if err := os.WriteFile(r("run/openrc/softlevel"), []byte("default"), 0o644); err != nil {
			return err
		}
	}
	// The test moves eth0 in once this process exists.
	var eth netlink.Link
	for i := 0; ; i++ {
		var err error
		if eth, err = netlink.LinkByName("eth0"); err == nil {
			break
		}
		if i > 200 {
			return fmt.Errorf("eth0 never came: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	addr, err := netlink.ParseAddr(c.Address)
	if err != nil {
		return err
	}
	for _, step := range []error{netlink.LinkSetUp(lo), netlink.AddrAdd(eth, addr), netlink.LinkSetUp(eth)} {
		if step != nil {
			return fmt.Errorf("network: %w", step)
		}
	}
	if err := unix.Sethostname([]byte(c.Hostname)); err != nil {
		return err
	}
	if err := unix.Chroot(c.Merged); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	start := func(logName string, argv ...string) error {
		logf, err := os.OpenFile("/run/"+logName+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		defer logf.Close()
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = []string{hostPATH, "HOME=/root"}
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		return cmd.Start() // reaped below, as every orphan is
	}
	if err := start("sshd", "/usr/sbin/sshd", "-D", "-e"); err != nil {
		return fmt.Errorf("sshd: %w", err)
	}
	if c.Init == "runit" {
		if err := start("runsvdir", "/usr/bin/runsvdir", "-P", "/etc/service"); err != nil {
			return fmt.Errorf("runsvdir: %w", err)
		}
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go func() {
		<-term
		_ = unix.Kill(-1, unix.SIGKILL)
		os.Exit(0)
	}()
	for {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(-1, &ws, 0, nil); errors.Is(err, unix.ECHILD) {
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// sshLab is a test's bridge, its SSH client key and its hosts.
type sshLab struct {
	t       testing.TB
	rootfs  string
	bridge  string
	keyFile string // the operator's private key
	pub     ssh.PublicKey
	cgroup  string // v2 parent of the hosts' cgroups
	memcg   string // v1 memory parent
	n       int
}

// sshSubnet is the test hosts' subnet; the bridge has its first address.
const sshSubnetPrefix = "10.214.0."

// testRootfs is scripts/prepare-rootfs's directory (built if missing:
// cached, instant the second time).
func testRootfs(t testing.TB) string {
	t.Helper()
	if _, err := exec.LookPath("debootstrap"); err != nil {
		testenv.Lacks(t, "debootstrap not installed (apt-get install debootstrap): the ssh provider's test hosts are made with it")
	}
	out, err := exec.Command("../scripts/prepare-rootfs").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("scripts/prepare-rootfs: %v\n%s", err, ee.Stderr)
		}
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func newSSHLab(t testing.TB) *sshLab {
	t.Helper()
	testenv.NeedRoot(t, "the ssh provider's test hosts (namespaces, overlay, cgroups)")
	l := &sshLab{t: t, rootfs: testRootfs(t)}
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	l.bridge = "stssh-" + hex.EncodeToString(rnd[:])
	attrs := netlink.NewLinkAttrs()
	attrs.Name = l.bridge
	if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
		t.Fatalf("bridge %s: %v", l.bridge, err)
	}
	t.Cleanup(func() {
		if br, err := netlink.LinkByName(l.bridge); err == nil {
			_ = netlink.LinkDel(br)
		}
	})
	br, err := netlink.LinkByName(l.bridge)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := netlink.ParseAddr(sshSubnetPrefix + "1/24")
	if err := netlink.AddrAdd(br, a); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	// The operator's key.
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	blk, err := ssh.MarshalPrivateKey(priv, "steppe e2e operator")
	if err != nil {
		t.Fatal(err)
	}
	l.keyFile = filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(l.keyFile, pem.EncodeToMemory(blk), 0o600); err != nil {
		t.Fatal(err)
	}
	if l.pub, err = ssh.NewPublicKey(pub); err != nil {
		t.Fatal(err)
	}
	v2 := supervise.CgroupV2Mount()
	if v2 == "" {
		t.Fatal("no cgroup v2 mount")
	}
	// Its own per lab: a benchmark makes one lab per run of its function.
	tag := fmt.Sprintf("steppe-e2e-ssh-%d-%s", os.Getpid(), hex.EncodeToString(rnd[:]))
	l.cgroup = filepath.Join(v2, tag)
	if err := os.MkdirAll(l.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	if mem, _ := supervise.MemoryV1Cgroup(os.Getpid()); mem != "" {
		l.memcg = filepath.Join(mem, tag)
		if err := os.MkdirAll(l.memcg, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, d := range []string{l.cgroup, l.memcg} {
			if d != "" {
				if err := rmCgroupTree(d); err != nil {
					t.Errorf("test hosts' cgroups left behind: %v", err)
				}
			}
		}
	})
	return l
}

// rmCgroupTree removes a cgroup and its descendants, deepest first,
// waiting (up to 10 s) for the kernel to finish with the processes of the
// hosts just killed.
func rmCgroupTree(root string) error {
	var dirs []string
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	slices.Reverse(dirs)
	deadline := time.Now().Add(10 * time.Second)
	for _, d := range dirs {
		for {
			err := unix.Rmdir(d)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("rmdir %s: %w", d, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// testHost is one running test host.
type testHost struct {
	name, init string
	addr       string
	hostKey    string // authorized_keys form
	dir        string
	cmd        *exec.Cmd
	exited     chan struct{}
}

// start makes and boots a host with init "runit" or "openrc".
func (l *sshLab) start(name, init string) *testHost {
	t := l.t
	t.Helper()
	l.n++
	h := &testHost{name: name, init: init, addr: fmt.Sprintf("%s%d", sshSubnetPrefix, 10+l.n), dir: t.TempDir(), exited: make(chan struct{})}
	upper, work, merged := filepath.Join(h.dir, "upper"), filepath.Join(h.dir, "work"), filepath.Join(h.dir, "merged")
	for _, d := range []string{work, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The host key and the operator's authorised key, in the host's own
	// layer before it boots.
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	blk, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	spub, _ := ssh.NewPublicKey(pub)
	h.hostKey = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(spub)))
	files := []struct {
		path string
		mode os.FileMode
		data []byte
	}{
		{"etc/ssh/ssh_host_ed25519_key", 0o600, pem.EncodeToMemory(blk)},
		{"etc/ssh/ssh_host_ed25519_key.pub", 0o644, []byte(h.hostKey + "\n")},
		{"etc/ssh/sshd_config.d/steppe-test.conf", 0o644, []byte("HostKey /etc/ssh/ssh_host_ed25519_key\nListenAddress " + h.addr + "\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n")},
		{"root/.ssh/authorized_keys", 0o600, ssh.MarshalAuthorizedKey(l.pub)},
		{"etc/hostname", 0o644, []byte(name + "\n")},
	}
	for _, f := range files {
		p := filepath.Join(upper, f.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, f.data, f.mode); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"etc", "etc/ssh", "etc/ssh/sshd_config.d"} {
		_ = os.Chmod(filepath.Join(upper, d), 0o755)
	}
	cfg, _ := json.Marshal(hostInit{Rootfs: l.rootfs, Upper: upper, Work: work, Merged: merged, Hostname: name, Address: h.addr + "/24", Init: init})
	cg := filepath.Join(l.cgroup, name)
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	cgfd, err := unix.Open(cg, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cgfd)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	h.cmd = exec.Command(exe)
	h.cmd.Env = []string{hostInitEnv + "=" + string(cfg), hostPATH}
	logf, err := os.Create(filepath.Join(h.dir, "init.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	h.cmd.Stdout, h.cmd.Stderr = logf, logf
	h.cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWNET | syscall.CLONE_NEWIPC,
		UseCgroupFD: true, CgroupFD: cgfd,
		Pdeathsig: syscall.SIGKILL,
	}
	if err := h.cmd.Start(); err != nil {
		t.Fatalf("host %s: start: %v", name, err)
	}
	go func() { _ = h.cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() { h.stop(t) })
	pid := h.cmd.Process.Pid
	if l.memcg != "" {
		mcg := filepath.Join(l.memcg, name)
		if err := os.MkdirAll(mcg, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mcg, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			t.Fatal(err)
		}
	}
	br, err := netlink.LinkByName(l.bridge)
	if err != nil {
		t.Fatal(err)
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = fmt.Sprintf("%s-%d", l.bridge, l.n)
	attrs.MasterIndex = br.Attrs().Index
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "eth0", PeerNamespace: netlink.NsPid(pid)}); err != nil {
		t.Fatalf("host %s: veth: %v", name, err)
	}
	if hl, err := netlink.LinkByName(attrs.Name); err != nil || netlink.LinkSetUp(hl) != nil {
		t.Fatalf("host %s: veth %s up: %v", name, attrs.Name, err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", h.addr+":22", time.Second)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-h.exited:
			t.Fatalf("host %s: its init exited:\n%s", name, h.logs())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("host %s: sshd does not answer on %s:22: %v\n%s", name, h.addr, err, h.logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return h
}

func (h *testHost) logs() string {
	var b bytes.Buffer
	init, _ := os.ReadFile(filepath.Join(h.dir, "init.log"))
	fmt.Fprintf(&b, "--- init.log ---\n%s", init)
	for _, f := range []string{"sshd.log", "runsvdir.log"} {
		if c, err := os.ReadFile(h.path("/run/" + f)); err == nil {
			fmt.Fprintf(&b, "--- /run/%s ---\n%s", f, c)
		}
	}
	return b.String()
}

// path is a path of the host's own root, seen from outside through its
// PID 1.
func (h *testHost) path(p string) string {
	return fmt.Sprintf("/proc/%d/root%s", h.cmd.Process.Pid, p)
}

func (h *testHost) stop(t testing.TB) {
	select {
	case <-h.exited:
		return
	default:
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(10 * time.Second):
		_ = h.cmd.Process.Kill()
		<-h.exited
	}
}

// procs are the host's processes as "comm args" lines, sorted, without
// the SSH sessions of the test itself.
func (h *testHost) procs(t testing.TB) []string {
	t.Helper()
	// The host's own /proc (its PID namespace) is mounted in its root.
	dirs, _ := filepath.Glob(h.path("/proc/[0-9]*"))
	var out []string
	for _, d := range dirs {
		cmdline, err := os.ReadFile(d + "/cmdline")
		if err != nil || len(cmdline) == 0 {
			continue // gone, or a kernel thread
		}
		line := strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))
		// sshd's per-connection processes (re-executed with -R, then
		// renamed "sshd: ...") come and go with every connection.
		if strings.HasPrefix(line, "sshd: ") || strings.Contains(line, "sftp-server") || (strings.HasPrefix(line, "/usr/sbin/sshd ") && strings.HasSuffix(line, " -R")) {
			continue
		}
		out = append(out, filepath.Base(d)+" "+line)
	}
	slices.Sort(out)
	return out
}

// tree lists the host's files (path, type, mode, size, link target), all
// but the kernel's and the volatile ones (/proc, /sys, /dev, /run, /tmp,
// and the login records sshd updates at every login).
func (h *testHost) tree(t testing.TB) []string {
	t.Helper()
	// The trailing slash: /proc/PID/root is a symlink, which WalkDir
	// would not enter.
	root := h.path("/")
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(p, root)
		switch rel {
		case "/proc", "/sys", "/dev", "/run", "/tmp":
			return fs.SkipDir
		case "/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog":
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s %v", rel, info.Mode())
		if info.Mode().IsRegular() {
			line += fmt.Sprintf(" %d", info.Size())
		}
		if info.Mode()&fs.ModeSymlink != 0 {
			target, _ := os.Readlink(p)
			line += " -> " + target
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatalf("host %s: walk its files: %v", h.name, err)
	}
	return out
}

// diff is the lines only in a and those only in b.
func diff(a, b []string) (onlyA, onlyB []string) {
	in := func(s []string) map[string]bool {
		m := map[string]bool{}
		for _, x := range s {
			m[x] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	for _, x := range a {
		if !mb[x] {
			onlyA = append(onlyA, x)
		}
	}
	for _, x := range b {
		if !ma[x] {
			onlyB = append(onlyB, x)
		}
	}
	return
}
