package bundle

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ed25519"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fuzzKey is fixed so that seeds signed by it stay valid across runs.
func fuzzKey() PrivateKey {
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))
	return PrivateKey{ID: KeyID(priv.Public().(ed25519.PublicKey)), Key: priv}
}

func fuzzManifest(v uint64) Manifest {
	m := baseManifest(v)
	m.Created = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m.Expires = time.Date(2999, 1, 1, 0, 0, 0, 0, time.UTC)
	return m
}

func FuzzManifest(f *testing.F) {
	m := fuzzManifest(3)
	m.Format = FormatVersion
	m.Files = []File{fileOf("a.tmpl", "x"), fileOf("services/a.json", "{}"), fileOf("d/e/f", "")}
	m.Templates = []string{"a.tmpl"}
	m.Services = []string{"services/a.json"}
	m.Variables = map[string]string{"k": "v"}
	m.Artifacts = []Artifact{{Product: "nomad", Version: "1.9.3", Store: "https://releases.example"}, {Product: "x", Version: "1", URL: "http://127.0.0.1/x", SHA256: fileOf("x", "x").SHA256}}
	good, err := m.Marshal()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"format":1,"cluster":"c","role":"r","version":1,"expires":"2999-01-01T00:00:00Z","files":[{"path":"../x","size":1,"mode":"0644","sha256":""}]}`))
	f.Add([]byte(`{"format":1,"files":[{"mode":"07777"}]}`))
	f.Add([]byte(`[1,2,3]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err != nil {
			return
		}
		// What parses must survive a round trip and name only safe paths.
		out, err := m.Marshal()
		if err != nil {
			t.Fatalf("parsed manifest does not marshal: %v", err)
		}
		if _, err := ParseManifest(out); err != nil {
			t.Fatalf("re-marshalled manifest does not parse: %v", err)
		}
		for _, f := range m.Files {
			if CheckPath(f.Path) != nil || !filepath.IsLocal(f.Path) {
				t.Fatalf("unsafe path %q accepted", f.Path)
			}
		}
	})
}

func FuzzUnpack(f *testing.F) {
	key := fuzzKey()
	files := map[string]string{"a.conf": "a", "services/x.json": "{}", "d/e.tmpl": "{{ .Machine.Name }}"}
	f.Add(buildBundle(f, &key, fuzzManifest(2), files))
	f.Add(buildBundle(f, nil, fuzzManifest(2), files))
	f.Add(craft(f, &key, func() Manifest { m := fuzzManifest(2); m.Files = []File{fileOf("a", "a")}; return m }(),
		[]entry{reg("a", "a"), reg("../x", "x"), {hdr: tarSymlink("l", "/etc")}}))
	f.Add([]byte{0x1f, 0x8b})
	// The same bundles as plain tar streams: the target gzips input that
	// is not gzip already, so that mutations reach the tar and entry
	// checks instead of dying in the gzip checksum.
	for _, b := range [][]byte{
		buildBundle(f, &key, fuzzManifest(2), files),
		craft(f, &key, func() Manifest {
			m := fuzzManifest(2)
			m.Files = []File{fileOf("a", "a"), fileOf("d/b", "b")}
			return m
		}(),
			[]entry{reg("a", "a"), reg("d/b", "b")}),
	} {
		f.Add(gunzip(f, b))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if !bytes.HasPrefix(b, []byte{0x1f, 0x8b}) {
			var buf bytes.Buffer
			gz := gzip.NewWriter(&buf)
			gz.Write(b)
			gz.Close()
			b = buf.Bytes()
		}
		parent := fastTempDir(t)
		rel := filepath.Join(parent, "releases")
		p := Policy{Keys: []PublicKey{key.Public()}, Now: time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC),
			Limits: Limits{MaxFiles: 64, MaxFileBytes: 1 << 20, MaxTotalBytes: 4 << 20}}
		ctx := context.Background()
		// The real path (signature required), then the unpacker alone.
		Unpack(ctx, bytes.NewReader(b), rel, p)
		unpack(ctx, bytes.NewReader(b), rel, readOptions{policy: p})
		ents, err := os.ReadDir(parent)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if e.Name() != "releases" {
				t.Fatalf("unpack wrote %q outside the releases directory", e.Name())
			}
		}
		filepath.WalkDir(rel, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() && !d.Type().IsRegular() {
				t.Fatalf("unpack made %s, a %s", path, d.Type())
			}
			if rp, _ := filepath.Rel(rel, path); !filepath.IsLocal(rp) && rp != "." {
				t.Fatalf("unpack wrote %s outside %s", path, rel)
			}
			return nil
		})
	})
}

// fastTempDir is a temporary directory on tmpfs when there is one: the
// unpacker fsyncs every file, which on a busy disk makes fuzzing crawl.
func fastTempDir(t *testing.T) string {
	dir, err := os.MkdirTemp("/dev/shm", "steppe-fuzz-")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func gunzip(tb testing.TB, b []byte) []byte {
	gz, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		tb.Fatal(err)
	}
	out, err := io.ReadAll(gz)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}
