package bundle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func publishDir(t testing.TB, st *DirStore, b []byte) {
	t.Helper()
	if _, err := st.Publish(context.Background(), bytes.NewReader(b), PublishOptions{}); err != nil {
		t.Fatal(err)
	}
}

// pullOnce fetches and unpacks, as an agent would.
func pullOnce(t testing.TB, st Store, etag string, wait time.Duration, rel string, p Policy) (*Release, string, error) {
	t.Helper()
	f, err := st.Fetch(context.Background(), "prod", "server", etag, wait)
	if err != nil {
		return nil, "", err
	}
	defer f.Body.Close()
	r, err := Unpack(context.Background(), f.Body, rel, p)
	return r, f.ETag, err
}

func TestDirStore(t *testing.T) {
	key := mustKey(t)
	st := NewDirStore(t.TempDir())
	st.PollInterval = 20 * time.Millisecond
	if _, err := st.Fetch(context.Background(), "prod", "server", "", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("empty store: %v", err)
	}
	if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, nil, baseManifest(1), sampleFiles)), PublishOptions{}); !errors.Is(err, ErrUnsigned) {
		t.Fatalf("published an unsigned bundle: %v", err)
	}
	publishDir(t, st, buildBundle(t, &key, baseManifest(1), sampleFiles))
	rel := t.TempDir()
	r, etag, err := pullOnce(t, st, "", 0, rel, policy(key))
	if err != nil || r.Version != 1 || etag == "" {
		t.Fatalf("pull: %+v %q %v", r, etag, err)
	}
	if _, _, err := pullOnce(t, st, etag, 0, rel, policy(key)); !errors.Is(err, ErrNotModified) {
		t.Fatalf("unchanged store: %v", err)
	}
	if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles)), PublishOptions{}); err == nil || !strings.Contains(err.Error(), "not greater than the published 1") {
		t.Fatalf("republished version 1: %v", err)
	}
	other := mustKey(t)
	if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &other, baseManifest(2), sampleFiles)), PublishOptions{Keys: []PublicKey{key.Public()}}); err == nil {
		t.Fatal("published a bundle signed by an untrusted key")
	}

	// A waiting fetch returns the new version once it is published.
	done := make(chan error, 1)
	go func() {
		p := policy(key)
		p.After = 1
		r, _, err := pullOnce(t, st, etag, time.Minute, rel, p)
		if err == nil && r.Version != 2 {
			err = errors.New("got the wrong version")
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // let it start waiting; correctness does not depend on it
	publishDir(t, st, buildBundle(t, &key, baseManifest(2), sampleFiles))
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("waiting fetch did not notice the publish")
	}
	for _, n := range []string{"1.tar.gz", "2.tar.gz", "latest.tar.gz"} {
		if _, err := os.Stat(filepath.Join(st.Dir, "prod", "server", n)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestHTTPStoreLongPoll(t *testing.T) {
	key := mustKey(t)
	dir := t.TempDir()
	dst := NewDirStore(dir)
	srv := httptest.NewServer(NewServer(dir, ServerOptions{PollInterval: 50 * time.Millisecond}).Handler())
	defer srv.Close()
	st, err := NewHTTPStore(srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	rel := t.TempDir()
	if _, err := st.Fetch(context.Background(), "prod", "server", "", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("empty store: %v", err)
	}
	publishDir(t, dst, buildBundle(t, &key, baseManifest(1), sampleFiles))
	r, etag, err := pullOnce(t, st, "", 0, rel, policy(key))
	if err != nil || r.Version != 1 {
		t.Fatalf("pull: %+v %v", r, err)
	}
	// Unchanged, no wait: 304 at once. Unchanged with a short wait: 304
	// after it.
	if _, _, err := pullOnce(t, st, etag, 0, rel, policy(key)); !errors.Is(err, ErrNotModified) {
		t.Fatalf("unchanged: %v", err)
	}
	start := time.Now()
	if _, _, err := pullOnce(t, st, etag, 300*time.Millisecond, rel, policy(key)); !errors.Is(err, ErrNotModified) {
		t.Fatalf("unchanged with wait: %v", err)
	}
	if time.Since(start) < 300*time.Millisecond {
		t.Fatalf("a long poll returned 304 after %v, before its wait of 300ms", time.Since(start))
	}

	// Waiting clients (several, on one key) all get the new version. The
	// publish goes straight into the directory, as `steppe bundle publish
	// -store DIR` does, so the server must notice it by itself.
	const clients = 5
	done := make(chan error, clients)
	for i := 0; i < clients; i++ {
		go func() {
			p := policy(key)
			p.After = 1
			r, _, err := pullOnce(t, st, etag, time.Minute, t.TempDir(), p)
			if err == nil && r.Version != 2 {
				err = errors.New("got the wrong version")
			}
			done <- err
		}()
	}
	time.Sleep(200 * time.Millisecond)
	published := time.Now()
	publishDir(t, dst, buildBundle(t, &key, baseManifest(2), sampleFiles))
	for i := 0; i < clients; i++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a waiting client did not learn of the publish")
		}
	}
	t.Logf("waiting clients got the new version %v after the publish", time.Since(published))
}

func TestHTTPStoreWaitsForFirstPublish(t *testing.T) {
	key := mustKey(t)
	dir := t.TempDir()
	srv := httptest.NewServer(NewServer(dir, ServerOptions{PollInterval: 50 * time.Millisecond}).Handler())
	defer srv.Close()
	st, _ := NewHTTPStore(srv.URL, nil)
	done := make(chan error, 1)
	go func() {
		_, _, err := pullOnce(t, st, "", time.Minute, t.TempDir(), policy(key))
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	publishDir(t, NewDirStore(dir), buildBundle(t, &key, baseManifest(1), sampleFiles))
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a booting client did not learn of the first publish")
	}
}

func TestHTTPPublish(t *testing.T) {
	key, other := mustKey(t), mustKey(t)
	dir := t.TempDir()
	srv := httptest.NewServer(NewServer(dir, ServerOptions{Keys: []PublicKey{key.Public()}}).Handler())
	defer srv.Close()
	st, _ := NewHTTPStore(srv.URL, nil)
	ctx := context.Background()
	if _, err := st.Publish(ctx, bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles))); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Publish(ctx, bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles))); err == nil || !strings.Contains(err.Error(), "not greater") {
		t.Fatalf("replayed publish: %v", err)
	}
	if _, err := st.Publish(ctx, bytes.NewReader(buildBundle(t, &other, baseManifest(2), sampleFiles))); err == nil || !strings.Contains(err.Error(), "trusted") {
		t.Fatalf("publish by an untrusted key: %v", err)
	}
	if _, err := st.Publish(ctx, bytes.NewReader(buildBundle(t, nil, baseManifest(2), sampleFiles))); !errors.Is(err, ErrUnsigned) {
		t.Fatalf("unsigned publish: %v", err)
	}
	// A bundle PUT to another role's URL is refused: the URL must agree
	// with the signed manifest.
	req, _ := http.NewRequest(http.MethodPut, srv.URL+"/v1/bundles/prod/client", bytes.NewReader(buildBundle(t, &key, baseManifest(3), sampleFiles)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusConflict {
		t.Fatalf("PUT to the wrong role: %s", resp.Status)
	}
	r, _, err := pullOnce(t, st, "", 0, t.TempDir(), policy(key))
	if err != nil || r.Version != 1 {
		t.Fatalf("after refused publishes: %+v %v", r, err)
	}

	ro := httptest.NewServer(NewServer(dir, ServerOptions{}).Handler())
	defer ro.Close()
	rst, _ := NewHTTPStore(ro.URL, nil)
	if _, err := rst.Publish(ctx, bytes.NewReader(buildBundle(t, &key, baseManifest(5), sampleFiles))); err == nil || !strings.Contains(err.Error(), "405") {
		t.Fatalf("publish to a read-only server: %v", err)
	}
}

// TestTruncatedDownload serves a bundle that stops half way (the server
// dies mid-body) and checks that the machine stays on its release.
func TestTruncatedDownload(t *testing.T) {
	key := mustKey(t)
	v1 := buildBundle(t, &key, baseManifest(1), map[string]string{"v1": "one"})
	v2 := buildBundle(t, &key, baseManifest(2), sampleFiles)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", `"v2"`)
		w.Header().Set("Content-Length", "100000")
		w.Write(v2[:len(v2)/2])
	}))
	defer srv.Close()
	rel := t.TempDir()
	if _, err := Unpack(context.Background(), bytes.NewReader(v1), rel, policy(key)); err != nil {
		t.Fatal(err)
	}
	Activate(rel, 1)
	st, _ := NewHTTPStore(srv.URL, nil)
	p := policy(key)
	p.After = 1
	_, _, err := pullOnce(t, st, "", 0, rel, p)
	var invalid *InvalidError
	if err == nil || !strings.Contains(err.Error(), "EOF") || errors.As(err, &invalid) {
		t.Fatalf("truncated download: %v, want an error that may pass on another try", err)
	}
	t.Logf("refused: %v", err)
	assertOnlyV1(t, rel)
}

func TestServerBadRequests(t *testing.T) {
	srv := httptest.NewServer(NewServer(t.TempDir(), ServerOptions{}).Handler())
	defer srv.Close()
	for path, want := range map[string]int{
		"/v1/bundles/prod/server?wait=banana": http.StatusBadRequest,
		"/v1/bundles/.hidden/server":          http.StatusBadRequest,
		"/v1/bundles/prod/server":             http.StatusNotFound,
		"/v1/bundles/prod":                    http.StatusNotFound,
	} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s: %s, want %d", path, resp.Status, want)
		}
	}
}

func TestHTTPSStore(t *testing.T) {
	key := mustKey(t)
	dir := t.TempDir()
	publishDir(t, NewDirStore(dir), buildBundle(t, &key, baseManifest(1), sampleFiles))
	srv := httptest.NewTLSServer(NewServer(dir, ServerOptions{}).Handler())
	defer srv.Close()
	// The test server's own client trusts its certificate; a default
	// client must not.
	plain, _ := NewHTTPStore(srv.URL, nil)
	if _, err := plain.Fetch(context.Background(), "prod", "server", "", 0); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("fetch from an untrusted certificate: %v", err)
	}
	st, _ := NewHTTPStore(srv.URL, srv.Client())
	r, etag, err := pullOnce(t, st, "", 0, t.TempDir(), policy(key))
	if err != nil || r.Version != 1 || etag == "" {
		t.Fatalf("pull over HTTPS: %+v %v", r, err)
	}
	if _, err := NewHTTPStore("ftp://x", nil); err == nil {
		t.Fatal("ftp:// store accepted")
	}
}

func TestOpenStore(t *testing.T) {
	for loc, want := range map[string]string{
		"http://127.0.0.1:8480": "*bundle.HTTPStore", "https://bundles.example": "*bundle.HTTPStore",
		"/var/lib/steppe/store": "*bundle.DirStore", "s3://bucket/prefix": "*bundle.S3Store",
		"s3://bucket?endpont=x": "error", "gs://bucket": "error", "": "error",
	} {
		st, err := OpenStore(loc, nil)
		got := "error"
		if err == nil {
			got = fmt.Sprintf("%T", st)
		}
		if got != want {
			t.Errorf("OpenStore(%q) = %s (%v), want %s", loc, got, err, want)
		}
	}
}

// TestServerWatchesDirectory: with stat polling set to an hour, only the
// inotify watch can tell the waiting client of a publish in time.
func TestServerWatchesDirectory(t *testing.T) {
	key := mustKey(t)
	dir := t.TempDir()
	dst := NewDirStore(dir)
	publishDir(t, dst, buildBundle(t, &key, baseManifest(1), sampleFiles))
	srv := httptest.NewServer(NewServer(dir, ServerOptions{PollInterval: time.Hour}).Handler())
	defer srv.Close()
	st, _ := NewHTTPStore(srv.URL, nil)
	f, err := st.Fetch(context.Background(), "prod", "server", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Body.Close()
	// Cancelled before the server closes, so that a failure does not wait
	// for the long poll to end.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		g, err := st.Fetch(ctx, "prod", "server", f.ETag, 10*time.Minute)
		if err == nil {
			g.Body.Close()
		}
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	publishDir(t, dst, buildBundle(t, &key, baseManifest(2), sampleFiles))
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the publish was not noticed through inotify")
	}
}

func TestETagMatch(t *testing.T) {
	const e = `"abc"`
	for inm, want := range map[string]bool{
		"": false, `"abc"`: true, `W/"abc"`: true, `"x", "abc"`: true, "*": true, `"x"`: false, `abc`: false,
	} {
		if got := etagMatch(inm, e); got != want {
			t.Errorf("etagMatch(%q) = %v, want %v", inm, got, want)
		}
	}
}
