package image_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/image"
	"github.com/steppe/steppe/internal/initmode"
	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

// These tests boot real VMs (QEMU, TCG here): run them under the e2e lock.

func cacheDir() string {
	if c := os.Getenv("STEPPE_CACHE"); c != "" {
		return c
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "steppe")
}

// bootPrereqs ends the test unless QEMU, OVMF, the kernel and root are here.
func bootPrereqs(t testing.TB) string {
	t.Helper()
	testenv.NeedRoot(t, "a VM on a tap device")
	for _, tool := range []string{"qemu-system-x86_64", "objcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Lacks(t, "%s not installed (apt-get install qemu-system-x86 binutils): %v", tool, err)
		}
	}
	for _, f := range []string{image.DefaultOVMFCode, image.DefaultStub} {
		if _, err := os.Stat(f); err != nil {
			testenv.Lacks(t, "%s missing (apt-get install ovmf systemd-boot-efi): %v", f, err)
		}
	}
	k, err := image.CachedKernel(cacheDir())
	if err != nil {
		testenv.Lacks(t, "%v", err)
	}
	return k
}

// buildSteppe builds a static steppe, as an image carries it.
func buildSteppe(t testing.TB, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "steppe")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "github.com/steppe/steppe/cmd/steppe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build steppe: %v\n%s", err, b)
	}
	return out
}

// bridge makes the cluster's bridge (the host at 10.213.30.1) and a tap on
// it, in this test's own network namespace (scripts/offline).
func bridge(t testing.TB, tap string) {
	t.Helper()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "stbimg0"}}
	if err := netlink.LinkAdd(br); err != nil && !os.IsExist(err) {
		t.Fatalf("bridge: %v", err)
	}
	addr, _ := netlink.ParseAddr("10.213.30.1/24")
	if err := netlink.AddrReplace(br, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	if err := image.MakeTap(tap, "stbimg0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(tap); err == nil {
			netlink.LinkDel(l)
		}
		netlink.LinkDel(br)
	})
}

const agentHCL = `agent {
  state_dir = "/var/lib/steppe"
}
machine {
  name    = "vm1"
  address = "10.213.30.2"
}
# A service that answers on the machine's address: the image's own
# steppe serving its /etc/steppe over HTTP.
service "web" {
  command = "/init"
  args    = ["artifact", "serve", "/etc/steppe", "-addr", "10.213.30.2:8080"]
  ready {
    http = "http://10.213.30.2:8080/image.json"
  }
}
`

// boot starts vm and waits until its agent, through the API port,
// reports the web service running; it returns how long that took.
func boot(t testing.TB, vm image.VM) (time.Duration, func()) {
	_, ready, stop := bootTimes(t, vm)
	return ready, stop
}

// bootTimes is boot, also returning when the agent first answered.
func bootTimes(t testing.TB, vm image.VM) (agentAt, readyAt time.Duration, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd, err := vm.Command(ctx)
	if err != nil {
		t.Fatal(err)
	}
	qlog, _ := os.Create(filepath.Join(vm.Dir, "qemu.log"))
	cmd.Stdout, cmd.Stderr = qlog, qlog
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop = func() {
		cancel()
		<-exited
	}
	client := agent.NewClient(filepath.Join(vm.Dir, image.APISocket))
	deadline := time.Now().Add(3 * time.Minute)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			exited <- err
			stop()
			t.Fatalf("qemu exited: %v\nconsole:\n%s", err, console(vm))
		default:
		}
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := client.Status(cctx)
		ccancel()
		if err == nil {
			if agentAt == 0 {
				agentAt = time.Since(start)
			}
			for _, s := range st.Services {
				if s.Name == "web" && s.State == "running" && s.Ready {
					return agentAt, time.Since(start), stop
				}
			}
			lastErr = nil
		} else {
			lastErr = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	stop()
	t.Fatalf("the agent did not report web ready within 3 minutes (last: %v)\nconsole:\n%s", lastErr, console(vm))
	return 0, 0, nil
}

func console(vm image.VM) string {
	b, _ := os.ReadFile(filepath.Join(vm.Dir, image.ConsoleLog))
	return string(b)
}

// TestBoot builds an image and boots it under QEMU twice, with the
// kernel booted directly and through UEFI firmware (OVMF) from the
// image's ESP: steppe is PID 1, formats the data disk on first boot only,
// brings up the network from the config disk, runs the agent, and the
// agent answers `status` through the virtio-serial port; a service it
// runs answers on the VM's address over the tap; an ACPI power-off stops
// it cleanly.
func TestBoot(t *testing.T) {
	kernel := bootPrereqs(t)
	dir := t.TempDir()
	steppe := buildSteppe(t, dir)
	img := filepath.Join(dir, "steppe.img")
	bootDir := filepath.Join(dir, "boot")
	res, err := image.Build(context.Background(), image.Options{Kernel: kernel, Steppe: steppe, Out: img, BootDir: bootDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("image: %d MiB, initramfs %d KiB", res.Size>>20, res.Initrd>>10)
	bridge(t, "stqimg0")
	cfg := filepath.Join(dir, "config.img")
	if err := image.WriteConfigDisk(cfg, image.ConfigDisk{
		Machine: image.MachineConfig{Name: "vm1", Address: "10.213.30.2/24"},
		Agent:   []byte(agentHCL),
		Files:   []image.ConfigFile{{Path: "/run/steppe/secrets/token", Mode: 0o600, Data: []byte("not-in-the-image")}},
	}); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data.img")
	if err := image.MakeDisk(data, 256<<20); err != nil {
		t.Fatal(err)
	}
	cmdline, _ := os.ReadFile(filepath.Join(bootDir, "cmdline"))

	run := func(t *testing.T, vm image.VM, wantFormat, crash bool) {
		took, stop := boot(t, vm)
		defer stop()
		t.Logf("VM start to agent answering with its service ready: %s", took.Round(time.Millisecond))
		con := console(vm)
		if !strings.Contains(con, `msg="steppe init starting" pid=1`) {
			t.Errorf("steppe is not PID 1:\n%s", con)
		}
		if want := "formatted=" + map[bool]string{true: "true", false: "false"}[wantFormat]; !strings.Contains(con, want) {
			t.Errorf("console lacks %s:\n%s", want, con)
		}
		sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
		st, err := agent.NewClient(filepath.Join(vm.Dir, image.APISocket)).Status(sctx)
		scancel()
		if err != nil {
			t.Fatal(err)
		}
		if st.Agent.PID <= 1 {
			t.Errorf("agent pid %d: it should be init's child", st.Agent.PID)
		}
		// The service answers on the VM's address, across the tap and bridge.
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: (&net.Dialer{}).DialContext}}
		resp, err := hc.Get("http://10.213.30.2:8080/image.json")
		if err != nil {
			t.Fatalf("GET the VM's service: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), res.Release) || strings.Contains(string(body), "not-in-the-image") {
			t.Errorf("the VM's service answered %q", body)
		}
		if crash {
			crashAgent(t, vm, st)
		}
		// ACPI power button: init stops the agent, syncs, powers off.
		if _, err := image.QMP(context.Background(), vm.Dir, "system_powerdown"); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(2 * time.Minute)
		for !strings.Contains(console(vm), "power off") && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
		}
		if !strings.Contains(console(vm), `msg="agent stopped"`) {
			t.Errorf("no clean agent stop on power-off:\n%s", console(vm))
		}
	}
	t.Run("direct", func(t *testing.T) {
		run(t, image.VM{Dir: filepath.Join(dir, "vm-direct"), Kernel: filepath.Join(bootDir, "vmlinuz"), Initrd: filepath.Join(bootDir, "initrd.img"),
			Cmdline: string(cmdline), ConfigDisk: cfg, DataDisk: data, Tap: "stqimg0", MAC: "52:54:00:13:00:02"}, true, true)
	})
	t.Run("uefi", func(t *testing.T) {
		// The same data disk: formatted on the first boot only.
		run(t, image.VM{Dir: filepath.Join(dir, "vm-uefi"), Image: img, ConfigDisk: cfg, DataDisk: data, Tap: "stqimg0", MAC: "52:54:00:13:00:02"}, false, false)
	})
}

// crashAgent SIGKILLs the VM's agent through init's test hook on the API
// port: init starts it again and the new agent adopts the running
// service (same pid, not counted as a restart).
func crashAgent(t *testing.T, vm image.VM, before agent.StatusReport) {
	t.Helper()
	var web supervise.Status
	for _, s := range before.Services {
		if s.Name == "web" {
			web = s
		}
	}
	c, err := net.Dial("unix", filepath.Join(vm.Dir, image.APISocket))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte(initmode.KillAgentRequest + "\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || !strings.Contains(line, fmt.Sprintf(`"killed":%d`, before.Agent.PID)) {
		t.Fatalf("kill hook answered %q, %v (agent pid %d)", line, err, before.Agent.PID)
	}
	start := time.Now()
	client := agent.NewClient(filepath.Join(vm.Dir, image.APISocket))
	for time.Since(start) < 2*time.Minute {
		// Each try bounded: a call that catches the port between the old
		// agent and the new one must not wait for ever (CI saw one hang).
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := client.Status(sctx)
		scancel()
		if err == nil && st.Agent.PID != before.Agent.PID {
			for _, s := range st.Services {
				if s.Name != "web" {
					continue
				}
				if s.PID != web.PID || s.Restarts != web.Restarts || !s.Adopted {
					t.Fatalf("after the agent's crash web is %+v; before it was %+v (want the same process, adopted)", s, web)
				}
				t.Logf("agent killed; init restarted it (pid %d -> %d) and it adopted web (pid %d) in %s", before.Agent.PID, st.Agent.PID, s.PID, time.Since(start).Round(time.Millisecond))
				if !strings.Contains(console(vm), "agent exited; restarting it") {
					t.Errorf("init did not log the restart:\n%s", console(vm))
				}
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("no new agent answered within 2 minutes\nconsole:\n%s", console(vm))
}
