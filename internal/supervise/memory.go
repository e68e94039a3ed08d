package supervise

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// oomCount reads how many OOM kills the service's memory cgroup has seen.
// The kernel counts a kill in the victim's own memory cgroup whichever
// limit ran out: the service's, one above it, or the machine's memory.
func (a *service) oomCount() int64 {
	switch {
	case a.cg != "" && a.sup.memV2:
		return readKeyed(filepath.Join(a.cg, "memory.events"), "oom_kill")
	case a.sup.memV1 != "":
		return readKeyed(filepath.Join(a.sup.memV1, a.name, "memory.oom_control"), "oom_kill")
	}
	return 0
}

// ownOOMCounter reports whether the service's processes sit in a memory
// cgroup of their own, whose counter tells their OOM kills apart.
func (a *service) ownOOMCounter() bool {
	return a.cg != "" && a.sup.memV2 || a.memcg != ""
}

// checkOOM counts the OOM kills since the last look (oomBase, taken when
// the run began) and reports whether there were any.
func (a *service) checkOOM() bool {
	n := a.oomCount()
	if n < a.oomBase {
		a.oomBase = 0 // the cgroup was made anew under the run: it counts from 0
	}
	if n > a.oomBase {
		a.oomKills += int(n - a.oomBase)
		a.oomBase = n
		return true
	}
	return false
}

// killedByOOM reports whether the main process that ended with status ws
// was killed by the kernel's OOM killer: its memory cgroup counted a kill,
// or, with no cgroup of its own to count them, it died of SIGKILL while
// the kernel's own count grew and the kernel's log names its pid.
func (a *service) killedByOOM(pid int, ws unix.WaitStatus, known bool) bool {
	if a.checkOOM() {
		return true
	}
	if a.ownOOMCounter() || !known || !ws.Signaled() || ws.Signal() != unix.SIGKILL {
		return false
	}
	if n := sysOOMCount(); n <= a.sysOOMBase {
		return false
	}
	killed, err := kernelLogKilled(pid, a.sysOOMSince)
	if err != nil {
		a.sup.log.Warn("cannot tell whether the OOM killer killed the service: the kernel's OOM count grew, but its log is not readable", "service", a.name, "pid", pid, "err", err)
		return false
	}
	if killed {
		a.oomKills++
	}
	return killed
}

// sysOOMCount is how many processes the kernel's OOM killer has killed on
// this machine since boot (any cgroup), 0 if unknown.
func sysOOMCount() int64 {
	return readKeyed("/proc/vmstat", "oom_kill")
}

// markSysOOM notes the kernel's OOM count and the time, when a run begins
// (or is adopted): what killedByOOM compares with.
func (a *service) markSysOOM() {
	a.sysOOMBase, a.sysOOMSince = sysOOMCount(), monoMicros()
}

// monoMicros is CLOCK_MONOTONIC in microseconds: the clock of the kernel
// log's timestamps (neither counts a suspend).
func monoMicros() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}

// kernelLogKilled reports whether the kernel's log (/dev/kmsg, what dmesg
// reads) says the OOM killer killed pid at or after since (microseconds,
// CLOCK_MONOTONIC; older records may name an earlier process of that pid):
// "Out of memory: Killed process PID (comm)", or "Memory cgroup out of
// memory: Killed process PID ...".
func kernelLogKilled(pid int, since int64) (bool, error) {
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("open /dev/kmsg: %w", err)
	}
	defer unix.Close(fd)
	want := "Killed process " + strconv.Itoa(pid) + " ("
	buf := make([]byte, 8192) // one record per read; longer ones fail with EINVAL
	for {
		n, err := unix.Read(fd, buf)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return false, nil // the end of the log
		case errors.Is(err, unix.EPIPE), errors.Is(err, unix.EINVAL):
			continue // overwritten while read, or too long: the next record
		case err != nil:
			return false, fmt.Errorf("read /dev/kmsg: %w", err)
		case n == 0:
			return false, nil
		}
		// "PRIORITY,SEQ,TIME,FLAGS;MESSAGE\n", TIME in microseconds. A
		// second of slack: the two clocks are read apart.
		head, msg, ok := strings.Cut(string(buf[:n]), ";")
		if !ok || !strings.Contains(msg, want) {
			continue
		}
		if f := strings.Split(head, ","); len(f) >= 3 {
			if ts, err := strconv.ParseInt(f[2], 10, 64); err == nil && ts >= since-1e6 {
				return true, nil
			}
		}
	}
}

// oomCause says which memory ran out, as far as the service's spec tells.
func (a *service) oomCause() string {
	if a.spec.MemoryMax > 0 {
		return fmt.Sprintf("its memory limit of %d bytes, or a limit above it, ran out", a.spec.MemoryMax)
	}
	return "it has no memory limit of its own: the machine's memory, or a limit above the service's, ran out"
}

// applyMemory writes the memory limits before a start.
func (a *service) applyMemory() error {
	sp := a.spec
	switch {
	case a.cg != "" && a.sup.memV2:
		return a.applyMemoryV2()
	case a.memcg != "":
		return a.applyMemoryV1()
	case sp.MemoryMax > 0 || sp.MemoryHigh > 0:
		if !a.warnedMemory {
			a.warnedMemory = true
			a.log.agentf("memory limit not enforced: no usable memory controller")
			a.sup.log.Warn("memory limit not enforced: no usable memory controller", "service", a.name)
		}
	}
	return nil
}

func (a *service) applyMemoryV2() error {
	sp := a.spec
	limit := func(file string, n int64) error {
		v := "max"
		if n > 0 {
			v = strconv.FormatInt(n, 10)
		}
		if err := os.WriteFile(filepath.Join(a.cg, file), []byte(v), 0); err != nil && n > 0 {
			return fmt.Errorf("%s: %w", file, err)
		}
		return nil
	}
	if err := limit("memory.max", sp.MemoryMax); err != nil {
		return err
	}
	if sp.MemoryMax > 0 {
		_ = os.WriteFile(filepath.Join(a.cg, "memory.swap.max"), []byte("0"), 0)
	}
	return limit("memory.high", sp.MemoryHigh)
}

// applyMemoryV1 makes the service's own v1 memory cgroup, with its limit
// or with none (it still counts the service's OOM kills).
func (a *service) applyMemoryV1() error {
	sp := a.spec
	if err := os.MkdirAll(a.memcg, 0o755); err != nil {
		return fmt.Errorf("memory cgroup: %w", err)
	}
	if sp.MemoryHigh > 0 && !a.warnedMemory {
		a.warnedMemory = true // v1 has no memory.high: only memory_max is enforced
		a.log.agentf("memory_high not enforced: the memory controller is cgroup v1 here")
		a.sup.log.Warn("memory_high not enforced: the memory controller is cgroup v1 here", "service", a.name)
	}
	v := []byte("-1")
	if sp.MemoryMax > 0 {
		v = []byte(strconv.FormatInt(sp.MemoryMax, 10))
	}
	// memsw (memory+swap) must stay >= the memory limit: raise it first
	// when it is lower, so no order of writes fails; then set both so the
	// limit cannot be dodged by swapping.
	memsw := filepath.Join(a.memcg, "memory.memsw.limit_in_bytes")
	_ = os.WriteFile(memsw, []byte("-1"), 0)
	if err := os.WriteFile(filepath.Join(a.memcg, "memory.limit_in_bytes"), v, 0); err != nil {
		return fmt.Errorf("memory.limit_in_bytes: %w", err)
	}
	_ = os.WriteFile(memsw, v, 0)
	return nil
}
