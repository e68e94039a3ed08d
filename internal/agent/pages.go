package agent

import (
	"bytes"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// releaseExecutablePages drops the agent's mappings of its own code and
// read-only data, so that only what the agent goes on using becomes resident
// again.
//
// Why: steppe is one binary, and every package linked into it runs its
// initializer at start whether the agent uses it or not. The kernel maps the
// executable 64 KiB around each fault, so those initializers, the runtime's
// setup and one-off work (parsing the config, verifying and unpacking a
// release) leave about 9 MiB of the binary mapped that the agent never
// touches again. Those pages are clean: MADV_DONTNEED on a private mapping
// that was never written only removes them from the process's page tables.
// They stay in the page cache, where the kernel reclaims them first, and a
// page the agent still needs is mapped back by a minor fault, without I/O.
// Writable mappings (.data, .bss, heap) are never touched: for them
// MADV_DONTNEED would throw away state.
//
// It returns how many bytes of address space were advised.
func releaseExecutablePages() (int, error) {
	var exe unix.Stat_t
	if err := unix.Stat("/proc/self/exe", &exe); err != nil {
		return 0, fmt.Errorf("stat own executable: %w", err)
	}
	// On overlayfs the mappings name the underlying file's device and
	// inode, not the ones stat sees: the path is compared as well.
	exePath, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("own executable: %w", err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("read own mappings: %w", err)
	}
	total := 0
	for line := range bytes.Lines(maps) {
		m, ok := parseMapping(line)
		if !ok || m.writable || !m.private {
			continue
		}
		if (m.dev != exe.Dev || m.inode != exe.Ino) && m.path != exePath {
			continue
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_DONTNEED); errno != 0 {
			return total, fmt.Errorf("madvise %#x-%#x: %w", m.start, m.end, errno)
		}
		total += int(m.end - m.start)
	}
	return total, nil
}

type mapping struct {
	start, end        uintptr
	writable, private bool
	dev, inode        uint64
	path              string
}

// parseMapping reads one line of /proc/PID/maps:
//
//	00400000-00c2e000 r-xp 00000000 fd:01 1234    /usr/local/bin/steppe
func parseMapping(line []byte) (mapping, bool) {
	f := bytes.Fields(line)
	if len(f) < 5 || len(f[1]) != 4 {
		return mapping{}, false
	}
	lo, hi, ok := bytes.Cut(f[0], []byte("-"))
	if !ok {
		return mapping{}, false
	}
	start, err1 := strconv.ParseUint(string(lo), 16, 64)
	end, err2 := strconv.ParseUint(string(hi), 16, 64)
	major, minor, ok := bytes.Cut(f[3], []byte(":"))
	if !ok {
		return mapping{}, false
	}
	maj, err3 := strconv.ParseUint(string(major), 16, 32)
	mnr, err4 := strconv.ParseUint(string(minor), 16, 32)
	inode, err5 := strconv.ParseUint(string(f[4]), 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil || err5 != nil || end <= start {
		return mapping{}, false
	}
	return mapping{
		start:    uintptr(start),
		end:      uintptr(end),
		writable: f[1][1] == 'w',
		private:  f[1][3] == 'p',
		dev:      unix.Mkdev(uint32(maj), uint32(mnr)),
		inode:    inode,
		path:     string(bytes.Join(f[5:], []byte(" "))),
	}, true
}
