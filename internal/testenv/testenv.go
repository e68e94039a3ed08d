// Package testenv decides what a test does when the machine lacks what it
// needs: on a developer's machine it skips and says why; in CI (CI set),
// where .ci/run installs everything, it fails.
package testenv

import (
	"fmt"
	"os"
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
