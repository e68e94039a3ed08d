package image

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
)

// Firmware and defaults for booting an image under QEMU.
const (
	DefaultOVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	DefaultOVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
	DefaultMemory   = 512 // MiB: an agent and a Nomad client under TCG
	DefaultCPUs     = 1
	// Files of a VM's directory.
	ConsoleLog = "console.log" // the serial console
	APISocket  = "api.sock"    // the host's end of the agent's API port
	QMPSocket  = "qmp.sock"
	PIDFile    = "qemu.pid"
	varsFile   = "efivars.fd"
)

// VM is one QEMU machine booted from an image.
type VM struct {
	Dir string // its files (console log, sockets, firmware variables)
	// Image boots through UEFI firmware (OVMF) from the image's ESP; it is
	// never written (snapshot=on): images are immutable.
	Image string
	// Kernel, Initrd and Cmdline boot the kernel directly instead (no
	// firmware: faster, for tests).
	Kernel, Initrd, Cmdline string
	OVMFCode                string // "": DefaultOVMFCode
	ConfigDisk              string // the machine's config disk (raw tar)
	DataDisk                string // its persistent disk (raw)
	Tap                     string // a tap device to attach; "": no network
	MAC                     string
	MemoryMiB, CPUs         int
	// Daemonize detaches QEMU (it writes Dir/qemu.pid): the provider's
	// machines outlive the operator's command.
	Daemonize bool
}

// KVM says whether hardware virtualization can be used here.
func KVM() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// Args returns qemu-system-x86_64's arguments for the VM.
func (v VM) Args() ([]string, error) {
	if v.Dir == "" {
		return nil, errors.New("vm: no directory")
	}
	mem, cpus := v.MemoryMiB, v.CPUs
	if mem <= 0 {
		mem = DefaultMemory
	}
	if cpus <= 0 {
		cpus = DefaultCPUs
	}
	accel, cpu := "tcg", "max"
	if KVM() {
		accel, cpu = "kvm", "host"
	}
	a := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
		"-machine", "q35,accel=" + accel, "-cpu", cpu,
		"-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus),
		"-chardev", "file,id=con,path=" + filepath.Join(v.Dir, ConsoleLog),
		"-serial", "chardev:con",
		"-qmp", "unix:" + filepath.Join(v.Dir, QMPSocket) + ",server=on,wait=off",
		"-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
		"-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=api,path=" + filepath.Join(v.Dir, APISocket) + ",server=on,wait=off",
		"-device", "virtserialport,chardev=api,name=" + APIPortName,
	}
	switch {
	case v.Kernel != "":
		a = append(a, "-kernel", v.Kernel, "-initrd", v.Initrd, "-append", v.Cmdline)
	case v.Image != "":
		code := v.OVMFCode
		if code == "" {
			code = DefaultOVMFCode
		}
		vars := filepath.Join(v.Dir, varsFile)
		if _, err := os.Stat(vars); err != nil {
			b, err := os.ReadFile(DefaultOVMFVars)
			if err != nil {
				return nil, fmt.Errorf("vm: UEFI variables template (apt-get install ovmf): %w", err)
			}
			if err := os.WriteFile(vars, b, 0o600); err != nil {
				return nil, fmt.Errorf("vm: %w", err)
			}
		}
		format := "raw"
		if f, err := os.Open(v.Image); err == nil {
			magic := make([]byte, 4)
			if _, err := io.ReadFull(f, magic); err == nil && string(magic) == "QFI\xfb" {
				format = "qcow2"
			}
			f.Close()
		}
		a = append(a,
			"-drive", "if=pflash,format=raw,readonly=on,file="+code,
			"-drive", "if=pflash,format=raw,file="+vars,
			"-drive", "if=none,id=boot,snapshot=on,format="+format+",file="+v.Image,
			"-device", "virtio-blk-pci,drive=boot,bootindex=0")
	default:
		return nil, errors.New("vm: neither an image nor a kernel to boot")
	}
	if v.ConfigDisk != "" {
		a = append(a, "-drive", "if=none,id=cfg,format=raw,readonly=on,file="+v.ConfigDisk,
			"-device", "virtio-blk-pci,drive=cfg,serial="+ConfigSerial)
	}
	if v.DataDisk != "" {
		a = append(a, "-drive", "if=none,id=data,format=raw,cache=writeback,file="+v.DataDisk,
			"-device", "virtio-blk-pci,drive=data,serial="+DataSerial)
	}
	a = append(a, "-nic", "none")
	if v.Tap != "" {
		dev := "virtio-net-pci,netdev=n0"
		if v.MAC != "" {
			dev += ",mac=" + v.MAC
		}
		a = append(a, "-netdev", "tap,id=n0,ifname="+v.Tap+",script=no,downscript=no", "-device", dev)
	}
	if v.Daemonize {
		a = append(a, "-daemonize", "-pidfile", filepath.Join(v.Dir, PIDFile))
	}
	return a, nil
}

// Command returns the QEMU process for the VM, not started.
func (v VM) Command(ctx context.Context) (*exec.Cmd, error) {
	if err := os.MkdirAll(v.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	args, err := v.Args()
	if err != nil {
		return nil, err
	}
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("vm: no qemu-system-x86_64 (apt-get install qemu-system-x86): %w", err)
	}
	return exec.CommandContext(ctx, bin, args...), nil
}

// MakeDisk makes a sparse raw disk of size bytes, unless one exists
// (a machine's data disk survives its VM).
func MakeDisk(path string, size int64) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("disk %s: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("disk %s: %w", path, err)
	}
	return f.Close()
}

// MakeTap creates a persistent tap device on bridge (in this process's
// network namespace), up, for a VM to open by name.
func MakeTap(name, bridge string) error {
	if l, err := netlink.LinkByName(name); err == nil {
		_ = netlink.LinkDel(l)
	}
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_DEFAULTS | netlink.TUNTAP_VNET_HDR}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("tap %s: %w", name, err)
	}
	if bridge != "" {
		br, err := netlink.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("tap %s: bridge %s: %w", name, bridge, err)
		}
		if err := netlink.LinkSetMaster(tap, br); err != nil {
			return fmt.Errorf("tap %s: join %s: %w", name, bridge, err)
		}
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		return fmt.Errorf("tap %s: up: %w", name, err)
	}
	return nil
}

// QMP sends one command to a VM's QMP socket ("system_powerdown",
// "quit") and returns QEMU's answer.
func QMP(ctx context.Context, dir, command string) (json.RawMessage, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(dir, QMPSocket))
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", dir, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	if _, err := r.ReadBytes('\n'); err != nil { // the greeting
		return nil, fmt.Errorf("qmp %s: %w", dir, err)
	}
	for _, cmd := range []string{"qmp_capabilities", command} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			return nil, fmt.Errorf("qmp %s: %s: %w", dir, cmd, err)
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				if cmd == "quit" {
					return nil, nil
				}
				return nil, fmt.Errorf("qmp %s: %s: %w", dir, cmd, err)
			}
			var m map[string]json.RawMessage
			if json.Unmarshal(line, &m) != nil {
				continue
			}
			if e, ok := m["error"]; ok {
				return nil, fmt.Errorf("qmp %s: %s: %s", dir, cmd, e)
			}
			if ret, ok := m["return"]; ok {
				if cmd == command {
					return ret, nil
				}
				break
			}
		}
	}
	return nil, nil
}
