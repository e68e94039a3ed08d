package artifact

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
)

// testStore publishes two versions into a real store and serves it with
// the real handler on a loopback httptest server, counting requests and
// optionally failing some.
type testStore struct {
	dir     string
	srv     *httptest.Server
	keyring *Keyring
	key     *openpgp.Entity // the store's signing key, to sign what a test changes
	mu      sync.Mutex
	hits    map[string]int
	failN   map[string]int // path => answers of 503 still to give
}

func newTestStore(t *testing.T) *testStore {
	t.Helper()
	ts := &testStore{dir: t.TempDir(), hits: map[string]int{}, failN: map[string]int{}}
	key, err := loadOrCreateKey(keyFile(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	ts.key = key
	for _, v := range []string{"1.9.3", "1.10.5"} {
		if _, err := publish(ts.dir, key, "nomad", v, fakeBinary(t, "#!/bin/sh\necho Nomad v"+v+"\n"), time.Unix(1700000000, 0)); err != nil {
			t.Fatal(err)
		}
	}
	pub, err := os.ReadFile(filepath.Join(ts.dir, StoreKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if ts.keyring, err = ReadKeyring(pub); err != nil {
		t.Fatal(err)
	}
	h := StoreHandler(ts.dir)
	ts.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ts.mu.Lock()
		ts.hits[r.URL.Path]++
		fail := ts.failN[r.URL.Path] > 0
		if fail {
			ts.failN[r.URL.Path]--
		}
		ts.mu.Unlock()
		if fail {
			http.Error(w, "try later", http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.srv.Close)
	return ts
}

func (ts *testStore) hitCount(path string) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.hits[path]
}

func quietFetcher(t *testing.T) *Fetcher {
	return &Fetcher{CacheDir: t.TempDir(), Backoff: 10 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

const (
	zipPath  = "/nomad/1.9.3/nomad_1.9.3_linux_amd64.zip"
	sumsPath = "/nomad/1.9.3/nomad_1.9.3_SHA256SUMS"
)

func TestFetchVerifiesAndCachesByDigest(t *testing.T) {
	ts := newTestStore(t)
	f := quietFetcher(t)
	ctx := context.Background()
	p, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "#!/bin/sh\necho Nomad v1.9.3\n" {
		t.Errorf("fetched binary = %q", got)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o755 {
		t.Errorf("mode %v, want 0755", st.Mode().Perm())
	}
	if !strings.Contains(p, filepath.Join("fetch", "sha256")) {
		t.Errorf("path %s is not under the digest cache", p)
	}
	// Second fetch: signature checked again, archive not downloaded again.
	p2, err := f.Fetch(ctx, ts.srv.URL+"/", "nomad", "v1.9.3", "linux", "amd64", ts.keyring)
	if err != nil || p2 != p {
		t.Fatalf("second fetch = %s, %v", p2, err)
	}
	if n := ts.hitCount(zipPath); n != 1 {
		t.Errorf("archive downloaded %d times, want 1", n)
	}
	if n := ts.hitCount("/nomad/1.9.3/nomad_1.9.3_SHA256SUMS.sig"); n != 2 {
		t.Errorf("signature fetched %d times, want 2 (checked on every fetch)", n)
	}
	// The unsigned index is never consulted.
	if n := ts.hitCount("/nomad/1.9.3/index.json"); n != 0 {
		t.Errorf("index.json requested %d times, want 0", n)
	}
	// No temporary leftovers.
	left, _ := os.ReadDir(filepath.Join(f.CacheDir, "fetch", "tmp"))
	if len(left) != 0 {
		t.Errorf("fetch/tmp holds %d leftovers", len(left))
	}
}

func TestFetchRejectsTamperedShasums(t *testing.T) {
	ts := newTestStore(t)
	sumsFile := filepath.Join(ts.dir, "nomad/1.9.3/nomad_1.9.3_SHA256SUMS")
	// Point the sums at another archive's digest: signature must fail.
	other, _ := os.ReadFile(filepath.Join(ts.dir, "nomad/1.10.5/nomad_1.10.5_SHA256SUMS"))
	tampered := strings.Fields(string(other))[0] + "  nomad_1.9.3_linux_amd64.zip\n"
	if err := os.WriteFile(sumsFile, []byte(tampered), 0o644); err != nil {
		t.Fatal(err)
	}
	f := quietFetcher(t)
	_, err := f.Fetch(context.Background(), ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if err == nil || !strings.Contains(err.Error(), "not signed by a trusted key") {
		t.Fatalf("tampered SHA256SUMS: err = %v", err)
	}
	if n := ts.hitCount(zipPath); n != 0 {
		t.Errorf("archive downloaded %d times despite a bad signature", n)
	}
}

func TestFetchRejectsUntrustedKeyAndAcceptsAnyTrusted(t *testing.T) {
	ts := newTestStore(t)
	other, err := loadOrCreateKey(keyFile(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	otherPub, _ := armoredPublicKey(other)
	untrusted, _ := ReadKeyring(otherPub)
	ctx := context.Background()
	if _, err := quietFetcher(t).Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", untrusted); err == nil {
		t.Fatal("fetched with a keyring that does not hold the store key")
	}
	storePub, _ := os.ReadFile(filepath.Join(ts.dir, StoreKeyFile))
	both, err := ReadKeyring(otherPub, storePub)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := quietFetcher(t).Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", both); err != nil {
		t.Fatalf("a keyring of two keys, one of them the store's: %v", err)
	}
}

func TestFetchRejectsCorruptArchiveAndInstallsNothing(t *testing.T) {
	ts := newTestStore(t)
	zipFile := filepath.Join(ts.dir, strings.TrimPrefix(zipPath, "/"))
	data, _ := os.ReadFile(zipFile)
	data[len(data)/2] ^= 0xff
	if err := os.WriteFile(zipFile, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f := quietFetcher(t)
	_, err := f.Fetch(context.Background(), ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if !errors.Is(err, errVerify) {
		t.Fatalf("corrupt archive: err = %v", err)
	}
	if n := ts.hitCount(zipPath); n != 1 {
		t.Errorf("a digest mismatch was retried (%d downloads)", n)
	}
	installed, _ := os.ReadDir(filepath.Join(f.CacheDir, "fetch", "sha256"))
	if len(installed) != 0 {
		t.Errorf("something was installed: %v", installed)
	}
}

func TestFetchRetriesServerErrors(t *testing.T) {
	ts := newTestStore(t)
	ts.failN[sumsPath] = 2
	ts.failN[zipPath] = 1
	if _, err := quietFetcher(t).Fetch(context.Background(), ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring); err != nil {
		t.Fatalf("fetch through transient 503s: %v", err)
	}
	if n := ts.hitCount(sumsPath); n != 3 {
		t.Errorf("SHA256SUMS requested %d times, want 3", n)
	}
	ts.failN["/nomad/1.10.5/nomad_1.10.5_SHA256SUMS"] = 100
	f := quietFetcher(t)
	f.Attempts = 3
	_, err := f.Fetch(context.Background(), ts.srv.URL, "nomad", "1.10.5", "linux", "amd64", ts.keyring)
	if err == nil || !strings.Contains(err.Error(), "after 3 attempts") {
		t.Errorf("persistent 503: err = %v", err)
	}
}

func TestFetchTruncatedDownloadNeverInstalled(t *testing.T) {
	ts := newTestStore(t)
	full, _ := os.ReadFile(filepath.Join(ts.dir, strings.TrimPrefix(zipPath, "/")))
	var mu sync.Mutex
	cut := 2
	// A server that hangs up half-way through the archive twice.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		truncate := r.URL.Path == zipPath && cut > 0
		if truncate {
			cut--
		}
		mu.Unlock()
		if !truncate {
			StoreHandler(ts.dir).ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Length", "100000")
		w.Write(full[:len(full)/2])
		// Flushed, so the client has a response and cannot transparently
		// retry: it sees a body cut short.
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}))
	defer srv.Close()
	f := quietFetcher(t)
	p, err := f.Fetch(context.Background(), srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if err != nil {
		t.Fatalf("fetch after two truncated downloads: %v", err)
	}
	if b, _ := os.ReadFile(p); !bytes.Contains(b, []byte("Nomad v1.9.3")) {
		t.Errorf("installed content %q", b)
	}
	if n := ts.hitCount(zipPath); n != 0 {
		t.Fatalf("the counting server was used: %d", n)
	}
	f2 := quietFetcher(t)
	f2.Attempts = 1
	mu.Lock()
	cut = 1
	mu.Unlock()
	if _, err := f2.Fetch(context.Background(), srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring); err == nil {
		t.Fatal("a truncated download with no retry left succeeded")
	}
	installed, _ := os.ReadDir(filepath.Join(f2.CacheDir, "fetch", "sha256"))
	if len(installed) != 0 {
		t.Errorf("a partial download was installed: %v", installed)
	}
}

func TestFetchErrors(t *testing.T) {
	ts := newTestStore(t)
	ctx := context.Background()
	f := quietFetcher(t)
	if _, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.4", "linux", "amd64", ts.keyring); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("missing version: %v", err)
	}
	if _, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "darwin", "arm64", ts.keyring); err == nil || !strings.Contains(err.Error(), "no darwin/arm64 build") {
		t.Errorf("missing platform: %v", err)
	}
	if _, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", nil); err == nil {
		t.Error("fetch without trusted keys succeeded")
	}
	// A 404 is not retried.
	if n := ts.hitCount("/nomad/1.9.4/nomad_1.9.4_SHA256SUMS"); n != 1 {
		t.Errorf("404 requested %d times", n)
	}
	// Names become path elements and file names.
	for _, bad := range [][3]string{{"../nomad", "linux", "amd64"}, {"nomad", "linux/..", "amd64"}, {"nomad", "linux", "AMD64"}, {"", "linux", "amd64"}} {
		if _, err := f.Fetch(ctx, ts.srv.URL, bad[0], "1.9.3", bad[1], bad[2], ts.keyring); err == nil || !strings.Contains(err.Error(), "want lower-case letters") {
			t.Errorf("Fetch(%q) = %v", bad, err)
		}
	}
}

func TestFetchURLPinnedDigest(t *testing.T) {
	ts := newTestStore(t)
	zipFile := filepath.Join(ts.dir, strings.TrimPrefix(zipPath, "/"))
	digest, err := sha256File(zipFile)
	if err != nil {
		t.Fatal(err)
	}
	f := quietFetcher(t)
	ctx := context.Background()
	p, err := f.FetchURL(ctx, ts.srv.URL+zipPath, digest, "nomad")
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); !bytes.Contains(b, []byte("Nomad v1.9.3")) {
		t.Errorf("extracted %q", b)
	}
	// A plain (non-zip) file is installed as is.
	keyDigest, _ := sha256File(filepath.Join(ts.dir, StoreKeyFile))
	if p, err := f.FetchURL(ctx, ts.srv.URL+"/"+StoreKeyFile, keyDigest, "store.asc"); err != nil || filepath.Base(p) != "store.asc" {
		t.Errorf("plain file: %s, %v", p, err)
	}
	wrong := strings.Repeat("0", 64)
	if _, err := f.FetchURL(ctx, ts.srv.URL+zipPath, wrong, "nomad"); !errors.Is(err, errVerify) {
		t.Errorf("wrong pinned digest: %v", err)
	}
	if _, err := f.FetchURL(ctx, ts.srv.URL+zipPath, "abc", "nomad"); err == nil {
		t.Error("short digest accepted")
	}
}

func TestFetchTriesTheKeySpecificSignature(t *testing.T) {
	ts := newTestStore(t)
	vdir := filepath.Join(ts.dir, "nomad", "1.9.3")
	// As during a key rotation on the release site: the default .sig is by
	// a key this agent does not trust, the one named by the trusted key's
	// short ID (PRODUCT_VERSION_SHA256SUMS.72D7468F.sig) by the store key.
	other, err := loadOrCreateKey(keyFile(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	sums, _ := os.ReadFile(filepath.Join(vdir, "nomad_1.9.3_SHA256SUMS"))
	good, _ := os.ReadFile(filepath.Join(vdir, "nomad_1.9.3_SHA256SUMS.sig"))
	bad, err := signDetached(other, sums)
	if err != nil {
		t.Fatal(err)
	}
	ids := ts.keyring.shortIDs()
	if len(ids) != 1 || len(ids[0]) != 8 {
		t.Fatalf("short key IDs %q", ids)
	}
	perKey := "nomad_1.9.3_SHA256SUMS." + ids[0] + ".sig"
	mustWrite(t, filepath.Join(vdir, "nomad_1.9.3_SHA256SUMS.sig"), bad)
	mustWrite(t, filepath.Join(vdir, perKey), good)
	if _, err := quietFetcher(t).Fetch(context.Background(), ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring); err != nil {
		t.Fatalf("the trusted key-specific signature was not used: %v", err)
	}
	// With no trusted signature at all the fetch fails.
	mustWrite(t, filepath.Join(vdir, perKey), bad)
	if _, err := quietFetcher(t).Fetch(context.Background(), ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring); err == nil {
		t.Fatal("fetched with no trusted signature")
	}
}

func mustWrite(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}
