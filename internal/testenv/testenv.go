// Package testenv decides what a test does when the machine lacks what it
// needs: on a developer's machine it skips and says why; in CI (CI set),
// where .ci/run installs everything, it fails.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// InCI reports whether the tests run in CI, which sets CI.
func InCI() bool { return os.Getenv("CI") != "" }

// Lacks ends the test because the machine lacks something: a skip with
// the reason outside CI, a failure in CI.
func Lacks(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("%s (CI must provide it: see .ci/run)", msg)
	}
	t.Skip(msg)
}

// NeedRoot ends the test unless it runs as root; why says what needs it.
func NeedRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Lacks(t, "%s needs root; run the tests as root (CI does)", why)
	}
}

// Strace runs this test binary again under strace, following forks and
// tracing only syscalls (a comma list), with env added to the environment
// and args as its test flags, and returns the trace's lines. Descriptors
// are printed with their paths (-y). Tests use it to see what really
// reaches the kernel: an fsync before a rename, for one.
func Strace(t testing.TB, syscalls string, env []string, args ...string) []string {
	t.Helper()
	strace, err := exec.LookPath("strace")
	if err != nil {
		Lacks(t, "strace not installed (apt-get install strace): %v", err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	trace := filepath.Join(t.TempDir(), "trace")
	cmd := exec.Command(strace, append([]string{"-f", "-qq", "-y", "-s", "256", "-e", "trace=" + syscalls, "-o", trace, exe}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s under strace: %v\n%s", filepath.Base(exe), err, out)
	}
	data, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(string(data), "\n")
}
