// Package initmode is steppe as a machine's PID 1 (DESIGN decision 15):
// it mounts the kernel's filesystems, loads the image's modules, reads
// the machine's identity and secrets from its config disk, brings up its
// network and hostname, mounts (formatting on first boot) its data disk,
// reaps orphans, and runs `steppe agent` as its child, restarting it if
// it dies; on a power-off request it stops the agent (which stops its
// services in order), syncs and powers off. It never returns.
//
// It is its own package, not part of internal/agent, because it runs
// before any agent exists and treats the agent as a child process to
// keep alive: an agent crash must never take PID 1 (and the kernel) down.
package initmode

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/image"
)

// Where init puts what it learns.
const (
	ConfigDir   = "/run/steppe/config" // tmpfs, 0700: the config disk's agent.hcl
	AgentConfig = ConfigDir + "/agent.hcl"
	// SecretsDir holds the secrets the config disk brings (tmpfs).
	SecretsDir   = "/run/steppe/secrets"
	DataMount    = agent.DefaultStateDir
	seedFile     = ".random-seed"
	agentHealthy = time.Minute // an agent up this long resets the restart backoff
	stopBudget   = 90 * time.Second
)

// IsInit says whether this process was started by the kernel as init:
// PID 1 with the name the kernel runs from an initramfs. A steppe that is
// PID 1 of a PID namespace (a container, unshare) is run by name and
// with arguments, and stays what its arguments say.
func IsInit() bool {
	if os.Getpid() != 1 || len(os.Args) != 1 {
		return false
	}
	return os.Args[0] == "/init" || os.Args[0] == "/sbin/init" || os.Args[0] == "init"
}

// Main runs init. It never returns: PID 1 exiting panics the kernel.
func Main() {
	console()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{}))
	log.Info("steppe init starting", "pid", os.Getpid())
	in := &initProc{log: log, start: time.Now()}
	in.run()
	// run returns only to power off; should poweroff fail, stay alive.
	for {
		time.Sleep(time.Hour)
	}
}

type initProc struct {
	log   *slog.Logger
	start time.Time
	cfg   image.ConfigDisk
}

// console points stdin, stdout and stderr at the console (the serial
// line the provider logs): an initramfs has no /dev/console of its own
// before devtmpfs is mounted.
func console() {
	_ = os.MkdirAll("/dev", 0o755)
	_ = unix.Mount("devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755")
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return
	}
	for i := range 3 {
		_ = unix.Dup2(fd, i)
	}
	if fd > 2 {
		_ = unix.Close(fd)
	}
}

func (in *initProc) run() {
	log := in.log
	// Ctrl-Alt-Del becomes SIGINT to init rather than an instant reboot.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGPWR, unix.SIGUSR2)
	reaper := newReaper()

	if err := mountAll(); err != nil {
		log.Error("mount the kernel's filesystems", "err", err)
	}
	if err := loadModules(log); err != nil {
		log.Error("load modules", "err", err)
	}
	log.Info("modules loaded", "since_boot", time.Since(in.start).Round(time.Millisecond))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	powerOff := make(chan string, 1)
	go watchPowerButton(ctx, log, powerOff)

	// Without its config a machine can do nothing: keep looking (a disk
	// may appear late), never exit.
	for {
		cfg, err := readConfig(ctx)
		if err == nil {
			in.cfg = cfg
			break
		}
		log.Error("read the config disk; retrying in 5 s", "err", err)
		select {
		case <-time.After(5 * time.Second):
		case s := <-sigs:
			in.shutdown(nil, reaper, s.String())
			return
		}
	}
	if err := in.applyConfig(); err != nil {
		log.Error("apply the machine's config", "err", err)
	}
	if err := network(ctx, in.cfg.Machine); err != nil {
		log.Error("network", "err", err)
	}
	if err := mountData(ctx, log); err != nil {
		log.Error("data disk: the agent's state stays in RAM this boot", "err", err)
	}
	if err := linkSecrets(); err != nil {
		log.Error("secrets directory", "err", err)
	}
	seedEntropy(log)
	log.Info("machine up", "name", in.cfg.Machine.Name, "address", in.cfg.Machine.Address, "since_boot", time.Since(in.start).Round(time.Millisecond))

	socket := agent.DefaultSocket
	if c, err := agent.ParseConfig(AgentConfig, in.cfg.Agent); err == nil && c.Socket != "" {
		socket = c.Socket
	}
	a := &agentProc{log: log, reaper: reaper, initStart: in.start}
	go serveAPIPort(ctx, log, socket, a)
	reason := a.keep(ctx, sigs, powerOff)
	in.shutdown(a, reaper, reason)
}

// shutdown stops the agent (it stops its services in dependency order),
// then everything left, syncs, unmounts the data disk and powers off.
func (in *initProc) shutdown(a *agentProc, r *reaper, reason string) {
	log := in.log
	log.Info("shutting down", "reason", reason)
	if a != nil {
		a.stop(stopBudget)
	}
	_ = unix.Kill(-1, unix.SIGTERM)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && r.children() > 0 {
		time.Sleep(100 * time.Millisecond)
	}
	_ = unix.Kill(-1, unix.SIGKILL)
	saveSeed()
	unix.Sync()
	if err := unix.Unmount(DataMount, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		log.Error("unmount data disk; remounting read-only", "err", err)
		_ = unix.Mount("", DataMount, "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	}
	unix.Sync()
	log.Info("power off")
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		log.Error("power off", "err", err)
	}
}

func mountAll() error {
	var errs []error
	m := func(src, dst, fstype string, flags uintptr, data string) {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			errs = append(errs, err)
			return
		}
		if err := unix.Mount(src, dst, fstype, flags, data); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mount %s on %s: %w", fstype, dst, err))
		}
	}
	const nse = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	m("proc", "/proc", "proc", nse, "")
	m("sysfs", "/sys", "sysfs", nse, "")
	m("devpts", "/dev/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
	m("tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777")
	m("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755")
	m("tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777")
	m("cgroup2", "/sys/fs/cgroup", "cgroup2", nse, "nsdelegate")
	// Delegate every controller to the root's children: the agent's
	// services get memory, cpu, io and pids limits (DESIGN decision 1).
	if b, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		var add []string
		for _, c := range strings.Fields(string(b)) {
			add = append(add, "+"+c)
		}
		if len(add) > 0 {
			if err := os.WriteFile("/sys/fs/cgroup/cgroup.subtree_control", []byte(strings.Join(add, " ")), 0o644); err != nil {
				errs = append(errs, fmt.Errorf("delegate cgroup controllers %v: %w", add, err))
			}
		}
	}
	return errors.Join(errs...)
}

// loadModules loads every module of the image's modules.dep, each after
// what it needs.
func loadModules(log *slog.Logger) error {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fmt.Errorf("uname: %w", err)
	}
	release := unix.ByteSliceToString(u.Release[:])
	dir := filepath.Join("/lib/modules", release)
	f, err := os.Open(filepath.Join(dir, image.ModulesDepFile))
	if err != nil {
		return fmt.Errorf("this kernel (%s) has no modules in the image: %w", release, err)
	}
	defer f.Close()
	dep, err := image.ParseModulesDep(f)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(dep))
	for n := range dep {
		names = append(names, n)
	}
	slices.Sort(names)
	order, err := dep.Order(names)
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range order {
		if err := finitModule(filepath.Join(dir, p)); err != nil {
			errs = append(errs, err)
			log.Error("load module", "module", p, "err", err)
		}
	}
	return errors.Join(errs...)
}

func finitModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("module %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("finit_module %s: %w", path, err)
	}
	return nil
}

// findDisk returns /dev/NAME of the virtio disk whose serial is serial.
func findDisk(serial string) string {
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "serial"))
		if err == nil && strings.TrimSpace(string(b)) == serial {
			return "/dev/" + e.Name()
		}
	}
	return ""
}

// findPartition returns /dev/NAME of the partition named label.
func findPartition(label string) string {
	ents, _ := os.ReadDir("/sys/class/block")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/sys/class/block", e.Name(), "uevent"))
		if err == nil && bytes.Contains(b, []byte("\nPARTNAME="+label+"\n")) {
			return "/dev/" + e.Name()
		}
	}
	return ""
}

func readConfig(ctx context.Context) (image.ConfigDisk, error) {
	var dev string
	deadline := time.Now().Add(10 * time.Second)
	for dev = findDisk(image.ConfigSerial); dev == "" && time.Now().Before(deadline); dev = findDisk(image.ConfigSerial) {
		select {
		case <-ctx.Done():
			return image.ConfigDisk{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if dev == "" {
		return image.ConfigDisk{}, fmt.Errorf("no disk with serial %s (the provider attaches it)", image.ConfigSerial)
	}
	f, err := os.Open(dev)
	if err != nil {
		return image.ConfigDisk{}, fmt.Errorf("config disk %s: %w", dev, err)
	}
	defer f.Close()
	c, err := image.ReadConfigDisk(f)
	if err != nil {
		return c, fmt.Errorf("config disk %s: %w", dev, err)
	}
	return c, nil
}

// applyConfig writes the agent's config and the disk's files (all on
// tmpfs: secrets never reach the data disk) and sets the hostname and
// the machine's /etc files.
func (in *initProc) applyConfig() error {
	c := in.cfg
	var errs []error
	if err := os.MkdirAll(ConfigDir, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(AgentConfig, c.Agent, 0o600); err != nil {
		errs = append(errs, err)
	}
	for _, f := range c.Files {
		if err := os.MkdirAll(filepath.Dir(f.Path), 0o700); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.WriteFile(f.Path, f.Data, f.Mode.Perm()); err != nil {
			errs = append(errs, err)
		}
		_ = os.Chmod(f.Path, f.Mode.Perm())
	}
	if err := unix.Sethostname([]byte(c.Machine.Name)); err != nil {
		errs = append(errs, fmt.Errorf("hostname: %w", err))
	}
	_ = os.WriteFile("/etc/hostname", []byte(c.Machine.Name+"\n"), 0o644)
	hosts := "127.0.0.1 localhost\n::1 localhost\n"
	if p, err := netip.ParsePrefix(c.Machine.Address); err == nil {
		hosts += p.Addr().String() + " " + c.Machine.Name + "\n"
	}
	for _, h := range c.Machine.Hosts {
		hosts += h + "\n"
	}
	_ = os.WriteFile("/etc/hosts", []byte(hosts), 0o644)
	var rc strings.Builder
	for _, d := range c.Machine.DNS {
		fmt.Fprintf(&rc, "nameserver %s\n", d)
	}
	_ = os.WriteFile("/etc/resolv.conf", []byte(rc.String()), 0o644)
	return errors.Join(errs...)
}

// network brings up lo and the machine's first other interface with its
// static address, and a default route when it has a gateway.
func network(ctx context.Context, m image.MachineConfig) error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		_ = netlink.LinkSetUp(lo)
	}
	var link netlink.Link
	deadline := time.Now().Add(10 * time.Second)
	for link == nil {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if l.Type() == "device" && l.Attrs().Name != "lo" && l.Attrs().EncapType == "ether" {
				link = l
				break
			}
		}
		if link != nil {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("no network interface appeared in 10 s (is virtio_net in the image?)")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	addr, err := netlink.ParseAddr(m.Address)
	if err != nil {
		return fmt.Errorf("address %q: %w", m.Address, err)
	}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("address %s on %s: %w", m.Address, link.Attrs().Name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", link.Attrs().Name, err)
	}
	if m.Gateway != "" {
		gw := net.ParseIP(m.Gateway)
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}); err != nil {
			return fmt.Errorf("default route via %s: %w", m.Gateway, err)
		}
	}
	return nil
}

// ext4Magic says whether dev holds an ext2/3/4 superblock.
func ext4Magic(dev string) (bool, error) {
	f, err := os.Open(dev)
	if err != nil {
		return false, err
	}
	defer f.Close()
	b := make([]byte, 2)
	if _, err := f.ReadAt(b, 1024+56); err != nil {
		return false, fmt.Errorf("read %s: %w", dev, err)
	}
	return b[0] == 0x53 && b[1] == 0xEF, nil
}

// mountData mounts the machine's data disk at the agent's state dir,
// formatting it (ext4, by the image's mke2fs) only when it holds no
// filesystem: a disk that has one is never formatted again.
func mountData(ctx context.Context, log *slog.Logger) error {
	var dev string
	deadline := time.Now().Add(5 * time.Second)
	for {
		if dev = findDisk(image.DataSerial); dev == "" {
			dev = findPartition(image.DataLabel)
		}
		if dev != "" || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if dev == "" {
		return fmt.Errorf("no disk with serial %s and no partition named %s", image.DataSerial, image.DataLabel)
	}
	ok, err := ext4Magic(dev)
	if err != nil {
		return err
	}
	if !ok {
		log.Info("formatting the data disk (first boot)", "device", dev)
		out, err := exec.CommandContext(ctx, "/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-L", image.DataLabel, dev).CombinedOutput()
		if err != nil {
			return fmt.Errorf("mke2fs %s: %w: %s", dev, err, bytes.TrimSpace(out))
		}
	}
	if err := os.MkdirAll(DataMount, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(dev, DataMount, "ext4", unix.MS_NOATIME, ""); err != nil {
		return fmt.Errorf("mount %s on %s: %w", dev, DataMount, err)
	}
	log.Info("data disk mounted", "device", dev, "formatted", !ok)
	return nil
}

// linkSecrets points the agent's secrets directory (state_dir/secrets)
// at the config disk's, on tmpfs: the machine's secrets are never written
// to its data disk and are whatever the provider last wrote.
func linkSecrets() error {
	link := filepath.Join(DataMount, "secrets")
	if t, err := os.Readlink(link); err == nil && t == SecretsDir {
		return nil
	}
	if err := os.MkdirAll(SecretsDir, 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(link); err != nil {
		return err
	}
	return os.Symlink(SecretsDir, link)
}

// seedEntropy mixes the seed the last boot saved into the pool (it adds
// to, never credits, the kernel's entropy: virtio-rng does that) and
// saves a new one at once, so that two boots never reuse a seed.
func seedEntropy(log *slog.Logger) {
	p := filepath.Join(DataMount, seedFile)
	if b, err := os.ReadFile(p); err == nil && len(b) > 0 {
		if err := os.WriteFile("/dev/urandom", b, 0); err != nil {
			log.Warn("seed entropy", "err", err)
		}
	}
	saveSeed()
}

func saveSeed() {
	b := make([]byte, 512)
	if _, err := unix.Getrandom(b, unix.GRND_NONBLOCK); err != nil {
		return
	}
	_ = os.WriteFile(filepath.Join(DataMount, seedFile), b, 0o600)
}

// watchPowerButton reports KEY_POWER from any input device (the ACPI
// power button: QEMU's system_powerdown, a cloud's stop).
func watchPowerButton(ctx context.Context, log *slog.Logger, out chan<- string) {
	const evKey, keyPower = 1, 116
	seen := map[string]bool{}
	for ctx.Err() == nil {
		ents, _ := os.ReadDir("/dev/input")
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), "event") || seen[e.Name()] {
				continue
			}
			seen[e.Name()] = true
			f, err := os.Open(filepath.Join("/dev/input", e.Name()))
			if err != nil {
				continue
			}
			go func() {
				defer f.Close()
				ev := make([]byte, 24) // struct input_event on 64-bit
				for {
					if _, err := io.ReadFull(f, ev); err != nil {
						return
					}
					typ := uint16(ev[16]) | uint16(ev[17])<<8
					code := uint16(ev[18]) | uint16(ev[19])<<8
					if typ == evKey && code == keyPower && ev[20] == 1 {
						log.Info("power button pressed")
						select {
						case out <- "power button":
						default:
						}
					}
				}
			}()
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}
