package bundle

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func mustKey(t testing.TB) PrivateKey {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// writeTree creates files (path → content) under a new temp dir.
func writeTree(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for p, c := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func baseManifest(version uint64) Manifest {
	now := time.Now().UTC().Truncate(time.Second)
	return Manifest{Cluster: "prod", Role: "server", Version: version, Created: now, Expires: now.Add(24 * time.Hour)}
}

var sampleFiles = map[string]string{
	"nomad/nomad.hcl.tmpl":    "name = \"{{.Machine.Name}}\"\n",
	"consul/consul.hcl":       "server = true\n",
	"services/nomad.json":     `{"name":"nomad"}`,
	"deep/a/b/c/d/e/data.txt": strings.Repeat("x", 100000),
}

func buildBundle(t testing.TB, key *PrivateKey, m Manifest, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := Build(&buf, writeTree(t, files), m, key); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func policy(keys ...PrivateKey) Policy {
	p := Policy{Cluster: "prod", Role: "server"}
	for _, k := range keys {
		p.Keys = append(p.Keys, k.Public())
	}
	return p
}

func TestBuildUnpackActivate(t *testing.T) {
	key := mustKey(t)
	b := buildBundle(t, &key, baseManifest(7), sampleFiles)
	rel := t.TempDir()
	r, err := Unpack(context.Background(), bytes.NewReader(b), rel, policy(key))
	if err != nil {
		t.Fatal(err)
	}
	if r.Version != 7 || r.KeyID != key.ID || r.Dir != filepath.Join(rel, "7") {
		t.Fatalf("release = %+v", r)
	}
	for p, c := range sampleFiles {
		got, err := os.ReadFile(filepath.Join(r.Dir, p))
		if err != nil || string(got) != c {
			t.Fatalf("%s: %q, %v", p, got, err)
		}
	}
	if !slices.Equal(r.Manifest.Templates, []string{"nomad/nomad.hcl.tmpl"}) || !slices.Equal(r.Manifest.Services, []string{"services/nomad.json"}) {
		t.Fatalf("templates %v services %v", r.Manifest.Templates, r.Manifest.Services)
	}
	if _, _, err := Current(rel); !errors.Is(err, ErrNoCurrent) {
		t.Fatalf("Current before Activate: %v", err)
	}
	if err := Activate(rel, 7); err != nil {
		t.Fatal(err)
	}
	v, dir, err := Current(rel)
	if err != nil || v != 7 || dir != r.Dir {
		t.Fatalf("Current = %d %s %v", v, dir, err)
	}
	back, err := ReadRelease(rel, 7)
	if err != nil || back.Manifest.Version != 7 || len(back.Manifest.Files) != len(sampleFiles) {
		t.Fatalf("ReadRelease: %+v %v", back, err)
	}
	// Verify agrees with Unpack and writes nothing.
	if m, id, err := Verify(context.Background(), bytes.NewReader(b), policy(key)); err != nil || m.Version != 7 || id != key.ID {
		t.Fatalf("Verify: %v %s %v", m, id, err)
	}
}

func TestModesComeFromManifest(t *testing.T) {
	key := mustKey(t)
	dir := writeTree(t, map[string]string{"run.sh": "#!/bin/sh\n", "secret": "s"})
	os.Chmod(filepath.Join(dir, "run.sh"), 0o755)
	os.Chmod(filepath.Join(dir, "secret"), 0o600)
	var buf bytes.Buffer
	if _, err := Build(&buf, dir, baseManifest(1), &key); err != nil {
		t.Fatal(err)
	}
	r, err := Unpack(context.Background(), &buf, t.TempDir(), policy(key))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{"run.sh": 0o755, "secret": 0o600} {
		fi, err := os.Stat(filepath.Join(r.Dir, name))
		if err != nil || fi.Mode().Perm() != want {
			t.Fatalf("%s: mode %v, want %v (%v)", name, fi.Mode().Perm(), want, err)
		}
	}
}

func TestSeveralTrustedKeys(t *testing.T) {
	old, cur := mustKey(t), mustKey(t)
	b := buildBundle(t, &cur, baseManifest(3), sampleFiles)
	_, id, err := Verify(context.Background(), bytes.NewReader(b), policy(old, cur))
	if err != nil || id != cur.ID {
		t.Fatalf("Verify with two trusted keys: %s %v", id, err)
	}
}

func TestSignBundleLater(t *testing.T) {
	key := mustKey(t)
	unsigned := buildBundle(t, nil, baseManifest(5), sampleFiles)
	if _, _, err := Verify(context.Background(), bytes.NewReader(unsigned), policy(key)); !errors.Is(err, ErrUnsigned) {
		t.Fatalf("unsigned bundle: %v", err)
	}
	m, signed, err := Inspect(context.Background(), bytes.NewReader(unsigned))
	if err != nil || signed || m.Version != 5 {
		t.Fatalf("Inspect: %v %v %v", m, signed, err)
	}
	var out bytes.Buffer
	if _, err := SignBundle(context.Background(), bytes.NewReader(unsigned), &out, key); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Verify(context.Background(), bytes.NewReader(out.Bytes()), policy(key)); err != nil {
		t.Fatalf("after SignBundle: %v", err)
	}
	// Re-signing with another key replaces the signature.
	other := mustKey(t)
	var out2 bytes.Buffer
	if _, err := SignBundle(context.Background(), bytes.NewReader(out.Bytes()), &out2, other); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Verify(context.Background(), bytes.NewReader(out2.Bytes()), policy(key)); err == nil {
		t.Fatal("re-signed bundle still verified with the old key")
	}
	if _, _, err := Verify(context.Background(), bytes.NewReader(out2.Bytes()), policy(other)); err != nil {
		t.Fatal(err)
	}
}

func TestBuildRefusesSymlinks(t *testing.T) {
	dir := writeTree(t, map[string]string{"a": "a"})
	if err := os.Symlink("/etc/passwd", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	_, err := Build(&bytes.Buffer{}, dir, baseManifest(1), nil)
	if err == nil || !strings.Contains(err.Error(), "link") || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("Build with a symlink: %v", err)
	}
}

// entry is one raw tar entry of a hand-made bundle.
type entry struct {
	hdr  tar.Header
	data string
}

func reg(name, data string) entry {
	return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data))}, data: data}
}

func tarSymlink(name, target string) tar.Header {
	return tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target}
}

func fileOf(p, data string) File {
	sum := sha256.Sum256([]byte(data))
	return File{Path: p, Size: int64(len(data)), Mode: 0o644, SHA256: hex.EncodeToString(sum[:])}
}

// craft writes a bundle by hand: the manifest m (signed by key when not
// nil), then the given entries as they are, so that tests can make every
// kind of bad bundle.
func craft(t testing.TB, key *PrivateKey, m Manifest, entries []entry) []byte {
	t.Helper()
	m.Format = FormatVersion
	raw, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return craftRaw(t, raw, key, entries, nil)
}

func craftRaw(t testing.TB, raw []byte, key *PrivateKey, entries []entry, trailer []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	head := []entry{reg(ManifestName, string(raw))}
	if key != nil {
		head = append(head, reg(SignatureName, string(Sign(*key, raw))))
	}
	for _, e := range append(head, entries...) {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	gz.Write(trailer)
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestRejects feeds bad bundles to Unpack on a machine whose current
// release is version 1, and checks that each is refused with an error that
// says why, and that the machine is left exactly as it was.
func TestRejects(t *testing.T) {
	key := mustKey(t)
	good := buildBundle(t, &key, baseManifest(2), sampleFiles)
	withFiles := func(v uint64, fs ...File) Manifest {
		m := baseManifest(v)
		m.Files = fs
		return m
	}
	expired := baseManifest(2)
	expired.Created = time.Now().Add(-48 * time.Hour)
	expired.Expires = time.Now().Add(-time.Hour)
	otherRole := baseManifest(2)
	otherRole.Role = "client"
	wrongKey := mustKey(t)
	bigTrailer := make([]byte, 64<<20) // zeros: compresses to almost nothing

	cases := []struct {
		name   string
		bundle []byte
		limits Limits
		want   string
	}{
		{"unsigned", buildBundle(t, nil, baseManifest(2), sampleFiles), Limits{}, "not signed"},
		{"wrong key", buildBundle(t, &wrongKey, baseManifest(2), sampleFiles), Limits{}, `signature: not made by any trusted key: signed with key "` + wrongKey.ID + `"; the trusted keys are ` + key.ID},
		{"tampered file", craft(t, &key, withFiles(2, fileOf("a.conf", "port = 1")), []entry{reg("a.conf", "port = 2")}), Limits{}, `file "a.conf": sha256`},
		{"tampered manifest", func() []byte {
			m := withFiles(2, fileOf("a.conf", "x"))
			m.Format = FormatVersion
			raw, _ := m.Marshal()
			sig := Sign(key, raw)
			m.Variables = map[string]string{"evil": "1"}
			raw2, _ := m.Marshal()
			var buf bytes.Buffer
			gz := gzip.NewWriter(&buf)
			tw := tar.NewWriter(gz)
			for _, e := range []entry{reg(ManifestName, string(raw2)), reg(SignatureName, string(sig)), reg("a.conf", "x")} {
				tw.WriteHeader(&e.hdr)
				tw.Write([]byte(e.data))
			}
			tw.Close()
			gz.Close()
			return buf.Bytes()
		}(), Limits{}, "signature does not verify with key " + key.ID + ": the bundle was changed after signing"},
		{"replayed older version", buildBundle(t, &key, baseManifest(1), sampleFiles), Limits{}, "not greater than the last accepted 1"},
		{"expired", buildBundle(t, &key, expired, sampleFiles), Limits{}, "expired"},
		{"other role", buildBundle(t, &key, otherRole, sampleFiles), Limits{}, `role "client"`},
		{"truncated in a file", good[:len(good)/2], Limits{}, "unexpected EOF"},
		{"truncated at the end", good[:len(good)-6], Limits{}, "unexpected EOF"},
		{"truncated in the gzip header", good[:5], Limits{}, "unexpected EOF"},
		{"empty", nil, Limits{}, "unexpected EOF"},
		{"not gzip", []byte("<html>502 Bad Gateway</html>"), Limits{}, "not a gzip stream"},
		{"dotdot path", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{reg("a", "a"), reg("../escape", "x")}), Limits{}, `"../escape": ".." is refused`},
		{"dotdot in manifest", func() []byte {
			raw := []byte(`{"format":1,"cluster":"prod","role":"server","version":2,"expires":"2999-01-01T00:00:00Z","files":[{"path":"a/../../x","size":1,"mode":"0644","sha256":"` + strings.Repeat("0", 64) + `"}]}`)
			return craftRaw(t, raw, &key, nil, nil)
		}(), Limits{}, "path traversal"},
		{"absolute path", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{reg("a", "a"), reg("/etc/cron.d/x", "x")}), Limits{}, "absolute paths are refused"},
		{"symlink escape", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{
			{hdr: tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "/etc"}},
			reg("a", "a"),
		}), Limits{}, `"link": symlink to "/etc" refused`},
		{"symlink then write through it", craft(t, &key, withFiles(2, fileOf("d/x", "x")), []entry{
			{hdr: tar.Header{Name: "d", Typeflag: tar.TypeSymlink, Linkname: "../../.."}},
			reg("d/x", "x"),
		}), Limits{}, "symlink"},
		{"hard link", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{
			{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "/etc/shadow"}},
		}), Limits{}, "hard link"},
		{"fifo", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{{hdr: tar.Header{Name: "a", Typeflag: tar.TypeFifo}}}), Limits{}, "device or fifo"},
		{"device", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{{hdr: tar.Header{Name: "a", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}}}), Limits{}, "device or fifo"},
		{"directory entry", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{{hdr: tar.Header{Name: "dir/", Typeflag: tar.TypeDir, Mode: 0o755}}}), Limits{}, "not clean"},
		{"file not in manifest", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{reg("a", "a"), reg("extra", "x")}), Limits{}, `"extra" is not in the manifest`},
		{"manifest file missing", craft(t, &key, withFiles(2, fileOf("a", "a"), fileOf("b", "b")), []entry{reg("a", "a")}), Limits{}, `"b" is in the manifest but not in the bundle`},
		{"file twice", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{reg("a", "a"), reg("a", "a")}), Limits{}, "appears twice"},
		{"size differs from manifest", craft(t, &key, withFiles(2, fileOf("a", "a")), []entry{reg("a", "aa")}), Limits{}, "size 2, manifest says 1"},
		{"manifest not first", func() []byte {
			var buf bytes.Buffer
			gz := gzip.NewWriter(&buf)
			tw := tar.NewWriter(gz)
			e := reg("a", "a")
			tw.WriteHeader(&e.hdr)
			tw.Write([]byte(e.data))
			tw.Close()
			gz.Close()
			return buf.Bytes()
		}(), Limits{}, `first entry is "a"`},
		{"bomb: declared too big", craft(t, &key, withFiles(2, File{Path: "big", Size: 1 << 40, Mode: 0o644, SHA256: strings.Repeat("0", 64)}), nil), Limits{}, `"big": 1099511627776 bytes, more than the limit`},
		{"bomb: too many files", craft(t, &key, withFiles(2, fileOf("a", "a"), fileOf("b", "b"), fileOf("c", "c")), nil), Limits{MaxFiles: 2}, "3 files, more than the limit of 2"},
		{"bomb: total too big", craft(t, &key, withFiles(2, fileOf("a", strings.Repeat("a", 600)), fileOf("b", strings.Repeat("b", 600))), nil), Limits{MaxTotalBytes: 1000}, "add up to more than the limit"},
		{"bomb: hidden after the last entry", craftRaw(t, mustMarshal(t, withFiles(2, fileOf("a", "a"))), &key, []entry{reg("a", "a")}, bigTrailer), Limits{}, "decompression bomb"},
		{"bomb: past the stream budget", craftRaw(t, mustMarshal(t, withFiles(2, fileOf("a", "a"))), &key, []entry{reg("a", "a")}, bigTrailer), Limits{MaxFiles: 10, MaxTotalBytes: 1 << 20}, "decompression bomb"},
	}
	// What a cut download gives may pass on another try; everything else
	// is the bundle's fault and final.
	mayPass := map[string]bool{"truncated in a file": true, "truncated at the end": true, "truncated in the gzip header": true, "empty": true}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rel := t.TempDir()
			if _, err := Unpack(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), map[string]string{"v1": "one"})), rel, policy(key)); err != nil {
				t.Fatal(err)
			}
			if err := Activate(rel, 1); err != nil {
				t.Fatal(err)
			}
			p := policy(key)
			p.After = 1
			p.Limits = tc.limits
			r, err := Unpack(context.Background(), bytes.NewReader(tc.bundle), rel, p)
			if err == nil {
				t.Fatalf("accepted: %+v", r)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
			var invalid *InvalidError
			if final := errors.As(err, &invalid); final == mayPass[tc.name] {
				t.Fatalf("error %q: InvalidError (final) = %v, want %v", err, final, !mayPass[tc.name])
			}
			t.Logf("refused: %v", err)
			assertOnlyV1(t, rel)
		})
	}
}

func mustMarshal(t testing.TB, m Manifest) []byte {
	t.Helper()
	m.Format = FormatVersion
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// assertOnlyV1 checks that a releases directory holds release 1, current,
// and nothing else: no half-unpacked release, no temporary directory.
func assertOnlyV1(t *testing.T, rel string) {
	t.Helper()
	ents, err := os.ReadDir(rel)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"1", "current"}) {
		t.Fatalf("releases dir holds %v, want [1 current]", names)
	}
	v, _, err := Current(rel)
	if err != nil || v != 1 {
		t.Fatalf("current = %d, %v", v, err)
	}
	if b, err := os.ReadFile(filepath.Join(rel, "current", "v1")); err != nil || string(b) != "one" {
		t.Fatalf("current/v1 = %q, %v", b, err)
	}
}

func TestManifestValidation(t *testing.T) {
	ok := baseManifest(1)
	ok.Format = FormatVersion
	ok.Files = []File{fileOf("a.tmpl", "x"), fileOf("dir/b", "y")}
	ok.Templates = []string{"a.tmpl"}
	if _, err := ok.Marshal(); err != nil {
		t.Fatalf("valid manifest: %v", err)
	}
	cases := map[string]func(m *Manifest){
		"format":               func(m *Manifest) { m.Format = 2 },
		"cluster name":         func(m *Manifest) { m.Cluster = "../x" },
		"version 0":            func(m *Manifest) { m.Version = 0 },
		"no expiry":            func(m *Manifest) { m.Expires = time.Time{} },
		"duplicate path":       func(m *Manifest) { m.Files = append(m.Files, fileOf("a.tmpl", "z")) },
		"file is a dir":        func(m *Manifest) { m.Files = append(m.Files, fileOf("dir", "z")) },
		"bad hash":             func(m *Manifest) { m.Files[0].SHA256 = "abc" },
		"mode bits":            func(m *Manifest) { m.Files[0].Mode = 0o4755 },
		"template not a file":  func(m *Manifest) { m.Templates = []string{"nope.tmpl"} },
		"template suffix":      func(m *Manifest) { m.Templates = []string{"dir/b"} },
		"template overwrites":  func(m *Manifest) { m.Files = append(m.Files, fileOf("a", "z")) },
		"service not a file":   func(m *Manifest) { m.Services = []string{"x.json"} },
		"artifact both":        func(m *Manifest) { m.Artifacts = []Artifact{{Product: "nomad", Version: "1", Store: "s", URL: "u"}} },
		"artifact url no hash": func(m *Manifest) { m.Artifacts = []Artifact{{Product: "nomad", Version: "1", URL: "u"}} },
		"reserved name":        func(m *Manifest) { m.Files = append(m.Files, fileOf(SignatureName, "z")) },
	}
	for name, mut := range cases {
		m := ok
		m.Files = slices.Clone(ok.Files)
		mut(&m)
		if _, err := m.Marshal(); err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := ParseManifest([]byte(`{"format":1,"surprise":true}`)); err == nil || !strings.Contains(err.Error(), "surprise") {
		t.Errorf("unknown field: %v", err)
	}
	if _, err := ParseManifest(append(mustMarshal(t, ok), []byte("{}")...)); err == nil {
		t.Error("trailing data accepted")
	}
}

func TestKeyFiles(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t)
	privName, pubName, err := WriteKeyPair(filepath.Join(dir, "ops"), k)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(privName)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key mode %v", fi.Mode().Perm())
	}
	if _, _, err := WriteKeyPair(filepath.Join(dir, "ops"), k); err == nil {
		t.Fatal("overwrote an existing key")
	}
	k2, err := ReadPrivateKeyFile(privName)
	if err != nil || k2.ID != k.ID {
		t.Fatalf("read private key: %v", err)
	}
	pubs, err := ReadPublicKeyFiles(pubName)
	if err != nil || pubs[0].ID != k.ID || !pubs[0].Key.Equal(k.Public().Key) {
		t.Fatalf("read public key: %v", err)
	}
	os.Chmod(privName, 0o644)
	if _, err := ReadPrivateKeyFile(privName); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable private key: %v", err)
	}
	if _, err := ReadPublicKeyFiles(privName); err == nil {
		t.Fatal("a private key file was read as a public key")
	}
}

func TestAccepted(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	if v, err := LoadAccepted(dir); err != nil || v != 0 {
		t.Fatalf("fresh: %d %v", v, err)
	}
	if err := SaveAccepted(dir, 10); err != nil {
		t.Fatal(err)
	}
	if err := SaveAccepted(dir, 9); err == nil {
		t.Fatal("lowered the accepted version")
	}
	if v, err := LoadAccepted(dir); err != nil || v != 10 {
		t.Fatalf("after save: %d %v", v, err)
	}
	os.WriteFile(filepath.Join(dir, acceptedName), []byte("garbage"), 0o600)
	if _, err := LoadAccepted(dir); err == nil {
		t.Fatal("garbage accepted version read without error")
	}
}

func TestPrune(t *testing.T) {
	key := mustKey(t)
	rel := t.TempDir()
	for v := uint64(1); v <= 6; v++ {
		if _, err := Unpack(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(v), map[string]string{"f": "x"})), rel, policy(key)); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(filepath.Join(rel, tmpPrefix+"leftover"), 0o755)
	if err := Activate(rel, 5); err != nil {
		t.Fatal(err)
	}
	if err := Remove(rel, 5); err == nil {
		t.Fatal("removed the current release")
	}
	removed, err := Prune(rel, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []uint64{1, 2}) {
		t.Fatalf("removed %v, want [1 2]", removed)
	}
	vs, _ := Releases(rel)
	if !slices.Equal(vs, []uint64{3, 4, 5, 6}) {
		t.Fatalf("left %v, want [3 4 5 6] (6 is newer than current and may be pending)", vs)
	}
	if _, err := os.Stat(filepath.Join(rel, tmpPrefix+"leftover")); !os.IsNotExist(err) {
		t.Fatal("unfinished unpack left behind")
	}
	// Rolling back is activating an older release.
	if err := Activate(rel, 4); err != nil {
		t.Fatal(err)
	}
	if v, _, _ := Current(rel); v != 4 {
		t.Fatalf("current %d after rollback", v)
	}
}
