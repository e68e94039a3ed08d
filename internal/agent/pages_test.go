package agent

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseMapping(t *testing.T) {
	for _, tc := range []struct {
		line string
		want mapping
		ok   bool
	}{
		{"00400000-00bee000 r-xp 00000000 fd:01 1234    /usr/local/bin/steppe",
			mapping{start: 0x400000, end: 0xbee000, private: true, dev: unix.Mkdev(0xfd, 1), inode: 1234, path: "/usr/local/bin/steppe"}, true},
		{"013dd000-0147a000 rw-p 00fdd000 08:10 99 /bin/x (deleted)",
			mapping{start: 0x13dd000, end: 0x147a000, writable: true, private: true, dev: unix.Mkdev(8, 0x10), inode: 99, path: "/bin/x (deleted)"}, true},
		{"7f81c2432000-7f81c2458000 r--s 00000000 00:05 7 /dev/shm/y",
			mapping{start: 0x7f81c2432000, end: 0x7f81c2458000, dev: unix.Mkdev(0, 5), inode: 7, path: "/dev/shm/y"}, true},
		{"7ffec8081000-7ffec80a2000 rw-p 00000000 00:00 0                          [stack]",
			mapping{start: 0x7ffec8081000, end: 0x7ffec80a2000, writable: true, private: true, path: "[stack]"}, true},
		{"garbage", mapping{}, false},
		{"00400000-00300000 r-xp 00000000 fd:01 1234 /x", mapping{}, false},
		{"00400000-00bee000 r-xp 00000000 fd01 1234 /x", mapping{}, false},
	} {
		got, ok := parseMapping([]byte(tc.line))
		if ok != tc.ok || got != tc.want {
			t.Errorf("parseMapping(%q) = %+v, %v; want %+v, %v", tc.line, got, ok, tc.want, tc.ok)
		}
	}
}

// The test process releases its own code and read-only data: their resident
// size drops, the writable mappings keep every page, and the process goes
// on running.
func TestReleaseExecutablePages(t *testing.T) {
	populateExecutable(t)
	before := exeRSS(t)
	if before["r-xp"] == 0 || before["r--p"] == 0 {
		t.Fatalf("no resident code or read-only data in the test binary: %v", before)
	}
	n, err := releaseExecutablePages()
	if err != nil {
		t.Fatal(err)
	}
	after := exeRSS(t)
	t.Logf("advised %d KiB; resident KiB before %v, after %v", n>>10, before, after)
	if n == 0 {
		t.Fatal("no mapping of the executable was advised")
	}
	// What is resident again afterwards is what the test touched since
	// (reading smaps and the runtime's own work): far less than before.
	for _, perm := range []string{"r-xp", "r--p"} {
		if after[perm] >= before[perm]/2 {
			t.Errorf("%s mappings: %d KiB resident before, %d KiB after: not released", perm, before[perm], after[perm])
		}
	}
	if after["rw-p"] < before["rw-p"] {
		t.Errorf("writable mappings lost pages: %d KiB resident before, %d KiB after", before["rw-p"], after["rw-p"])
	}
}

// populateExecutable maps every page of the test binary's read-only
// mappings, so that what is released does not depend on what the test
// process happened to touch before (or released in an earlier run).
func populateExecutable(t *testing.T) {
	t.Helper()
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	for line := range bytes.Lines(maps) {
		m, ok := parseMapping(bytes.TrimSpace(line))
		if !ok || m.writable || m.path != exe {
			continue
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_POPULATE_READ); errno != 0 {
			t.Fatalf("madvise(MADV_POPULATE_READ) %#x-%#x: %v", m.start, m.end, errno)
		}
	}
}

// exeRSS sums the resident KiB of the test binary's mappings by permission.
func exeRSS(t *testing.T) map[string]int {
	t.Helper()
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	rss := map[string]int{}
	perm := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":"):
			perm = ""
			if len(f) == 6 && f[5] == exe {
				perm = f[1]
			}
		case len(f) >= 2 && f[0] == "Rss:" && perm != "":
			kb, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatal(fmt.Errorf("smaps: %q: %w", sc.Text(), err))
			}
			rss[perm] += kb
		}
	}
	return rss
}
