package progress

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/testenv"
)

// openPTY opens a pseudo-terminal pair: posix_openpt through /dev/ptmx,
// unlockpt (TIOCSPTLCK), ptsname (TIOCGPTN), and a 120-column window.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open /dev/ptmx: %v", err)
	}
	t.Cleanup(func() { master.Close() })
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetUint32(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("ptsname: %v", err)
	}
	slave, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open the pty's slave end: %v", err)
	}
	if err := unix.IoctlSetWinsize(int(slave.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 40, Col: 120}); err != nil {
		t.Fatalf("set the pty's window size: %v", err)
	}
	return master, slave
}

// buildSteppe builds the real steppe binary, as the e2e tests do.
func buildSteppe(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "steppe")
	cmd := exec.Command("go", "build", "-o", bin, "../../cmd/steppe")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build steppe: %v\n%s", err, out)
	}
	return bin
}

// cachedProduct is a product version the artifact cache holds, so that
// `steppe artifact build` of it does real work (archive, sums, signature
// into a new store) for a few seconds without compiling.
func cachedProduct(t *testing.T, steppe string) string {
	t.Helper()
	for _, ref := range []string{"consul@1.14.11", "consul@1.14.8", "coredns@1.12.4", "nomad@1.9.3", "nomad@1.10.5", "vault@1.21.0"} {
		if exec.Command(steppe, "artifact", "path", ref).Run() == nil {
			return ref
		}
	}
	testenv.Lacks(t, "no product is built in the artifact cache (make artifacts builds them)")
	return ""
}

// runOnPTY runs steppe with stdout and stderr on a pseudo-terminal and
// returns what the terminal received.
func runOnPTY(t *testing.T, env []string, args ...string) string {
	t.Helper()
	master, slave := openPTY(t)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	var got bytes.Buffer
	read := make(chan error, 1)
	go func() {
		_, err := io.Copy(&got, master)
		read <- err
	}()
	werr := cmd.Wait()
	select {
	case err := <-read:
		// The master reads EIO once the last slave descriptor closes.
		if err != nil && !errors.Is(err, unix.EIO) {
			t.Fatalf("read the pty: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the pty's output did not end after steppe exited")
	}
	if werr != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), werr, got.String())
	}
	// The terminal's line discipline turns each \n into \r\n.
	return got.String()
}

// TestPTY runs the real steppe binary on a pseudo-terminal and on a
// pipe: on the terminal the build's line is redrawn in place with its
// elapsed time and ends as a plain line; on the pipe the output is the
// plain lines, without an escape sequence.
func TestPTY(t *testing.T) {
	steppe := buildSteppe(t)
	ref := cachedProduct(t, steppe)
	name := strings.Replace(ref, "@", " ", 1)
	env := append(os.Environ(), "TERM=xterm", "STEPPE_PROGRESS=")

	start := time.Now()
	raw := runOnPTY(t, env, steppe, "artifact", "build", ref, "-out", t.TempDir())
	took := time.Since(start)
	t.Logf("on a terminal, %s took %s:\n%q", ref, took, raw)
	for _, seq := range []string{"\x1b[1A", "\r\x1b[J"} {
		if !strings.Contains(raw, seq) {
			t.Errorf("the terminal got no %q (cursor up, clear): no update in place", seq)
		}
	}
	live := regexp.MustCompile(`  ` + regexp.QuoteMeta(name) + ` +(\d+)s  publishing`)
	seen := map[string]bool{}
	for _, m := range live.FindAllStringSubmatch(raw, -1) {
		seen[m[1]] = true
	}
	if len(seen) == 0 {
		t.Errorf("no live line %q on the terminal", live)
	} else if took > 2500*time.Millisecond && len(seen) < 2 {
		t.Errorf("the live line showed elapsed %v only, in %s: it was not redrawn as time passed", seen, took)
	}
	lines := screen(t, raw)
	text := strings.Join(lines, "\n")
	t.Logf("the screen after it:\n%s", text)
	wantOrder := []string{
		"==> " + name + ": cached",
		"==> " + name + ": binary ",
		"==> " + name + ": published ",
		"  " + name,
		ref + " cached in ",
	}
	i := 0
	for _, l := range lines {
		if i < len(wantOrder) && strings.HasPrefix(l, wantOrder[i]) {
			i++
		}
	}
	if i < len(wantOrder) {
		t.Errorf("the screen lacks %q (in this order: %q)", wantOrder[i], wantOrder)
	}
	if !regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(name) + ` +\d+s  done$`).MatchString(text) {
		t.Errorf("the build's final line is not on the screen")
	}
	if strings.Contains(text, "publishing") {
		t.Errorf("a live line was left on the screen")
	}

	// The same on pipes: the plain lines of before, not one escape.
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(steppe, "artifact", "build", ref, "-out", t.TempDir())
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("on a pipe: %v\n%s", err, stderr.String())
	}
	if strings.Contains(stdout.String()+stderr.String(), "\x1b") {
		t.Errorf("escape sequences on a pipe:\n%q\n%q", stdout.String(), stderr.String())
	}
	plain := regexp.MustCompile(`^==> ` + regexp.QuoteMeta(name) + `: cached \(built [^)]+\)\n==> ` + regexp.QuoteMeta(name) + `: binary \S+\n==> ` +
		regexp.QuoteMeta(name) + `: published \S+ \(sha256 [0-9a-f]{64}\), signed by \S+\n$`)
	if !plain.MatchString(stderr.String()) {
		t.Errorf("progress on a pipe is not the plain lines of before:\n%s", stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), ref+" cached in ") {
		t.Errorf("stdout on a pipe: %q", stdout.String())
	}

	// STEPPE_PROGRESS=plain on a terminal: lines only.
	raw = runOnPTY(t, append(env, "STEPPE_PROGRESS=plain"), steppe, "artifact", "build", ref, "-out", t.TempDir())
	if strings.Contains(raw, "\x1b") {
		t.Errorf("STEPPE_PROGRESS=plain on a terminal wrote escape sequences:\n%q", raw)
	}
	// -progress=tty on a pipe: live lines where they were asked for.
	stderr.Reset()
	cmd = exec.Command(steppe, "artifact", "build", ref, "-out", t.TempDir(), "-progress=tty")
	cmd.Env = env
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("-progress=tty: %v\n%s", err, stderr.String())
	}
	if !live.MatchString(stderr.String()) {
		t.Errorf("-progress=tty on a pipe drew no live line:\n%q", stderr.String())
	}
}
