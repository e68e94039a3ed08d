package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/testenv"
)

// The test services ship in the bundle: a shell script that copies its
// config file to an output file at start and on SIGHUP, one line per load,
// so that a test can tell a reload (a line more, same pid) from a restart
// (new pid).
const svcScript = `#!/bin/sh
conf="$1"; out="$2"
load() { cat "$conf" >> "$out"; echo >> "$out"; }
trap load HUP
load
while :; do sleep 1 & wait $!; done
`

// pullEnv is a bundle server on loopback, a signing key, and an agent that
// pulls from it.
type pullEnv struct {
	t       *testing.T
	key     bundle.PrivateKey
	pubFile string
	store   string // the store's directory
	addr    string
	srv     *http.Server
	out     string // where the test services write
	agent   *testAgent
	version uint64
}

func newPullEnv(t *testing.T) *pullEnv {
	t.Helper()
	e := &pullEnv{t: t, store: t.TempDir(), out: t.TempDir()}
	key, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	e.key = key
	_, e.pubFile, err = bundle.WriteKeyPair(filepath.Join(t.TempDir(), "bundle"), key)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	e.serve(ln)
	t.Cleanup(func() { e.srv.Close() })

	e.agent = newTestAgent(t, "")
	e.agent.writeConfig(fmt.Sprintf(`
machine {
  name    = "m1"
  address = "127.0.0.1"
}
bundle {
  store          = "http://%s"
  cluster        = "c1"
  role           = "web"
  keys           = [%q]
  wait           = "2s"
  health_timeout = "4s"
}
`, e.addr, e.pubFile))
	return e
}

func (e *pullEnv) serve(ln net.Listener) {
	e.srv = &http.Server{Handler: bundle.NewServer(e.store, bundle.ServerOptions{}).Handler()}
	go e.srv.Serve(ln)
}

// release describes a bundle for the test services.
type release struct {
	a, b      string // contents of conf/a.txt.tmpl and conf/b.txt
	extra     map[string]string
	bService  string // replaces service b's definition when set
	version   uint64 // 0: the next one
	expires   time.Duration
	artifacts []bundle.Artifact
}

func (e *pullEnv) services(r release) string {
	s := fmt.Sprintf(`
service "a" {
  command   = "bin/svc.sh"
  args      = ["conf/a.txt", "%[1]s/a.out"]
  files     = ["conf/a.txt"]
  on_change = "restart"
  ready {
    command = ["/bin/test", "-s", "%[1]s/a.out"]
  }
}
`, e.out)
	if r.bService != "" {
		return s + r.bService
	}
	return s + fmt.Sprintf(`
service "b" {
  command   = "bin/svc.sh"
  args      = ["${release}/conf/b.txt", "%[1]s/b.out"]
  files     = ["conf/b.txt"]
  on_change = "reload"
  after     = ["a"]
  ready {
    command = ["/bin/test", "-s", "%[1]s/b.out"]
  }
}
`, e.out)
}

// build packs and signs a bundle (with key; nil: unsigned).
func (e *pullEnv) build(r release, key *bundle.PrivateKey) ([]byte, uint64) {
	e.t.Helper()
	dir := e.t.TempDir()
	files := map[string]string{
		"bin/svc.sh":          svcScript,
		"conf/a.txt.tmpl":     r.a,
		"conf/b.txt":          r.b,
		"services/steppe.hcl": e.services(r),
	}
	for k, v := range r.extra {
		files[k] = v
	}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			e.t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if strings.HasPrefix(name, "bin/") {
			mode = 0o755
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			e.t.Fatal(err)
		}
	}
	v := r.version
	if v == 0 {
		e.version++
		v = e.version
	}
	expires := r.expires
	if expires == 0 {
		expires = time.Hour
	}
	now := time.Now()
	var buf bytes.Buffer
	_, err := bundle.Build(&buf, dir, bundle.Manifest{
		Cluster: "c1", Role: "web", Version: v,
		Created: now.Add(-2 * time.Hour), Expires: now.Add(expires),
		Variables: map[string]string{"greeting": "hello"},
		Artifacts: r.artifacts,
	}, key)
	if err != nil {
		e.t.Fatal(err)
	}
	return buf.Bytes(), v
}

// publish builds, signs and publishes r as the next version.
func (e *pullEnv) publish(r release) uint64 {
	e.t.Helper()
	b, v := e.build(r, &e.key)
	if _, err := bundle.NewDirStore(e.store).Publish(context.Background(), bytes.NewReader(b), bundle.PublishOptions{}); err != nil {
		e.t.Fatal(err)
	}
	return v
}

// plant puts bytes in the store as the latest bundle, as an attacker who
// controls the store (or a broken disk) would: no check at all.
func (e *pullEnv) plant(b []byte) {
	e.t.Helper()
	dir := filepath.Join(e.store, "c1", "web")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		e.t.Fatal(err)
	}
	tmp := filepath.Join(dir, ".plant")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "latest.tar.gz")); err != nil {
		e.t.Fatal(err)
	}
}

func (e *pullEnv) waitVersion(v uint64, timeout time.Duration) agent.StatusReport {
	e.t.Helper()
	return e.agent.waitFor(fmt.Sprintf("release %d running", v), timeout, func(st agent.StatusReport) bool {
		return st.Bundle != nil && st.Bundle.Version == v && st.Bundle.Pending == 0 && allRunning(2)(st)
	})
}

func (e *pullEnv) loads(name string) []string {
	b, _ := os.ReadFile(filepath.Join(e.out, name+".out"))
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

var baseRelease = release{a: "a1 {{ .Machine.Name }} {{ .Vars.greeting }}", b: "b1"}

// The happy path, then releases that change one file each: only the
// service that reads it reloads (b) or restarts (a).
func TestPullAppliesOnlyWhatChanged(t *testing.T) {
	e := newPullEnv(t)
	v1 := e.publish(baseRelease)
	e.agent.start()
	st := e.waitVersion(v1, 60*time.Second)
	before := byName(st)
	if got := e.loads("a"); len(got) != 1 || got[0] != "a1 m1 hello" {
		t.Fatalf("a rendered %q, want the template with machine facts and bundle variables", got)
	}

	// Only b's file changes: b reloads (same pid, one more load), a stays.
	r := baseRelease
	r.b = "b2"
	v2 := e.publish(r)
	st = e.waitVersion(v2, 30*time.Second)
	now := byName(st)
	if now["a"].PID != before["a"].PID || now["b"].PID != before["b"].PID {
		t.Errorf("pids a %d->%d b %d->%d: a change to b's file must restart nothing", before["a"].PID, now["a"].PID, before["b"].PID, now["b"].PID)
	}
	waitUntil(t, "b to reload", 10*time.Second, func() bool { l := e.loads("b"); return len(l) == 2 && l[1] == "b2" })
	if l := e.loads("a"); len(l) != 1 {
		t.Errorf("a loaded %d times, want 1: %q", len(l), l)
	}

	// Only a's file changes: a restarts, b neither restarts nor reloads.
	r.a = "a3 {{ .Machine.Address }}"
	v3 := e.publish(r)
	st = e.waitVersion(v3, 30*time.Second)
	after := byName(st)
	if after["a"].PID == now["a"].PID {
		t.Error("a kept its pid although its file changed")
	}
	if after["b"].PID != now["b"].PID || len(e.loads("b")) != 2 {
		t.Errorf("b was restarted or reloaded by a change to a's file: pid %d->%d, loads %q", now["b"].PID, after["b"].PID, e.loads("b"))
	}
	// The restarted a writes its load after it starts: wait for it.
	waitUntil(t, "a to load a3", 10*time.Second, func() bool { l := e.loads("a"); return l[len(l)-1] == "a3 127.0.0.1" })
	// The releases dir keeps the last few, and current points at v3.
	cur, _, err := bundle.Current(filepath.Join(e.agent.dir, "state", "releases"))
	if err != nil || cur != v3 {
		t.Errorf("current release %d (%v), want %d", cur, err, v3)
	}
	e.agent.stop()
}

func waitUntil(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Every bad input leaves the machine on its last good release, with an
// error that says what was wrong.
func TestPullRefusesBadInput(t *testing.T) {
	e := newPullEnv(t)
	v1 := e.publish(baseRelease)
	e.agent.start()
	good := byName(e.waitVersion(v1, 60*time.Second))
	goodBytes, _ := e.build(baseRelease, &e.key) // a validly signed copy, version 2
	e.version--                                  // not published: reuse the number

	otherKey, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		bundle func() []byte
		want   string
	}{
		{"unsigned", func() []byte { b, _ := e.build(baseRelease, nil); return b }, "not signed"},
		{"wrong key", func() []byte { b, _ := e.build(baseRelease, &otherKey); return b }, "trusted"},
		{"tampered file", func() []byte { b, _ := e.build(baseRelease, &e.key); return tamper(t, b, "conf/b.txt") }, "conf/b.txt"},
		{"replayed older version", func() []byte { b, _ := e.build(release{a: "old", b: "old", version: v1}, &e.key); return b }, "not greater"},
		{"expired", func() []byte { b, _ := e.build(release{a: "x", b: "y", expires: -time.Minute}, &e.key); return b }, "expired"},
		{"truncated download", func() []byte { return goodBytes[:len(goodBytes)/2] }, "unexpected EOF"},
		{"path traversal", func() []byte {
			return craftBundle(t, e.key, []tarEntry{{name: "conf/x", body: "x"}, {name: "../escape", body: "x"}})
		}, "../escape"},
		{"symlink escape", func() []byte {
			return craftBundle(t, e.key, []tarEntry{{name: "conf/x", body: "x"}, {name: "conf/l", link: "/etc"}})
		}, "conf/l"},
		{"decompression bomb", func() []byte {
			return craftBundle(t, e.key, []tarEntry{{name: "big", size: 300 << 20}})
		}, "big"},
		{"template error", func() []byte {
			b, _ := e.build(release{a: "{{ .Vars.nope }}", b: "b1"}, &e.key)
			return b
		}, "conf/a.txt.tmpl:1"},
		{"artifact hash mismatch", func() []byte {
			b, _ := e.build(release{a: "a", b: "b", artifacts: []bundle.Artifact{{
				Product: "tool", Version: "1.0.0", URL: "http://" + e.addr + "/v1/bundles/c1/web",
				SHA256: strings.Repeat("0", 64),
			}}}, &e.key)
			return b
		}, "want " + strings.Repeat("0", 64)},
		{"service fails its health gate", func() []byte {
			b, _ := e.build(release{a: "a", b: "b", bService: `
service "b" {
  command = "/bin/sh"
  args    = ["-c", "exit 3"]
  ready {
    command = ["/bin/false"]
  }
}
`}, &e.key)
			return b
		}, "health gate"},
	}
	// One agent goes through every case in turn (no subtests: the agent's
	// helpers report on the parent test).
	for _, tc := range cases {
		b := tc.bundle()
		e.plant(b)
		st := e.agent.waitFor(tc.name+": the bundle to be refused", 30*time.Second, func(st agent.StatusReport) bool {
			return st.Bundle != nil && (strings.Contains(st.Bundle.LastError, tc.want) || strings.Contains(st.Bundle.FailedError, tc.want))
		})
		if st.Bundle.Version != v1 {
			t.Errorf("%s: running release %d, want the last good %d", tc.name, st.Bundle.Version, v1)
		}
		st = e.agent.waitFor(tc.name+": the good release running", 30*time.Second, allRunning(2))
		now := byName(st)
		if tc.name != "service fails its health gate" {
			for _, n := range []string{"a", "b"} {
				if now[n].PID != good[n].PID {
					t.Errorf("%s: %s restarted: pid %d -> %d", tc.name, n, good[n].PID, now[n].PID)
				}
			}
		}
		t.Logf("%s: refused: %s%s", tc.name, st.Bundle.LastError, st.Bundle.FailedError)
	}
	out, err := e.agent.steppe("agent", "status")
	if err != nil || !strings.Contains(out, "bundle c1/web") || !strings.Contains(out, "release 1") || !strings.Contains(out, "failed and was rolled back: health gate") {
		t.Errorf("steppe agent status does not show the release and the rollback: %v\n%s", err, out)
	}
	// A good release after all that still goes through.
	e.version = 100
	v := e.publish(release{a: "fine", b: "fine"})
	e.waitVersion(v, 30*time.Second)
	e.agent.stop()
}

// tarEntry is one entry of a crafted bundle: a regular file (body, or size
// zero bytes) or a symlink (link).
type tarEntry struct {
	name, body, link string
	size             int64
}

// craftBundle signs a manifest that lists the regular entries with their
// true hashes, and packs the entries as given, however hostile: as a
// compromised build host could.
func craftBundle(t *testing.T, key bundle.PrivateKey, entries []tarEntry) []byte {
	t.Helper()
	now := time.Now()
	m := bundle.Manifest{Format: bundle.FormatVersion, Cluster: "c1", Role: "web", Version: 50,
		Created: now.Add(-time.Hour), Expires: now.Add(time.Hour)}
	content := func(e tarEntry) io.Reader {
		if e.size > 0 {
			return io.LimitReader(zeros{}, e.size)
		}
		return strings.NewReader(e.body)
	}
	for _, e := range entries {
		if e.link != "" || strings.HasPrefix(e.name, "../") {
			continue
		}
		h := sha256.New()
		n, _ := io.Copy(h, content(e))
		m.Files = append(m.Files, bundle.File{Path: e.name, Size: n, Mode: 0o644, SHA256: hex.EncodeToString(h.Sum(nil))})
	}
	raw, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	tw := tar.NewWriter(zw)
	write := func(h *tar.Header, r io.Reader) {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if r != nil {
			if _, err := io.Copy(tw, r); err != nil {
				t.Fatal(err)
			}
		}
	}
	sig := bundle.Sign(key, raw)
	write(&tar.Header{Name: bundle.ManifestName, Mode: 0o644, Size: int64(len(raw)), Typeflag: tar.TypeReg}, bytes.NewReader(raw))
	write(&tar.Header{Name: bundle.SignatureName, Mode: 0o644, Size: int64(len(sig)), Typeflag: tar.TypeReg}, bytes.NewReader(sig))
	for _, e := range entries {
		if e.link != "" {
			write(&tar.Header{Name: e.name, Linkname: e.link, Typeflag: tar.TypeSymlink, Mode: 0o777}, nil)
			continue
		}
		size := e.size
		if size == 0 {
			size = int64(len(e.body))
		}
		write(&tar.Header{Name: e.name, Mode: 0o644, Size: size, Typeflag: tar.TypeReg}, content(e))
	}
	tw.Close()
	zw.Close()
	return out.Bytes()
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// tamper changes one byte of a file inside a bundle, keeping its manifest
// and signature.
func tamper(t *testing.T, b []byte, name string) []byte {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	tw := tar.NewWriter(zw)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == name && len(body) > 0 {
			body[0] ^= 0x20
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(body)
	}
	tw.Close()
	zw.Close()
	return out.Bytes()
}

// SIGKILL the agent at random points while it applies new releases, 50
// times: after each restart the machine runs the old release or the new
// one, every service from the same one, never two copies of a service.
func TestPullKilledDuringApply(t *testing.T) {
	e := newPullEnv(t)
	v := e.publish(baseRelease)
	e.agent.start()
	e.waitVersion(v, 60*time.Second)
	releasesDir := filepath.Join(e.agent.dir, "state", "releases")

	rounds := 50
	for i := range rounds {
		prev := v
		r := release{a: fmt.Sprintf("a-%d", i), b: fmt.Sprintf("b-%d", i)}
		v = e.publish(r)
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		e.agent.kill()
		e.agent.start()
		st := e.agent.waitFor("a release running", 60*time.Second, func(st agent.StatusReport) bool {
			return st.Bundle != nil && st.Bundle.Pending == 0 && (st.Bundle.Version == v || st.Bundle.Version == prev) && allRunning(2)(st)
		})
		running := st.Bundle.Version
		// a restarts on change: its environment names the digest of the
		// release it runs. b reloads: its last load is that release's file.
		wantA := digestOf(t, releasesDir, running, "a")
		if got := environ(t, byName(st)["a"].PID, "STEPPE_CONFIG_DIGEST"); got != wantA {
			t.Fatalf("round %d: a runs digest %q, release %d has %q (prev %d, new %d)", i, got, running, wantA, prev, v)
		}
		wantB := string(mustRead(t, filepath.Join(releasesDir, fmt.Sprint(running), "conf/b.txt")))
		waitUntil(t, "b to have loaded its release's file", 10*time.Second, func() bool {
			l := e.loads("b")
			return len(l) > 0 && l[len(l)-1] == wantB
		})
		// Exactly one copy of each service: one process tree in its cgroup
		// (the script's sleeps and subshells are its children).
		for _, s := range st.Services {
			if n := processTrees(t, s.Cgroup); n != 1 {
				t.Fatalf("round %d: %s runs %d process trees", i, s.Name, n)
			}
		}
		if running == prev {
			// The newer release must still arrive: it was not refused.
			e.waitVersion(v, 60*time.Second)
		}
	}
	log := e.agent.log()
	t.Logf("%d rounds: %d applies finished after a kill cut them short, %d services adopted across the restarts",
		rounds, strings.Count(log, "finishing the apply a restart cut short"), strings.Count(log, "adopted running service"))
	e.agent.stop()
}

// processTrees counts the processes of a cgroup whose parent is outside
// it: each copy of a service started is one tree.
func processTrees(t testing.TB, cgroup string) int {
	t.Helper()
	pids := strings.Fields(string(mustRead(t, filepath.Join(cgroup, "cgroup.procs"))))
	in := map[string]bool{}
	for _, p := range pids {
		in[p] = true
	}
	n := 0
	for _, pid := range pids {
		stat, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// The parent pid is the second field after the command in parens.
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(f) > 1 && !in[f[1]] {
			n++
		}
	}
	return n
}

func mustRead(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// digestOf reads the digest the agent computed for a service of a release.
func digestOf(t testing.TB, releasesDir string, version uint64, service string) string {
	t.Helper()
	b := mustRead(t, filepath.Join(filepath.Dir(releasesDir), "bundle", fmt.Sprintf("plan-%d.json", version)))
	i := bytes.Index(b, []byte(`"`+service+`": "`))
	if i < 0 {
		t.Fatalf("no digest of %s in plan %d", service, version)
	}
	rest := b[i+len(service)+5:]
	return string(rest[:bytes.IndexByte(rest, '"')])
}

func environ(t testing.TB, pid int, key string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte(key+"=")); ok {
			return string(v)
		}
	}
	return ""
}

// The store goes away: the machine keeps running, status says why, and a
// release published meanwhile arrives when the store returns.
func TestPullStoreGoesAway(t *testing.T) {
	e := newPullEnv(t)
	v1 := e.publish(baseRelease)
	e.agent.start()
	before := byName(e.waitVersion(v1, 60*time.Second))

	e.srv.Close()
	st := e.agent.waitFor("the pull error to show", 30*time.Second, func(st agent.StatusReport) bool {
		return st.Bundle != nil && st.Bundle.LastError != ""
	})
	t.Logf("while the store is away: %s", st.Bundle.LastError)
	v2 := e.publish(release{a: "a2", b: "b2"})
	time.Sleep(time.Second)
	now := byName(e.agent.waitFor("services still running", 10*time.Second, allRunning(2)))
	for _, n := range []string{"a", "b"} {
		if now[n].PID != before[n].PID {
			t.Errorf("%s restarted while the store was away", n)
		}
	}
	// An agent restart while the store is away runs the last good release.
	e.agent.kill()
	e.agent.start()
	st = e.agent.waitFor("last good release after restart", 30*time.Second, func(st agent.StatusReport) bool {
		return st.Bundle != nil && st.Bundle.Version == v1 && allRunning(2)(st)
	})
	if byName(st)["a"].PID != before["a"].PID {
		t.Error("a restarted by an agent restart")
	}

	ln, err := net.Listen("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	e.serve(ln)
	e.waitVersion(v2, 60*time.Second)
	e.agent.stop()
}

// A release that runs a real Consul, fetched by the agent from a
// release-style store (index, SHA256SUMS, detached signature checked
// against the pinned key, archive digest) and gated on its HTTP API
// (a dev agent sends no READY=1); then a release whose store's SHA256SUMS does not
// match its signature is refused and the running Consul stays.
func TestPullRealArtifact(t *testing.T) {
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	storeDir := artifact.DefaultStoreDir(cache)
	if _, err := artifact.BinaryPath(cache, "consul", "1.14.11"); err != nil {
		testenv.Lacks(t, "consul 1.14.11 is not built; run make artifacts: %v", err)
	}
	good := httptest.NewServer(artifact.StoreHandler(storeDir))
	defer good.Close()
	// The same store, with one byte of every SHA256SUMS changed in flight.
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "_SHA256SUMS") {
			artifact.StoreHandler(storeDir).ServeHTTP(w, r)
			return
		}
		b, err := os.ReadFile(filepath.Join(storeDir, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		b[0] ^= 1
		w.Write(b)
	}))
	defer bad.Close()

	e := newPullEnv(t)
	cfg, err := os.ReadFile(e.agent.config)
	if err != nil {
		t.Fatal(err)
	}
	// The agent block is written again by writeConfig; Consul takes longer
	// than the test services to be ready.
	rest := strings.SplitN(string(cfg), "}\n", 2)[1]
	rest = strings.Replace(rest, `health_timeout = "4s"`, `health_timeout = "90s"`, 1)
	e.agent.writeConfig(rest + fmt.Sprintf("artifacts {\n  keys = [%q]\n}\n", filepath.Join(storeDir, artifact.StoreKeyFile)))

	consul := func(store string) release {
		return release{a: "a", b: "b", artifacts: []bundle.Artifact{{Product: "consul", Version: "1.14.11", Store: store}},
			bService: `
service "b" {
  command = artifact.consul
  args    = ["agent", "-dev", "-bind", "127.0.0.51", "-client", "127.0.0.51", "-disable-host-node-id", "-log-level", "warn"]
  ready {
    http    = "http://127.0.0.51:8500/v1/status/leader"
    timeout = "60s"
  }
}
`}
	}
	v1 := e.publish(consul(good.URL))
	e.agent.start()
	st := e.agent.waitFor("consul running", 120*time.Second, func(st agent.StatusReport) bool {
		return st.Bundle != nil && st.Bundle.Version == v1 && allRunning(2)(st)
	})
	pid := byName(st)["b"].PID
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil || !strings.HasPrefix(exe, filepath.Join(e.agent.dir, "state", "artifacts")) {
		t.Fatalf("consul runs %q (%v), not the binary the agent fetched into its state dir", exe, err)
	}
	resp, err := http.Get("http://127.0.0.51:8500/v1/status/leader")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	v2 := e.publish(consul(bad.URL))
	st = e.agent.waitFor("the tampered store to be refused", 60*time.Second, func(st agent.StatusReport) bool {
		return st.Bundle != nil && strings.Contains(st.Bundle.LastError, fmt.Sprintf("release %d", v2)) && strings.Contains(st.Bundle.LastError, "signature")
	})
	t.Logf("refused: %s", st.Bundle.LastError)
	if s := byName(st)["b"]; st.Bundle.Version != v1 || s.PID != pid || s.State != "running" {
		t.Errorf("after the refusal: release %d, consul %+v; want release %d and pid %d running", st.Bundle.Version, s, v1, pid)
	}
	e.agent.stop()
}
