package supervise

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// mounts are the cgroup hierarchies this process can see.
type mounts struct {
	v2       string // mount point of the cgroup v2 hierarchy; "" if none
	own      string // this process's cgroup v2, below v2 ("/" for its root)
	memoryV1 string // directory of this process's own v1 memory cgroup; "" if none
}

// findMounts reads /proc/self/mountinfo and /proc/self/cgroup. It does not
// assume /sys/fs/cgroup is cgroup v2: on hybrid hosts v2 sits at
// /sys/fs/cgroup/unified and the controllers on v1 hierarchies.
func findMounts() (mounts, error) {
	return findMountsOf("/proc/self/cgroup")
}

// CgroupV2Mount returns where the cgroup v2 hierarchy is mounted, or ""
// when there is none.
func CgroupV2Mount() string {
	m, _ := findMounts()
	return m.v2
}

// MemoryV1Cgroup returns the directory of the v1 memory cgroup process pid
// runs in, or "" when no v1 memory controller is mounted. An agent makes
// its services' memory cgroups below the one it runs in, which it
// inherited from whoever started it: that is where to clean up after it.
func MemoryV1Cgroup(pid int) (string, error) {
	m, err := findMountsOf(fmt.Sprintf("/proc/%d/cgroup", pid))
	return m.memoryV1, err
}

func findMountsOf(cgroupFile string) (mounts, error) {
	var m mounts
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return m, fmt.Errorf("read mountinfo: %w", err)
	}
	var memMount, memRoot string
	for line := range strings.Lines(string(data)) {
		pre, post, ok := strings.Cut(strings.TrimSpace(line), " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 {
			continue
		}
		switch g[0] {
		case "cgroup2":
			if m.v2 == "" {
				m.v2 = unescapeMount(f[4])
			}
		case "cgroup":
			if memMount == "" && hasOpt(g[2], "memory") {
				memMount, memRoot = unescapeMount(f[4]), unescapeMount(f[3])
			}
		}
	}
	own, err := os.ReadFile(cgroupFile)
	if err != nil {
		return m, fmt.Errorf("read %s: %w", cgroupFile, err)
	}
	m.own = "/"
	for line := range strings.Lines(string(own)) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		switch {
		case len(parts) < 3:
		case parts[0] == "0" && parts[1] == "":
			m.own = parts[2]
		case memMount != "" && hasOpt(parts[1], "memory"):
			rel := strings.TrimPrefix(parts[2], memRoot)
			m.memoryV1 = filepath.Join(memMount, rel)
		}
	}
	return m, nil
}

func hasOpt(opts, want string) bool {
	for o := range strings.SplitSeq(opts, ",") {
		if o == want {
			return true
		}
	}
	return false
}

// unescapeMount undoes the octal escapes of mountinfo (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cgPopulated reports whether the cgroup at dir (or a descendant) has a
// process. A missing cgroup is not populated.
func cgPopulated(dir string) (bool, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return bytes.Contains(data, []byte("populated 1")), nil
}

// cgProcs lists the processes of the cgroup at dir (v1 or v2).
func cgProcs(dir string) ([]int, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pids []int
	for f := range bytes.FieldsSeq(data) {
		if n, err := strconv.Atoi(string(f)); err == nil {
			pids = append(pids, n)
		}
	}
	return pids, nil
}

// cgProcsAll lists the processes of the cgroup at dir and of the cgroups a
// service created below it.
func cgProcsAll(dir string) ([]int, error) {
	pids, err := cgProcs(dir)
	if err != nil {
		return nil, err
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() {
			sub, err := cgProcsAll(filepath.Join(dir, e.Name()))
			if err != nil {
				return nil, err
			}
			pids = append(pids, sub...)
		}
	}
	return pids, nil
}

// cgCount counts the processes of the cgroup at dir and of the cgroups a
// service created below it, as len(cgProcsAll(dir)) would. Every status poll
// counts every service's processes, so this reads through one stack buffer
// with raw system calls instead of allocating files, lists and directory
// entries each time. A missing cgroup has no processes.
func cgCount(dir string) (int, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("open cgroup %s: %w", dir, err)
	}
	defer unix.Close(fd)
	var buf [2048]byte
	return cgCountAt(fd, dir, buf[:])
}

// cgCountAt counts below the open cgroup directory dirfd (named dir in errors).
func cgCountAt(dirfd int, dir string, buf []byte) (int, error) {
	n, err := countPIDs(dirfd, buf)
	if err != nil {
		return 0, fmt.Errorf("read %s/cgroup.procs: %w", dir, err)
	}
	// Sub-cgroups are rare (a service that manages its own, like a Nomad
	// client): collect their names first, since recursing reuses buf.
	var subs []string
	for {
		m, err := unix.Getdents(dirfd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("list cgroup %s: %w", dir, err)
		}
		if m == 0 {
			break
		}
		for off := 0; off+19 <= m; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(binary.NativeEndian.Uint16(buf[off+16:]))
			if reclen == 0 || off+reclen > m {
				break
			}
			if buf[off+18] == unix.DT_DIR {
				name := buf[off+19 : off+reclen]
				if i := bytes.IndexByte(name, 0); i >= 0 {
					name = name[:i]
				}
				if s := string(name); s != "." && s != ".." {
					subs = append(subs, s)
				}
			}
			off += reclen
		}
	}
	for _, s := range subs {
		sub, err := unix.Openat(dirfd, s, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue // removed since it was listed
		}
		if err != nil {
			return 0, fmt.Errorf("open cgroup %s/%s: %w", dir, s, err)
		}
		k, err := cgCountAt(sub, dir+"/"+s, buf)
		unix.Close(sub)
		if err != nil {
			return 0, err
		}
		n += k
	}
	return n, nil
}

// countPIDs counts the pids in the cgroup.procs of dirfd (0 if the cgroup
// went away).
func countPIDs(dirfd int, buf []byte) (int, error) {
	fd, err := unix.Openat(dirfd, "cgroup.procs", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	n, inNum := 0, false
	for {
		m, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if errors.Is(err, unix.ENODEV) {
			return 0, nil // the cgroup was removed while open
		}
		if err != nil {
			return 0, err
		}
		if m == 0 {
			return n, nil
		}
		for _, c := range buf[:m] {
			digit := c >= '0' && c <= '9'
			if digit && !inNum {
				n++
			}
			inNum = digit
		}
	}
}

// cgKill kills every process of the cgroup at once (cgroup.kill, Linux 5.14).
// Where cgroup.kill is missing it falls back to SIGKILL each listed process,
// repeating until the list is empty or a second has passed, since a process
// may fork while it is being killed.
func cgKill(dir string) error {
	err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	if err == nil || errors.Is(err, os.ErrNotExist) && !dirExists(dir) {
		return nil
	}
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		pids, err := cgProcs(dir)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		for _, p := range pids {
			_ = unix.Kill(p, unix.SIGKILL)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("kill cgroup %s: processes left after 1s", dir)
}

// cgSignal sends sig to every process of the cgroup at dir.
func cgSignal(dir string, sig unix.Signal) error {
	pids, err := cgProcsAll(dir)
	if err != nil {
		return err
	}
	for _, p := range pids {
		_ = unix.Kill(p, sig)
	}
	return nil
}

// cgRemove removes an empty cgroup directory, and the empty cgroups a
// service may have created below it. The kernel reports EBUSY for a short
// while after the last process left, so it retries briefly.
func cgRemove(dir string) error {
	if ents, err := os.ReadDir(dir); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				if err := cgRemove(filepath.Join(dir, e.Name())); err != nil {
					return err
				}
			}
		}
	}
	var err error
	for range 50 {
		err = unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: %w", dir, err)
}

func dirExists(dir string) bool {
	st, err := os.Stat(dir)
	return err == nil && st.IsDir()
}

// readKeyed reads a "key value" file (memory.events, memory.oom_control)
// and returns the value of key, 0 if absent.
func readKeyed(path, key string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && k == key {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

// agentLeaf is the cgroup below its own that the agent moves itself into
// when a controller is to be enabled below its cgroup: cgroup v2 lets no
// process stay in a cgroup (but the root) whose children have controllers.
// An agent that finds itself in a cgroup of that name (moved by an earlier
// run of the same process image, or put there by systemd's
// DelegateSubgroup=agent) counts from the cgroup above it.
const agentLeaf = "agent"

// ownBase is the cgroup (relative to the v2 mount) that a relative
// CgroupParent is below, for a process in cgroup own.
func ownBase(own string) string {
	if own == "" {
		return "/"
	}
	if path.Base(own) == agentLeaf {
		return path.Dir(own)
	}
	return own
}

// enableControllerV2 enables the controller ctrl ("memory") down the path
// from base (the v2 mount, or the agent's own cgroup below it: never above
// what is the agent's) to parent, so that the service cgroups below parent
// have it (memory.max). A cgroup on the way that holds this process (the
// agent's own) gets it moved into its leaf first. It reports whether the
// controller can be used below parent.
func enableControllerV2(ctrl, v2, base, parent string, log *slog.Logger) bool {
	rel, err := filepath.Rel(base, parent)
	if err != nil {
		return false
	}
	dir := base
	chain := []string{dir}
	if rel != "." {
		for p := range strings.SplitSeq(rel, "/") {
			dir = filepath.Join(dir, p)
			chain = append(chain, dir)
		}
	}
	self := os.Getpid()
	for _, d := range chain {
		have, err := os.ReadFile(filepath.Join(d, "cgroup.controllers"))
		if err != nil || !hasWord(string(have), ctrl) {
			return false
		}
		sub, _ := os.ReadFile(filepath.Join(d, "cgroup.subtree_control"))
		if hasWord(string(sub), ctrl) {
			continue
		}
		if pids, _ := cgProcs(d); d != v2 && slices.Contains(pids, self) {
			leaf := filepath.Join(d, agentLeaf)
			if err := enterCgroup(leaf); err != nil {
				log.Warn("cannot move the agent out of its cgroup to enable a controller below it", "controller", ctrl, "cgroup", d, "err", err)
				return false
			}
			log.Info("moved the agent into a leaf of its cgroup, to enable a controller below it", "controller", ctrl, "cgroup", leaf)
		}
		if err := os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte("+"+ctrl), 0); err != nil {
			log.Warn("cannot enable a controller (are there processes other than the agent's in the cgroup?)", "controller", ctrl, "cgroup", d, "err", err)
			return false
		}
	}
	return true
}

// enterCgroup moves this process (all its threads) into the cgroup v2 at
// dir, making it if need be.
func enterCgroup(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
}

func hasWord(s, w string) bool {
	for f := range strings.FieldsSeq(s) {
		if f == w {
			return true
		}
	}
	return false
}
