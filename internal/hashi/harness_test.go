package hashi

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/render"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/cluster"
)

// binary finds a daemon built into the artifact cache. Outside CI a
// missing binary skips the test with the reason; in CI (which builds them
// first with `make artifacts`) it fails.
func binary(t *testing.T, product, version string) string {
	t.Helper()
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	p, err := artifact.BinaryPath(cache, product, version)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	return p
}

// machineDirs is one test machine's directories, as an agent would lay
// them out: the rendered bundle, data, and the secrets the provider
// delivers.
type machineDirs struct {
	root, bundle, data, secrets string
}

type facts struct {
	Machine struct {
		Name, Address string
		Tags          map[string]string
	}
	Vars map[string]string
}

// renderTmpl renders a planned template through the agent's own renderer
// (its allow-list of functions included), as the agent would.
func renderTmpl(t *testing.T, name, src string, f facts) string {
	t.Helper()
	b, err := render.Execute(name, src, render.Facts{Name: f.Machine.Name, Address: f.Machine.Address, Tags: f.Machine.Tags}, f.Vars)
	if err != nil {
		t.Fatalf("template %s: %v", name, err)
	}
	return string(b)
}

// installMachine renders the role plan for m and writes m's secrets, as
// the agent and the provider would.
func installMachine(t *testing.T, root string, spec *cluster.Spec, st *cluster.State, plan cluster.RolePlan, m cluster.Machine) (machineDirs, facts) {
	t.Helper()
	d := machineDirs{root: filepath.Join(root, m.Name)}
	d.bundle, d.data, d.secrets = filepath.Join(d.root, "bundle"), filepath.Join(d.root, "data"), filepath.Join(d.root, "secrets")
	for _, p := range []string{d.bundle, d.data, d.secrets} {
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	var f facts
	f.Machine.Name, f.Machine.Address = m.Name, m.Address
	f.Machine.Tags = map[string]string{cluster.TagDataDir: d.data, cluster.TagSecretsDir: d.secrets, cluster.TagConfigDir: d.bundle}
	f.Vars = plan.Vars
	for name, src := range plan.Files {
		out := renderTmpl(t, name, string(src), f)
		if err := os.WriteFile(filepath.Join(d.bundle, strings.TrimSuffix(name, ".tmpl")), []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sec, err := cluster.MachineSecrets(spec, st, m, d.secrets)
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range sec {
		if err := os.WriteFile(filepath.Join(d.secrets, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return d, f
}

// proc is a daemon started the way the plan's ServiceDef says.
type proc struct {
	name  string
	cmd   *exec.Cmd
	log   string
	ready chan struct{} // closed on READY=1 through NOTIFY_SOCKET
	done  chan struct{}
}

// startService starts def for a machine: args rendered, stdin /dev/null,
// output to a log file, a NOTIFY_SOCKET of its own. Cleanup stops it with
// the plan's stop signal and kills its process group after the timeout.
func startService(t *testing.T, bin string, def cluster.ServiceDef, d machineDirs, f facts) *proc {
	t.Helper()
	var args []string
	for i, a := range def.Args {
		args = append(args, renderTmpl(t, fmt.Sprintf("%s-arg%d", def.Name, i), a, f))
	}
	p := &proc{name: f.Machine.Name + "/" + def.Name, log: filepath.Join(d.root, def.Name+".log"), ready: make(chan struct{}), done: make(chan struct{})}

	sock := filepath.Join(d.root, def.Name+".notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 4096)
		readied := false
		for {
			n, _, err := ln.ReadFromUnix(buf)
			if err != nil {
				return
			}
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if line == "READY=1" && !readied {
					readied = true
					close(p.ready)
				}
			}
		}
	}()

	logf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = append(def.Env, "NOTIFY_SOCKET="+sock, "HOME="+d.root, "PATH=/usr/bin:/bin")
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(t, def.StopSignal, def.StopTimeout)
		ln.Close()
	})
	return p
}

func (p *proc) stop(t *testing.T, sig syscall.Signal, timeout time.Duration) {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Signal(sig)
		select {
		case <-p.done:
		case <-time.After(timeout):
			t.Logf("%s did not stop within %v after %v: killing its process group", p.name, timeout, sig)
		}
	}
	// Whatever it left behind (task executors) goes too.
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// tail is the end of a daemon's log, for failure messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return fmt.Sprintf("--- %s log (tail) ---\n%s", p.name, b)
}

func waitReady(ctx context.Context, t *testing.T, ps ...*proc) {
	t.Helper()
	for _, p := range ps {
		select {
		case <-p.ready:
		case <-p.done:
			t.Fatalf("%s exited before READY=1\n%s", p.name, p.tail())
		case <-ctx.Done():
			t.Fatalf("%s: no READY=1: %v\n%s", p.name, ctx.Err(), p.tail())
		}
	}
}

func serviceDef(t *testing.T, plan cluster.RolePlan, name string) cluster.ServiceDef {
	t.Helper()
	for _, s := range plan.Services {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("role %s has no service %s", plan.Role, name)
	return cluster.ServiceDef{}
}

func logTails(ps []*proc) string {
	var b strings.Builder
	for _, p := range ps {
		b.WriteString(p.tail())
		b.WriteString("\n")
	}
	return b.String()
}

// cleanupHost registers (to run after every process of the test is gone,
// so call it before starting any) the removal of what Nomad clients leave
// on the host: mounts under root (task secrets tmpfs) and the cgroups
// created under Nomad's parents during the test.
func cleanupHost(t *testing.T, root string) {
	t.Helper()
	before := nomadCgroups()
	t.Cleanup(func() {
		// Task executors and tasks outlive the Nomad agent by design: kill
		// any process of this test that is left, found by its cgroup or by
		// its command line naming the test's directory.
		for _, pid := range leftovers(root, before) {
			t.Logf("killing leftover process %d", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
		b, err := os.ReadFile("/proc/self/mountinfo")
		if err == nil {
			var mounts []string
			for _, line := range strings.Split(string(b), "\n") {
				f := strings.Fields(line)
				if len(f) > 4 && strings.HasPrefix(f[4], root+"/") {
					mounts = append(mounts, f[4])
				}
			}
			// Deepest first.
			slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
			for _, m := range mounts {
				if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
					t.Logf("unmount %s: %v", m, err)
				}
			}
		}
		var created []string
		for _, d := range nomadCgroups() {
			if !slices.Contains(before, d) {
				created = append(created, d)
			}
		}
		slices.SortFunc(created, func(a, b string) int { return len(b) - len(a) })
		for _, d := range created {
			if err := os.Remove(d); err != nil {
				t.Logf("remove cgroup %s: %v", d, err)
			}
		}
	})
}

// nomadCgroups lists the cgroup directories under Nomad's parents (v1
// "nomad" in every hierarchy, v2 "nomad.slice").
func nomadCgroups() []string {
	var out []string
	for _, pattern := range []string{"/sys/fs/cgroup/*/nomad", "/sys/fs/cgroup/nomad.slice", "/sys/fs/cgroup/unified/nomad.slice"} {
		tops, _ := filepath.Glob(pattern)
		for _, top := range tops {
			filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					out = append(out, p)
				}
				return nil
			})
		}
	}
	return out
}

// leftovers are the processes in cgroups created since before, or whose
// command line names root.
func leftovers(root string, before []string) []int {
	var pids []int
	seen := map[int]bool{}
	add := func(pid int) {
		if pid > 1 && pid != os.Getpid() && !seen[pid] {
			seen[pid] = true
			pids = append(pids, pid)
		}
	}
	for _, d := range nomadCgroups() {
		if slices.Contains(before, d) {
			continue
		}
		for _, f := range []string{"cgroup.procs", "tasks"} {
			b, err := os.ReadFile(filepath.Join(d, f))
			if err != nil {
				continue
			}
			for _, l := range strings.Fields(string(b)) {
				var pid int
				if _, err := fmt.Sscan(l, &pid); err == nil {
					add(pid)
				}
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(root+"/")) {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(filepath.Base(filepath.Dir(p)), &pid); err == nil {
			add(pid)
		}
	}
	return pids
}
