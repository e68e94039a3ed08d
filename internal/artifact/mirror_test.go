package artifact

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The unsigned index.json may name any file; the fetch uses the names
// derived from product, version, OS and arch, and so gets 1.10.5.
func TestFetchIgnoresNamesFromTheIndex(t *testing.T) {
	ts := newTestStore(t)
	vdir := filepath.Join(ts.dir, "nomad", "1.10.5")
	var vi VersionIndex
	readJSON(t, filepath.Join(vdir, "index.json"), &vi)
	vi.Shasums = "../1.9.3/nomad_1.9.3_SHA256SUMS"
	vi.ShasumsSignature = "../1.9.3/nomad_1.9.3_SHA256SUMS.sig"
	vi.ShasumsSignatures = []string{vi.ShasumsSignature}
	vi.Builds[0].Filename = "nomad_1.9.3_linux_amd64.zip"
	vi.Builds[0].URL = "../1.9.3/nomad_1.9.3_linux_amd64.zip"
	if err := writeJSON(filepath.Join(vdir, "index.json"), vi); err != nil {
		t.Fatal(err)
	}
	p, err := quietFetcher(t).Fetch(context.Background(), ts.srv.URL, "nomad", "1.10.5", "linux", "amd64", ts.keyring)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "#!/bin/sh\necho Nomad v1.10.5\n" {
		t.Errorf("fetched %q for 1.10.5", b)
	}
	for _, path := range []string{"/nomad/1.10.5/index.json", sumsPath, sumsPath + ".sig", zipPath} {
		if n := ts.hitCount(path); n != 0 {
			t.Errorf("%s requested %d times", path, n)
		}
	}
}

// A mirror serving 1.9.3's genuinely signed files at 1.10.5's paths, or
// an index pointing 1.10.5 at them, never gets 1.9.3 installed as 1.10.5.
func TestFetchRefusesAnotherVersionsSignedFiles(t *testing.T) {
	ctx := context.Background()
	t.Run("files", func(t *testing.T) {
		ts := newTestStore(t)
		old := filepath.Join(ts.dir, "nomad", "1.9.3")
		vdir := filepath.Join(ts.dir, "nomad", "1.10.5")
		for from, to := range map[string]string{
			"nomad_1.9.3_SHA256SUMS":      "nomad_1.10.5_SHA256SUMS",
			"nomad_1.9.3_SHA256SUMS.sig":  "nomad_1.10.5_SHA256SUMS.sig",
			"nomad_1.9.3_linux_amd64.zip": "nomad_1.10.5_linux_amd64.zip",
		} {
			b, err := os.ReadFile(filepath.Join(old, from))
			if err != nil {
				t.Fatal(err)
			}
			mustWrite(t, filepath.Join(vdir, to), b)
		}
		f := quietFetcher(t)
		_, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.10.5", "linux", "amd64", ts.keyring)
		if !errors.Is(err, errVerify) || !strings.Contains(err.Error(), "another version's files") ||
			!strings.Contains(err.Error(), "lists nomad_1.9.3_linux_amd64.zip, not nomad_1.10.5_linux_amd64.zip") {
			t.Fatalf("1.9.3's files under 1.10.5: err = %v", err)
		}
		if n := ts.hitCount("/nomad/1.10.5/nomad_1.10.5_linux_amd64.zip"); n != 0 {
			t.Errorf("the archive was downloaded %d times", n)
		}
		assertNothingInstalled(t, f)
	})
	t.Run("index", func(t *testing.T) {
		ts := newTestStore(t)
		vdir := filepath.Join(ts.dir, "nomad", "1.10.5")
		for _, n := range []string{"nomad_1.10.5_SHA256SUMS", "nomad_1.10.5_SHA256SUMS.sig", "nomad_1.10.5_linux_amd64.zip"} {
			if err := os.Remove(filepath.Join(vdir, n)); err != nil {
				t.Fatal(err)
			}
		}
		var vi VersionIndex
		readJSON(t, filepath.Join(vdir, "index.json"), &vi)
		vi.Shasums = "../1.9.3/nomad_1.9.3_SHA256SUMS"
		vi.ShasumsSignature = "../1.9.3/nomad_1.9.3_SHA256SUMS.sig"
		vi.Builds[0].Filename = "nomad_1.9.3_linux_amd64.zip"
		vi.Builds[0].URL = "../1.9.3/nomad_1.9.3_linux_amd64.zip"
		if err := writeJSON(filepath.Join(vdir, "index.json"), vi); err != nil {
			t.Fatal(err)
		}
		f := quietFetcher(t)
		_, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.10.5", "linux", "amd64", ts.keyring)
		if err == nil || !strings.Contains(err.Error(), "nomad_1.10.5_SHA256SUMS: 404") {
			t.Fatalf("index pointing 1.10.5 at 1.9.3: err = %v", err)
		}
		assertNothingInstalled(t, f)
	})
}

func assertNothingInstalled(t *testing.T, f *Fetcher) {
	t.Helper()
	installed, _ := os.ReadDir(filepath.Join(f.CacheDir, "fetch", "sha256"))
	if len(installed) != 0 {
		t.Errorf("something was installed: %v", installed)
	}
}
