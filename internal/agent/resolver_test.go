package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/testenv"
)

// coreDNS runs the real CoreDNS (from the artifact cache) serving zone on
// addr:53 with whoami, which answers every name NOERROR.
type coreDNS struct {
	t    *testing.T
	bin  string
	addr string
	cmd  *exec.Cmd
}

func newCoreDNS(t *testing.T, addr string) *coreDNS {
	t.Helper()
	testenv.NeedRoot(t, "CoreDNS on port 53")
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := artifact.BinaryPath(cache, "coredns", "1.12.4")
	if err != nil {
		testenv.Lacks(t, "CoreDNS 1.12.4 is not built (steppe artifact build coredns@1.12.4): %v", err)
	}
	c := &coreDNS{t: t, bin: bin, addr: addr}
	t.Cleanup(c.kill)
	return c
}

func (c *coreDNS) start(zone string) {
	c.t.Helper()
	conf := filepath.Join(c.t.TempDir(), "Corefile")
	if err := os.WriteFile(conf, []byte(zone+":53 {\n  bind "+c.addr+"\n  whoami\n}\n"), 0o644); err != nil {
		c.t.Fatal(err)
	}
	c.cmd = exec.Command(c.bin, "-conf="+conf)
	if err := c.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
}

func (c *coreDNS) kill() {
	if c.cmd != nil {
		_ = c.cmd.Process.Kill()
		_ = c.cmd.Wait()
		c.cmd = nil
	}
}

func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// TestResolverSwitch: resolv.conf is switched to the local resolver only
// once it answers a consul. query (not while it is absent or refuses
// consul.), switched back fallback_after after it dies (not before), and
// switched again when it answers again; an agent started again on a
// switched resolv.conf knows the one before, and puts it back when it stops.
func TestResolverSwitch(t *testing.T) {
	const addr = "127.53.0.2"
	dns := newCoreDNS(t, addr)
	dir := t.TempDir()
	conf, state := filepath.Join(dir, "resolv.conf"), filepath.Join(dir, "state")
	before := []byte("# the machine's own\nnameserver 192.0.2.53\n")
	if err := os.WriteFile(conf, before, 0o644); err != nil {
		t.Fatal(err)
	}
	read := func() []byte { b, _ := os.ReadFile(conf); return b }
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	const fallback = 2 * time.Second
	cfg := Resolver{ResolvConf: conf, Address: addr, FallbackAfter: fallback}
	r := newResolver(cfg, state, log)
	if err := r.start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.run(ctx)

	// Nothing answers, then a resolver without consul.: no switch.
	time.Sleep(1500 * time.Millisecond)
	dns.start("example.")
	time.Sleep(1500 * time.Millisecond)
	if st := r.status(); st.State != ResolverWaiting || !bytes.Equal(read(), before) || !strings.Contains(st.LastError, "Refused") {
		t.Fatalf("switched before a consul. answer: %+v\n%s", st, read())
	}

	dns.kill()
	dns.start("consul.")
	waitFor(t, "resolv.conf switched to "+addr, 10*time.Second, func() bool { return r.status().State == ResolverSwitched })
	if got := read(); !bytes.HasSuffix(got, []byte("\nnameserver "+addr+"\n")) || bytes.Count(got, []byte("nameserver")) != 1 {
		t.Fatalf("switched resolv.conf:\n%s", got)
	}
	if kept, _ := os.ReadFile(filepath.Join(state, filepath.FromSlash(previousResolvConf))); !bytes.Equal(kept, before) {
		t.Fatalf("previous resolv.conf kept as %q", kept)
	}

	dns.kill()
	took := waitFor(t, "resolv.conf switched back", fallback+5*time.Second, func() bool { return r.status().State == ResolverFallback })
	if took < fallback-r.interval {
		t.Fatalf("switched back %v after the resolver died, before fallback_after %v", took, fallback)
	}
	if !bytes.Equal(read(), before) {
		t.Fatalf("resolv.conf after the fallback:\n%s", read())
	}
	t.Logf("switched back %v after CoreDNS was killed (fallback_after %v)", took.Round(time.Millisecond), fallback)

	dns.start("consul.")
	waitFor(t, "resolv.conf switched again", 10*time.Second, func() bool { return r.status().State == ResolverSwitched })
	if st := r.status(); st.Switches != 3 || st.LastError != "" || st.LastAnswer.IsZero() || !bytes.HasSuffix(read(), []byte("nameserver "+addr+"\n")) {
		t.Fatalf("after the resolver came back: %+v\n%s", st, read())
	}

	// An agent started again finds resolv.conf switched, and its stop
	// puts back the one from before the first switch.
	cancel()
	r.stop()
	if !bytes.Equal(read(), before) {
		t.Fatalf("resolv.conf after the agent stopped:\n%s", read())
	}
	if err := r.show(r.ours()); err != nil {
		t.Fatal(err)
	}
	r2 := newResolver(cfg, state, log)
	if err := r2.start(); err != nil || r2.status().State != ResolverSwitched || !bytes.Equal(r2.previous, before) {
		t.Fatalf("restarted on a switched resolv.conf: %v %+v previous %q", err, r2.status(), r2.previous)
	}
}

// TestResolverMountRefusedOnHost: a resolver block with mount, in the
// host's mount namespace (here: the test's own stands for it, as PID 1's
// may not be readable), changes neither file.
func TestResolverMountRefusedOnHost(t *testing.T) {
	dir := t.TempDir()
	conf, target := filepath.Join(dir, "resolv.conf"), filepath.Join(dir, "target")
	for _, p := range []string{conf, target} {
		if err := os.WriteFile(p, []byte("nameserver 192.0.2.53\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := newResolver(Resolver{ResolvConf: conf, Mount: target, Address: "127.53.0.3"}, dir, slog.New(slog.NewTextHandler(t.Output(), nil)))
	r.hostMountNS = "/proc/self/ns/mnt"
	if err := r.show(r.ours()); err == nil || !strings.Contains(err.Error(), "host's mount namespace") {
		t.Fatalf("mount in the host's namespace: %v", err)
	}
	if b, _ := os.ReadFile(conf); string(b) != "nameserver 192.0.2.53\n" {
		t.Fatalf("resolv.conf written anyway: %q", b)
	}
}

func TestResolverConfig(t *testing.T) {
	dir := t.TempDir()
	good := `resolver {
  resolv_conf    = "/m/etc/resolv.conf"
  mount          = "/etc/resolv.conf"
  address        = "10.213.0.5"
  fallback_after = "3s"
}
`
	cfg, err := ParseConfig(filepath.Join(dir, "agent.hcl"), []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if want := (Resolver{ResolvConf: "/m/etc/resolv.conf", Mount: "/etc/resolv.conf", Address: "10.213.0.5", FallbackAfter: 3 * time.Second}); cfg.Resolver == nil || *cfg.Resolver != want {
		t.Fatalf("resolver %+v", cfg.Resolver)
	}
	cfg, err = ParseConfig("agent.hcl", []byte("resolver {\n  resolv_conf = \"/r\"\n  address = \"127.0.0.53\"\n}\n"))
	if err != nil || cfg.Resolver.FallbackAfter != DefaultResolverFallback {
		t.Fatalf("default fallback_after: %v %+v", err, cfg.Resolver)
	}
	for bad, want := range map[string]string{
		`resolv_conf = "etc/resolv.conf"` + "\n  address = \"10.0.0.1\"":               "want an absolute path",
		`resolv_conf = "/r"` + "\n  address = \"resolver.local\"":                      "port 53",
		`resolv_conf = "/r"` + "\n  address = \"10.0.0.1\"\n  fallback_after = \"0s\"": "more than 0",
		`resolv_conf = "/r"` + "\n  address = \"10.0.0.1\"\n  mount = \"resolv.conf\"": "absolute path where the machine sees",
		`address = "10.0.0.1"`: "resolv_conf",
	} {
		_, err := ParseConfig("agent.hcl", []byte("resolver {\n  "+bad+"\n}\n"))
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "agent.hcl:") {
			t.Errorf("%s: %v, want %q", bad, err, want)
		}
	}
}

// TestResolverMountCovered runs itself again in a private mount namespace
// (unshare), where a file is bind-mounted over another as the netns
// trampoline mounts a machine's resolv.conf: each switch shows the new
// content through the mount, a reader there never sees a part of a file,
// the mounted inode stays the file's, no mount is left stacked, and a
// cover left by a crash is finished at start.
func TestResolverMountCovered(t *testing.T) {
	if os.Getenv("STEPPE_TEST_MOUNT_NS") == "" {
		testenv.NeedRoot(t, "mount namespaces")
		unshare, err := exec.LookPath("unshare")
		if err != nil {
			testenv.Lacks(t, "unshare (util-linux) is not installed")
		}
		cmd := exec.Command(unshare, "--mount", "--propagation", "private", os.Args[0], "-test.run", "^TestResolverMountCovered$", "-test.v")
		cmd.Env = append(os.Environ(), "STEPPE_TEST_MOUNT_NS=1")
		out, err := cmd.CombinedOutput()
		t.Logf("in a private mount namespace:\n%s", out)
		if err != nil || !strings.Contains(string(out), "--- PASS: TestResolverMountCovered") {
			t.Fatalf("inside: %v", err)
		}
		return
	}
	dir := t.TempDir()
	file, seen := filepath.Join(dir, "resolv.conf"), filepath.Join(dir, "seen")
	first := []byte("# the machine's own\n")
	for _, p := range []string{file, seen} {
		if err := os.WriteFile(p, first, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mount(file, seen, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(seen, syscall.MNT_DETACH)
	var before syscall.Stat_t
	_ = syscall.Stat(file, &before)
	r := newResolver(Resolver{ResolvConf: file, Mount: seen, Address: "10.213.0.5"}, filepath.Join(dir, "state"), slog.New(slog.NewTextHandler(t.Output(), nil)))
	r.hostMountNS = "/nonexistent" // this namespace is the machine's

	ours := r.ours()
	stop := make(chan struct{})
	bad := make(chan string, 1)
	go func() {
		for {
			select {
			case <-stop:
				close(bad)
				return
			default:
			}
			if b, err := os.ReadFile(seen); err != nil || (!bytes.Equal(b, first) && !bytes.Equal(b, ours)) {
				bad <- fmt.Sprintf("%q %v", b, err)
				close(bad)
				return
			}
		}
	}()
	for i := range 20 {
		want := ours
		if i%2 == 1 {
			want = first
		}
		if err := r.show(want); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(seen); !bytes.Equal(b, want) {
			t.Fatalf("switch %d: the machine sees %q", i, b)
		}
	}
	close(stop)
	if b, ok := <-bad; ok {
		t.Fatalf("a reader saw %s", b)
	}
	var after syscall.Stat_t
	_ = syscall.Stat(file, &after)
	if top, _ := topMountRoot(seen); after.Ino != before.Ino || !strings.HasSuffix(top, "/resolv.conf") {
		t.Fatalf("inode %d -> %d, top mount %q", before.Ino, after.Ino, top)
	}
	if _, err := os.Stat(coverName(file)); !os.IsNotExist(err) {
		t.Fatalf("cover left: %v", err)
	}

	// A crash between the cover and its removal: start finishes it.
	if err := os.WriteFile(coverName(file), ours, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(coverName(file), seen, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte("# part"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.start(); err != nil || r.status().State != ResolverSwitched {
		t.Fatalf("start after a crash: %v %+v", err, r.status())
	}
	if b, _ := os.ReadFile(seen); !bytes.Equal(b, ours) {
		t.Fatalf("after recovery the machine sees %q", b)
	}
	if top, _ := topMountRoot(seen); !strings.HasSuffix(top, "/resolv.conf") {
		t.Fatalf("cover still mounted: %q", top)
	}
}
