package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/testenv"
)

// testStore is a real bundle server (bundle.Server over a directory) on
// loopback, behind a handler that counts the bundles it sends and can cut
// the next bodies half way, as a dying proxy or a dropped connection does.
type testStore struct {
	t       *testing.T
	dir     string
	url     string
	key     bundle.PrivateKey
	pubFile string

	requests atomic.Int64 // GETs answered, whatever the status
	whole    atomic.Int64 // bundles sent whole
	cut      atomic.Int64 // bundles cut half way
	cutNext  atomic.Int64 // how many of the next bundles to cut
}

func newTestStore(t *testing.T) *testStore {
	t.Helper()
	s := &testStore{t: t, dir: t.TempDir()}
	var err error
	if s.key, err = bundle.GenerateKey(); err != nil {
		t.Fatal(err)
	}
	if _, s.pubFile, err = bundle.WriteKeyPair(filepath.Join(t.TempDir(), "bundle"), s.key); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.url = "http://" + ln.Addr().String()
	inner := bundle.NewServer(s.dir, bundle.ServerOptions{}).Handler()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		cw := &cuttingWriter{ResponseWriter: w, cut: func() bool {
			for {
				n := s.cutNext.Load()
				if n <= 0 || s.cutNext.CompareAndSwap(n, n-1) {
					return n > 0
				}
			}
		}}
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					s.cut.Add(1)
				}
				panic(v)
			}
			if cw.status == http.StatusOK {
				s.whole.Add(1)
			}
		}()
		inner.ServeHTTP(cw, r)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return s
}

// cuttingWriter passes a response through; when cut says so for a 200,
// it sends only the first half of the body, flushes it, and aborts the
// handler: the server drops the connection with the body short of its
// Content-Length.
type cuttingWriter struct {
	http.ResponseWriter
	cut    func() bool
	status int
	cutAt  int64 // 0: no cut
	sent   int64
}

func (c *cuttingWriter) WriteHeader(code int) {
	c.status = code
	if code == http.StatusOK && c.cut() {
		n, err := strconv.ParseInt(c.Header().Get("Content-Length"), 10, 64)
		if err != nil || n < 2 {
			panic(fmt.Sprintf("cut a body without a Content-Length: %q", c.Header().Get("Content-Length")))
		}
		c.cutAt = n / 2
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *cuttingWriter) Write(p []byte) (int, error) {
	if c.cutAt > 0 && c.sent+int64(len(p)) > c.cutAt {
		c.ResponseWriter.Write(p[:c.cutAt-c.sent])
		http.NewResponseController(c.ResponseWriter).Flush()
		panic(http.ErrAbortHandler)
	}
	n, err := c.ResponseWriter.Write(p)
	c.sent += int64(n)
	return n, err
}

// build packs a bundle for c1/web of version v, signed with key (the
// store's when nil), holding a config file and a service that reads it.
func (s *testStore) build(v uint64, key *bundle.PrivateKey) []byte {
	s.t.Helper()
	if key == nil {
		key = &s.key
	}
	dir := s.t.TempDir()
	files := map[string]string{
		"conf/hello.txt":      fmt.Sprintf("release %d\n", v),
		"services/steppe.hcl": "service \"hello\" {\n  command = \"/bin/sleep\"\n  args = [\"3600\"]\n  files = [\"conf/hello.txt\"]\n}\n",
	}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			s.t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			s.t.Fatal(err)
		}
	}
	now := time.Now()
	var buf bytes.Buffer
	if _, err := bundle.Build(&buf, dir, bundle.Manifest{
		Cluster: "c1", Role: "web", Version: v, Created: now.Add(-time.Minute), Expires: now.Add(time.Hour),
	}, key); err != nil {
		s.t.Fatal(err)
	}
	return buf.Bytes()
}

// publish puts b in the store as the latest bundle. The store checks only
// that it is signed and whole, as a store without keys does: the agent is
// what must refuse a bad one.
func (s *testStore) publish(b []byte) {
	s.t.Helper()
	if _, err := bundle.NewDirStore(s.dir).Publish(context.Background(), bytes.NewReader(b), bundle.PublishOptions{}); err != nil {
		s.t.Fatal(err)
	}
}

// changeManifest rewrites a bundle's manifest (adding a variable) and
// keeps its signature: the files still match the manifest, the signature
// no longer does.
func changeManifest(t *testing.T, b []byte) []byte {
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
		if h.Name == bundle.ManifestName {
			m, err := bundle.ParseManifest(body)
			if err != nil {
				t.Fatal(err)
			}
			m.Variables = map[string]string{"added": "after signing"}
			if body, err = m.Marshal(); err != nil {
				t.Fatal(err)
			}
			h.Size = int64(len(body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// syncBuffer is the agent's log, read by the test while the agent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// runAgent runs the agent in this process, pulling from s, until the test
// ends; it returns a client of its local API and its log. bundleLines are
// more attributes of its bundle block.
func runAgent(t *testing.T, s *testStore, bundleLines ...string) (*Client, *syncBuffer) {
	t.Helper()
	testenv.NeedRoot(t, "the agent (cgroups)")
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	cfg := fmt.Sprintf(`
agent {
  state_dir = %q
  socket    = %q
  cgroup    = %q
}
machine {
  name    = "m1"
  address = "127.0.0.1"
}
bundle {
  store          = %q
  cluster        = "c1"
  role           = "web"
  keys           = [%q]
  wait           = "1s"
  health_timeout = "10s"
  %s
}
`, filepath.Join(dir, "state"), sock, fmt.Sprintf("steppe-test/%s-%d", t.Name(), time.Now().UnixNano()), s.url, s.pubFile, strings.Join(bundleLines, "\n  "))
	path := filepath.Join(dir, "agent.hcl")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{ConfigPath: path, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("the agent did not stop within 30s")
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", logs)
		}
	})
	return NewClient(sock), logs
}

// waitBundle polls the agent's status until ok holds, or fails the test.
func waitBundle(t *testing.T, c *Client, what string, timeout time.Duration, ok func(BundleStatus, []string) bool) BundleStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last BundleStatus
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := c.Status(ctx)
		cancel()
		if err == nil && st.Bundle != nil {
			last = *st.Bundle
			var running []string
			for _, s := range st.Services {
				if s.State == "running" {
					running = append(running, s.Name)
				}
			}
			if ok(last, running) {
				return last
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v; bundle status %+v", what, timeout, last)
	return last
}

// A download cut half way is tried again: the machine installs that same
// version without a new publish, instead of waiting on the bundle's ETag.
func TestPullRetriesACutDownload(t *testing.T) {
	s := newTestStore(t)
	s.publish(s.build(1, nil))
	s.cutNext.Store(1)
	c, logs := runAgent(t, s)
	waitBundle(t, c, "release 1 running after a cut download", 20*time.Second, func(b BundleStatus, running []string) bool {
		return b.Version == 1 && b.Pending == 0 && len(running) == 1 && running[0] == "hello"
	})
	if cut, whole := s.cut.Load(), s.whole.Load(); cut != 1 || whole != 1 {
		t.Errorf("the store cut %d and sent %d bundles whole, want 1 and 1", cut, whole)
	}
	if l := logs.String(); !strings.Contains(l, "unexpected EOF") || !strings.Contains(l, "retry_in") {
		t.Errorf("the agent's log does not show the cut download and the retry:\n%s", l)
	}
}

// A bundle whose signature does not verify, or that an untrusted key
// signed, is final for that publish: fetched once, refused with an error
// naming the key, and not fetched again until a new publish, which goes
// through.
func TestPullBadSignatureIsFinal(t *testing.T) {
	s := newTestStore(t)
	s.publish(changeManifest(t, s.build(1, nil)))
	c, _ := runAgent(t, s)
	want := "signature does not verify with key " + s.key.ID + ": the bundle was changed after signing"
	b := waitBundle(t, c, "the changed bundle refused", 20*time.Second, func(b BundleStatus, _ []string) bool {
		return strings.Contains(b.LastError, want)
	})
	t.Logf("refused: %s", b.LastError)
	// Long polls of one second: a few seconds are several requests, each
	// answered "not modified", and not one more bundle.
	time.Sleep(3 * time.Second)
	if whole, reqs := s.whole.Load(), s.requests.Load(); whole != 1 || reqs < 3 {
		t.Errorf("changed bundle: sent %d times in %d requests, want once and the agent still polling", whole, reqs)
	}

	stranger, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	s.publish(s.build(2, &stranger))
	want = fmt.Sprintf("not made by any trusted key: signed with key %q; the trusted keys are %s", stranger.ID, s.key.ID)
	b = waitBundle(t, c, "the stranger's bundle refused", 20*time.Second, func(b BundleStatus, _ []string) bool {
		return strings.Contains(b.LastError, want)
	})
	t.Logf("refused: %s", b.LastError)
	time.Sleep(3 * time.Second)
	if whole := s.whole.Load(); whole != 2 {
		t.Errorf("the stranger's bundle: %d bundles sent, want 2 (each publish once)", whole)
	}
	if b.Version != 0 {
		t.Errorf("running release %d, want none", b.Version)
	}

	s.publish(s.build(3, nil))
	waitBundle(t, c, "release 3 running", 20*time.Second, func(b BundleStatus, running []string) bool {
		return b.Version == 3 && b.LastError == "" && len(running) == 1
	})
}

// A store that cuts every download is asked again with the pull loop's
// one backoff, growing, not four times a second; once it sends the bundle
// whole, the release runs.
func TestPullBacksOffOnRepeatedCuts(t *testing.T) {
	s := newTestStore(t)
	s.publish(s.build(1, nil))
	s.cutNext.Store(1 << 30)
	c, _ := runAgent(t, s)
	time.Sleep(4 * time.Second)
	// Backoffs of about 0.2, 0.4, 0.8, 1.5 s: 4 or 5 tries. Without the
	// growth, one every 125 to 250 ms: more than 15.
	if cut := s.cut.Load(); cut < 2 || cut > 8 {
		t.Errorf("%d cut downloads in 4 s, want 2 to 8", cut)
	}
	t.Logf("%d cut downloads in 4 s", s.cut.Load())
	s.cutNext.Store(0)
	waitBundle(t, c, "release 1 running once the store sends it whole", 20*time.Second, func(b BundleStatus, running []string) bool {
		return b.Version == 1 && b.Pending == 0 && len(running) == 1
	})
}

// A machine created with a floor (bundle min_version, which its provider
// writes) refuses an older bundle that is signed and not expired, as a
// store replaying a removed machine's bundles would serve it, and takes
// the first at or above the floor.
func TestPullMinVersion(t *testing.T) {
	s := newTestStore(t)
	s.publish(s.build(3, nil))
	c, _ := runAgent(t, s, "min_version = 5")
	b := waitBundle(t, c, "version 3 refused below the floor", 20*time.Second, func(b BundleStatus, _ []string) bool {
		return b.LastError != ""
	})
	if b.Version != 0 || !strings.Contains(b.LastError, "3") {
		t.Fatalf("below the floor: running %d, error %q", b.Version, b.LastError)
	}
	t.Logf("refused: %s", b.LastError)
	s.publish(s.build(5, nil))
	waitBundle(t, c, "release 5 running", 20*time.Second, func(b BundleStatus, running []string) bool {
		return b.Version == 5 && b.LastError == "" && len(running) == 1
	})
}
