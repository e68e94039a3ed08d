package artifact

import (
	"archive/zip"
	"bytes"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// fakeBinary writes a file to publish; the store does not care what the
// binary is (the build checks it before publishing).
func fakeBinary(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "bin")
	if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPublishLayoutIndexAndSignature(t *testing.T) {
	cache := t.TempDir()
	store := filepath.Join(t.TempDir(), "store")
	key, err := loadOrCreateKey(keyFile(cache))
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(keyFile(cache))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("private key mode %v, want 0600", st.Mode().Perm())
	}
	when := time.Date(2024, 11, 11, 16, 35, 41, 0, time.UTC)
	bin := fakeBinary(t, "nomad 1.9.3 binary")
	pub, err := publish(store, key, "nomad", "1.9.3", bin, when)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := publish(store, key, "nomad", "1.10.5", fakeBinary(t, "nomad 1.10.5 binary"), when); err != nil {
		t.Fatal(err)
	}

	// The release site's file names.
	for _, f := range []string{
		"steppe-store.asc",
		"nomad/index.json",
		"nomad/1.9.3/index.json",
		"nomad/1.9.3/nomad_1.9.3_linux_amd64.zip",
		"nomad/1.9.3/nomad_1.9.3_SHA256SUMS",
		"nomad/1.9.3/nomad_1.9.3_SHA256SUMS.sig",
		"nomad/1.10.5/nomad_1.10.5_linux_amd64.zip",
	} {
		if _, err := os.Stat(filepath.Join(store, f)); err != nil {
			t.Errorf("store lacks %s: %v", f, err)
		}
	}
	if pub.Archive != filepath.Join(store, "nomad/1.9.3/nomad_1.9.3_linux_amd64.zip") {
		t.Errorf("Archive = %s", pub.Archive)
	}

	// SHA256SUMS: "<hex>  <file>" like sha256sum, matching the archive.
	sums, err := os.ReadFile(pub.Shasums)
	if err != nil {
		t.Fatal(err)
	}
	zipSum, err := sha256File(pub.Archive)
	if err != nil {
		t.Fatal(err)
	}
	if want := zipSum + "  nomad_1.9.3_linux_amd64.zip\n"; string(sums) != want {
		t.Errorf("SHA256SUMS = %q, want %q", sums, want)
	}

	// The archive holds one executable entry named like the product.
	zr, err := zip.OpenReader(pub.Archive)
	if err != nil {
		t.Fatal(err)
	}
	if len(zr.File) != 1 || zr.File[0].Name != "nomad" || zr.File[0].Mode().Perm() != 0o755 {
		t.Errorf("zip entries: %+v", zr.File)
	}
	zr.Close()

	// Signature verifies with the exported public key alone.
	pubKey, err := os.ReadFile(filepath.Join(store, StoreKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	kr, err := ReadKeyring(pubKey)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(pubKey, []byte("PRIVATE")) {
		t.Fatal("the exported key contains a private key")
	}
	sig, err := os.ReadFile(pub.Signature)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kr.VerifyDetached(sums, sig); err != nil {
		t.Fatalf("signature does not verify: %v", err)
	}
	// A tampered SHA256SUMS (another archive digest) is rejected.
	tampered := bytes.Replace(sums, []byte(zipSum[:8]), []byte("00000000"), 1)
	if _, err := kr.VerifyDetached(tampered, sig); err == nil {
		t.Fatal("tampered SHA256SUMS verified")
	}

	// Version index: exactly the release site's keys.
	var vi map[string]any
	readJSON(t, filepath.Join(store, "nomad/1.9.3/index.json"), &vi)
	wantKeys(t, "version index", vi, "name", "version", "shasums", "shasums_signature", "shasums_signatures", "builds")
	if vi["name"] != "nomad" || vi["version"] != "1.9.3" || vi["shasums"] != "nomad_1.9.3_SHA256SUMS" || vi["shasums_signature"] != "nomad_1.9.3_SHA256SUMS.sig" {
		t.Errorf("version index = %v", vi)
	}
	builds := vi["builds"].([]any)
	if len(builds) != 1 {
		t.Fatalf("builds = %v", builds)
	}
	b0 := builds[0].(map[string]any)
	wantKeys(t, "build", b0, "name", "version", "os", "arch", "filename", "url")
	if b0["os"] != "linux" || b0["arch"] != "amd64" || b0["filename"] != "nomad_1.9.3_linux_amd64.zip" {
		t.Errorf("build = %v", b0)
	}

	// Product index: both versions, urls that resolve to the archives.
	var pi ProductIndex
	readJSON(t, filepath.Join(store, "nomad/index.json"), &pi)
	if pi.Name != "nomad" || len(pi.Versions) != 2 {
		t.Fatalf("product index = %+v", pi)
	}
	base, _ := url.Parse("http://127.0.0.1:1/prefix/nomad/index.json")
	for v, vi := range pi.Versions {
		u, err := base.Parse(vi.Builds[0].URL)
		if err != nil {
			t.Fatal(err)
		}
		if want := "/prefix/nomad/" + v + "/nomad_" + v + "_linux_amd64.zip"; u.Path != want {
			t.Errorf("%s: url %q resolves to %s, want %s", v, vi.Builds[0].URL, u.Path, want)
		}
	}
	vbase, _ := url.Parse("http://127.0.0.1:1/prefix/nomad/1.9.3/index.json")
	u, _ := vbase.Parse(b0["url"].(string))
	if u.Path != "/prefix/nomad/1.9.3/nomad_1.9.3_linux_amd64.zip" {
		t.Errorf("version index url resolves to %s", u.Path)
	}
}

func TestPublishIsIdempotentAndDeterministic(t *testing.T) {
	cache := t.TempDir()
	store := t.TempDir()
	key, err := loadOrCreateKey(keyFile(cache))
	if err != nil {
		t.Fatal(err)
	}
	when := time.Date(2023, 10, 31, 18, 7, 9, 0, time.UTC)
	bin := fakeBinary(t, "consul")
	first, err := publish(store, key, "consul", "1.14.11", bin, when)
	if err != nil {
		t.Fatal(err)
	}
	sig1, _ := os.ReadFile(first.Signature)
	st1, _ := os.Stat(first.Archive)
	second, err := publish(store, key, "consul", "1.14.11", bin, when)
	if err != nil {
		t.Fatal(err)
	}
	sig2, _ := os.ReadFile(second.Signature)
	st2, _ := os.Stat(second.Archive)
	if first.ArchiveSHA256 != second.ArchiveSHA256 || !bytes.Equal(sig1, sig2) || !st1.ModTime().Equal(st2.ModTime()) {
		t.Error("publishing the same binary again rewrote the archive or signature")
	}
	// Another store gets a byte-identical archive from the same binary.
	other, err := publish(t.TempDir(), key, "consul", "1.14.11", bin, when)
	if err != nil {
		t.Fatal(err)
	}
	if other.ArchiveSHA256 != first.ArchiveSHA256 {
		t.Errorf("archive not deterministic: %s vs %s", other.ArchiveSHA256, first.ArchiveSHA256)
	}
	// A changed binary (even of the same size) is re-published and re-signed.
	third, err := publish(store, key, "consul", "1.14.11", fakeBinary(t, "consuL"), when)
	if err != nil {
		t.Fatal(err)
	}
	if third.ArchiveSHA256 == first.ArchiveSHA256 {
		t.Error("a changed binary kept the old archive")
	}
}

func TestPublishRefusesStoreOfAnotherKey(t *testing.T) {
	store := t.TempDir()
	k1, err := loadOrCreateKey(keyFile(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	k2, err := loadOrCreateKey(keyFile(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	bin := fakeBinary(t, "x")
	if _, err := publish(store, k1, "nomad", "1.9.3", bin, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	_, err = publish(store, k2, "nomad", "1.10.5", bin, time.Unix(0, 0))
	if err == nil || !strings.Contains(err.Error(), "signed by key") {
		t.Fatalf("publishing with another key: err = %v, want a refusal", err)
	}
}

func TestStoreKeyIsReusedAndGuarded(t *testing.T) {
	cache := t.TempDir()
	a, err := loadOrCreateKey(keyFile(cache))
	if err != nil {
		t.Fatal(err)
	}
	b, err := loadOrCreateKey(keyFile(cache))
	if err != nil {
		t.Fatal(err)
	}
	if a.PrimaryKey.Fingerprint == nil || !bytes.Equal(a.PrimaryKey.Fingerprint, b.PrimaryKey.Fingerprint) {
		t.Error("second use created another key")
	}
	if err := os.Chmod(keyFile(cache), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadOrCreateKey(keyFile(cache)); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Errorf("world-readable private key accepted: %v", err)
	}
}

func TestReadKeyringSeveralKeys(t *testing.T) {
	k1, _ := loadOrCreateKey(keyFile(t.TempDir()))
	k2, _ := loadOrCreateKey(keyFile(t.TempDir()))
	p1, _ := armoredPublicKey(k1)
	p2, _ := armoredPublicKey(k2)
	kr, err := ReadKeyring(append(append([]byte{}, p1...), p2...))
	if err != nil {
		t.Fatal(err)
	}
	if len(kr.Fingerprints()) != 2 {
		t.Fatalf("fingerprints = %v, want 2 keys from one concatenated file", kr.Fingerprints())
	}
	msg := []byte("abc  x.zip\n")
	sig, err := signDetached(k2, msg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kr.VerifyDetached(msg, sig); err != nil {
		t.Errorf("signature by the second trusted key rejected: %v", err)
	}
	only1, _ := ReadKeyring(p1)
	if _, err := only1.VerifyDetached(msg, sig); err == nil {
		t.Error("signature by an untrusted key accepted")
	}
	if _, err := ReadKeyring([]byte("not a key")); err == nil {
		t.Error("garbage keyring accepted")
	}
}

func TestLookupSum(t *testing.T) {
	sums := []byte(strings.Repeat("a", 64) + "  nomad_1.9.3_linux_amd64.zip\n" + strings.Repeat("b", 64) + " *nomad_1.9.3_darwin_arm64.zip\n")
	if got, err := lookupSum(sums, "nomad_1.9.3_darwin_arm64.zip"); err != nil || got != strings.Repeat("b", 64) {
		t.Errorf("lookupSum = %q, %v", got, err)
	}
	if _, err := lookupSum(sums, "nomad_1.9.3_linux_arm64.zip"); err == nil {
		t.Error("missing entry found")
	}
	if _, err := lookupSum([]byte("xyz  f.zip\n"), "f.zip"); err == nil {
		t.Error("malformed digest accepted")
	}
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func wantKeys(t *testing.T, what string, m map[string]any, keys ...string) {
	t.Helper()
	var got []string
	for k := range m {
		got = append(got, k)
	}
	sort.Strings(got)
	sort.Strings(keys)
	if strings.Join(got, ",") != strings.Join(keys, ",") {
		t.Errorf("%s keys = %v, want %v", what, got, keys)
	}
}

func TestConcurrentPublishKeepsEveryVersionInIndex(t *testing.T) {
	store := t.TempDir()
	key, err := loadOrCreateKey(keyFile(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	versions := []string{"1.14.1", "1.14.2", "1.14.3", "1.14.4", "1.14.5", "1.14.6", "1.14.7", "1.14.8"}
	bins := make([]string, len(versions))
	for i, v := range versions {
		bins[i] = fakeBinary(t, "consul "+v)
	}
	errc := make(chan error, len(versions))
	for i, v := range versions {
		go func() {
			_, err := publish(store, key, "consul", v, bins[i], time.Unix(0, 0))
			errc <- err
		}()
	}
	for range versions {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	var pi ProductIndex
	readJSON(t, filepath.Join(store, "consul", "index.json"), &pi)
	for _, v := range versions {
		if _, ok := pi.Versions[v]; !ok {
			t.Errorf("product index lost %s (has %d versions)", v, len(pi.Versions))
		}
	}
}
