package artifact

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A cached binary that was truncated, overwritten or never recorded is
// fetched again, never returned.
func TestFetchRefetchesDamagedCachedBinary(t *testing.T) {
	ts := newTestStore(t)
	f := quietFetcher(t)
	ctx := context.Background()
	const want = "#!/bin/sh\necho Nomad v1.9.3\n"
	p, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(filepath.Dir(p), ".nomad.sha256")
	damages := []struct {
		name string
		do   func() error
	}{
		{"truncated", func() error { return os.Truncate(p, 5) }},
		{"overwritten, same size", func() error {
			return os.WriteFile(p, []byte(strings.Replace(want, "1.9.3", "6.6.6", 1)), 0o755)
		}},
		{"no digest record (an older cache)", func() error { return os.Remove(marker) }},
	}
	for i, d := range damages {
		if err := d.do(); err != nil {
			t.Fatal(err)
		}
		p2, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
		if err != nil {
			t.Fatalf("%s: %v", d.name, err)
		}
		if p2 != p {
			t.Errorf("%s: path %s, want %s", d.name, p2, p)
		}
		got, _ := os.ReadFile(p2)
		if string(got) != want {
			t.Errorf("%s: Fetch returned a binary holding %q", d.name, got)
		}
		if err := verifyInstalled(filepath.Dir(p2), "nomad"); err != nil {
			t.Errorf("%s: after the re-fetch: %v", d.name, err)
		}
		if n := ts.hitCount(zipPath); n != i+2 {
			t.Errorf("%s: archive downloaded %d times, want %d", d.name, n, i+2)
		}
	}
	if left, _ := os.ReadDir(filepath.Join(f.CacheDir, "fetch", "tmp")); len(left) != 0 {
		t.Errorf("fetch/tmp holds %d leftovers", len(left))
	}
	rec, err := os.ReadFile(marker)
	if want := sha256Hex([]byte(want)) + "  nomad\n"; err != nil || string(rec) != want {
		t.Errorf("digest record %q (%v), want %q", rec, err, want)
	}
	// An intact cache is used as is.
	if _, err := f.Fetch(ctx, ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring); err != nil {
		t.Fatal(err)
	}
	if n := ts.hitCount(zipPath); n != len(damages)+1 {
		t.Errorf("an intact cached binary was downloaded again (%d downloads)", n)
	}
}

// An archive whose digest is signed but whose entry fails its CRC-32 is
// refused after part of the binary was written out: nothing appears under
// the digest and nothing is left behind.
func TestFetchFailedExtractionLeavesNothingUnderDigest(t *testing.T) {
	ts := newTestStore(t)
	vdir := filepath.Join(ts.dir, "nomad", "1.9.3")
	zipFile := filepath.Join(vdir, "nomad_1.9.3_linux_amd64.zip")
	data, err := os.ReadFile(zipFile)
	if err != nil {
		t.Fatal(err)
	}
	cd := bytes.Index(data, []byte("PK\x01\x02")) // the central directory's entry
	if cd < 0 {
		t.Fatal("no central directory in the archive")
	}
	crc := binary.LittleEndian.Uint32(data[cd+16:])
	binary.LittleEndian.PutUint32(data[cd+16:], crc^0xffffffff)
	mustWrite(t, zipFile, data)
	sums := []byte(sha256Hex(data) + "  nomad_1.9.3_linux_amd64.zip\n")
	sig, err := signDetached(ts.key, sums)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(vdir, "nomad_1.9.3_SHA256SUMS"), sums)
	mustWrite(t, filepath.Join(vdir, "nomad_1.9.3_SHA256SUMS.sig"), sig)

	f := quietFetcher(t)
	_, err = f.Fetch(context.Background(), ts.srv.URL, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("entry with a bad CRC-32: err = %v", err)
	}
	assertNothingInstalled(t, f)
	if left, _ := os.ReadDir(filepath.Join(f.CacheDir, "fetch", "tmp")); len(left) != 0 {
		t.Errorf("fetch/tmp holds %d leftovers", len(left))
	}
}
