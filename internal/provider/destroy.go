package provider

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/supervise"
)

// hostRecord is what the host looked like before the first machine: the
// parents of the cgroups Nomad clients make (v1 "nomad" in every
// hierarchy) that already existed, so that Cleanup removes only those the
// cluster made.
type hostRecord struct {
	NomadCgroups []string `json:"nomad_cgroups_before"`
	// MemoryCgroup is the v1 memory cgroup the first `up` ran in, which its
	// agents inherited and made their services' memory cgroups below.
	MemoryCgroup string `json:"memory_cgroup,omitempty"`
}

// readHost reads the host record; false when there is none to trust.
func (l *Local) readHost() (hostRecord, bool) {
	var rec hostRecord
	b, err := os.ReadFile(filepath.Join(l.opts.Dir, hostFile))
	if err != nil || json.Unmarshal(b, &rec) != nil {
		return hostRecord{}, false
	}
	return rec, true
}

// memoryV1Roots are the v1 memory cgroups below which an agent may have
// made its services' cgroups (below the one it runs in): the one agent pid
// runs in (0: none running), the one the first `up` ran in, and the one
// this process runs in.
func (l *Local) memoryV1Roots(pid int) []string {
	var roots []string
	add := func(dir string) {
		if dir != "" && !slices.Contains(roots, dir) {
			roots = append(roots, dir)
		}
	}
	if pid > 0 {
		dir, _ := supervise.MemoryV1Cgroup(pid)
		add(dir)
	}
	if rec, ok := l.readHost(); ok {
		add(rec.MemoryCgroup)
	}
	dir, _ := supervise.MemoryV1Cgroup(os.Getpid())
	add(dir)
	return roots
}

func (l *Local) recordHost() error {
	p := filepath.Join(l.opts.Dir, hostFile)
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(l.opts.Dir, 0o700); err != nil {
		return fmt.Errorf("local provider: %w", err)
	}
	mem, _ := supervise.MemoryV1Cgroup(os.Getpid())
	b, _ := json.MarshalIndent(hostRecord{NomadCgroups: nomadParents(), MemoryCgroup: mem}, "", "  ")
	if err := atomicfile.WriteFile(p, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("local provider: %w", err)
	}
	return nil
}

// nomadParents are the parent cgroups Nomad clients create for their
// tasks: "nomad" (and cpuset's "nomad/share", "nomad/reserve") in each
// v1 hierarchy, "nomad.slice" on cgroup v2.
func nomadParents() []string {
	var out []string
	for _, pattern := range []string{"/sys/fs/cgroup/*/nomad", "/sys/fs/cgroup/*/nomad/share", "/sys/fs/cgroup/*/nomad/reserve",
		"/sys/fs/cgroup/nomad.slice", "/sys/fs/cgroup/unified/nomad.slice"} {
		m, _ := filepath.Glob(pattern)
		out = append(out, m...)
	}
	slices.Sort(out)
	return out
}

// Destroy implements Provider: SIGTERM to the agent (it stops its
// services), then whatever is left in the machine's cgroups is killed (a
// Nomad client's task executors outlive it by design), the mounts Nomad
// made under the machine's directory are unmounted, the cgroups of its
// allocations and its services removed, and its directory deleted.
func (l *Local) Destroy(ctx context.Context, name string) error {
	m, err := l.load(name)
	if errors.Is(err, fs.ErrNotExist) {
		if _, serr := os.Stat(l.machineDir(name)); serr != nil {
			return nil // nothing of it exists
		}
		m = Machine{Name: name, Dir: l.machineDir(name)}
	} else if err != nil {
		return err
	}
	var errs []error
	// Read where the agent keeps memory cgroups while it still runs.
	agentPID := 0
	if m.Running {
		agentPID = m.PID
	}
	memRoots := l.memoryV1Roots(agentPID)
	if m.Running {
		if err := l.stopAgent(ctx, m); err != nil {
			errs = append(errs, err)
		}
	}
	cg := l.CgroupParent() + "/" + name
	v2 := supervise.CgroupV2Mount()
	if v2 != "" {
		if err := killCgroupTree(ctx, filepath.Join(v2, cg)); err != nil {
			errs = append(errs, fmt.Errorf("machine %s: %w", name, err))
		}
	}
	killByPath(m.Dir)
	if l.netns != nil {
		if err := l.netns.teardown(ctx, m); err != nil {
			errs = append(errs, fmt.Errorf("machine %s: %w", name, err))
		}
	}
	if err := deleteLink(LinkName(name)); err != nil {
		errs = append(errs, fmt.Errorf("machine %s: %w", name, err))
	}
	if err := unmountUnder(m.Dir); err != nil {
		errs = append(errs, fmt.Errorf("machine %s: %w", name, err))
	}
	removeAllocCgroups(filepath.Join(l.StateDir(name), "data", "nomad", "alloc"))
	for _, root := range append([]string{v2}, memRoots...) {
		if root == "" {
			continue
		}
		if err := removeCgroupTree(filepath.Join(root, cg)); err != nil {
			errs = append(errs, fmt.Errorf("machine %s: %w", name, err))
		}
	}
	for _, root := range memRoots {
		// The cluster's parent goes with its last machine; while others
		// remain it is not empty and stays.
		_ = syscall.Rmdir(filepath.Join(root, l.CgroupParent()))
	}
	if err := os.RemoveAll(m.Dir); err != nil {
		errs = append(errs, fmt.Errorf("machine %s: %w", name, err))
	}
	return errors.Join(errs...)
}

func (l *Local) stopAgent(ctx context.Context, m Machine) error {
	if err := syscall.Kill(m.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("machine %s: stop agent %d: %w", m.Name, m.PID, err)
	}
	deadline := time.Now().Add(l.opts.StopTimeout)
	for {
		if _, running := l.agentPID(m); !running {
			return nil
		}
		if time.Now().After(deadline) {
			_ = syscall.Kill(m.PID, syscall.SIGKILL)
			return fmt.Errorf("machine %s: the agent (pid %d) did not stop within %v after SIGTERM; killed it:\n%s", m.Name, m.PID, l.opts.StopTimeout, TailFile(m.Log, 10))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Cleanup removes what the cluster made besides its machines, once every
// machine is destroyed: the cgroup parent of the cluster, Nomad's parent
// cgroups if the cluster created them and they are empty, and the
// provider's directory.
func (l *Local) Cleanup(ctx context.Context) error {
	ms, err := l.List(ctx)
	if err != nil {
		return err
	}
	if len(ms) > 0 {
		return fmt.Errorf("local provider: %d machines still exist", len(ms))
	}
	var errs []error
	for _, root := range append([]string{supervise.CgroupV2Mount()}, l.memoryV1Roots(0)...) {
		if root != "" {
			if err := removeCgroupTree(filepath.Join(root, l.CgroupParent())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if rec, ok := l.readHost(); ok {
		made := slices.DeleteFunc(nomadParents(), func(p string) bool { return slices.Contains(rec.NomadCgroups, p) })
		// Deepest first; a parent another Nomad still uses is not empty
		// and stays.
		slices.SortFunc(made, func(a, b string) int { return len(b) - len(a) })
		for _, d := range made {
			_ = syscall.Rmdir(d)
		}
	}
	if l.netns != nil {
		if err := unmountUnder(l.opts.Dir); err != nil {
			errs = append(errs, err)
		}
		if err := l.netns.cleanup(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(l.opts.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// cgroupDirs lists a cgroup and its descendants, deepest first.
func cgroupDirs(root string) []string {
	var dirs []string
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return dirs
}

// killCgroupTree kills every process in a v2 cgroup tree (cgroup.kill,
// else SIGKILL to each) and waits until it is empty.
func killCgroupTree(ctx context.Context, root string) error {
	if _, err := os.Stat(root); err != nil {
		return nil
	}
	if err := os.WriteFile(filepath.Join(root, "cgroup.kill"), []byte("1"), 0o644); err != nil {
		for _, d := range cgroupDirs(root) {
			for _, pid := range cgroupPIDs(d) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		left := 0
		for _, d := range cgroupDirs(root) {
			left += len(cgroupPIDs(d))
		}
		if left == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d processes left in %s after kill", left, root)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func cgroupPIDs(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killByPath kills processes whose command line names a path under dir:
// tasks that left the machine's cgroups (none should; this is the net).
func killByPath(dir string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	self := os.Getpid()
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), dir+"/") {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err == nil && pid > 1 && pid != self {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountUnder detaches every mount below dir (Nomad's task secrets
// tmpfs and the like), deepest first.
func unmountUnder(dir string) error {
	all, err := supervise.Mounts()
	if err != nil {
		return nil
	}
	var mounts []string
	for _, m := range all {
		if strings.HasPrefix(m.Point, dir+"/") {
			mounts = append(mounts, m.Point)
		}
	}
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	var errs []error
	for _, m := range mounts {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	return errors.Join(errs...)
}

// removeAllocCgroups removes the v1 cgroups a Nomad client made for the
// allocations whose directories are in allocDir (named <alloc id>.<task>
// under "nomad" in every hierarchy).
func removeAllocCgroups(allocDir string) {
	entries, err := os.ReadDir(allocDir)
	if err != nil {
		return
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && len(e.Name()) == 36 {
			ids = append(ids, e.Name())
		}
	}
	if len(ids) == 0 {
		return
	}
	for _, parent := range nomadParents() {
		for _, d := range cgroupDirs(parent) {
			base := filepath.Base(d)
			if slices.ContainsFunc(ids, func(id string) bool { return strings.HasPrefix(base, id) }) {
				for _, pid := range cgroupPIDs(d) {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
				_ = syscall.Rmdir(d)
			}
		}
	}
}

// removeCgroupTree removes a cgroup and its descendants, deepest first,
// retrying while the kernel finishes tearing down exited processes.
func removeCgroupTree(root string) error {
	if _, err := os.Stat(root); err != nil {
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var last error
		for _, d := range cgroupDirs(root) {
			if err := syscall.Rmdir(d); err != nil && !errors.Is(err, syscall.ENOENT) {
				last = fmt.Errorf("remove cgroup %s: %w", d, err)
			}
		}
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return last
		}
		time.Sleep(100 * time.Millisecond)
	}
}
