package artifact

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/steppe/steppe/internal/atomicfile"
)

// The agent's cache of fetched binaries, under Fetcher.CacheDir:
//
//	fetch/sha256/DIGEST/NAME          the binary of the archive whose SHA-256 is DIGEST
//	fetch/sha256/DIGEST/.NAME.sha256  the binary's own SHA-256 ("HEX  NAME"), recorded at install
//	fetch/tmp/                        downloads in progress
//
// DIGEST/ appears by one rename of a directory whose files were fsynced
// first, so neither a reader nor a crash can see it with a partial binary.
//
// A cache hit re-hashes the binary against the recorded digest rather than
// trusting a marker of its size and times: 88 MB of Nomad hash here in
// about 0.1 s, a hit happens once per artifact per bundle the agent
// prepares (not at each daemon restart), and only a hash catches a
// same-size overwrite or a block the disk returns damaged.

func (f *Fetcher) cacheDir() (string, error) {
	if f.CacheDir != "" {
		return f.CacheDir, nil
	}
	return DefaultCacheDir()
}

// install makes fetch/sha256/DIGEST/NAME exist and hold a verified binary:
// it downloads the archive to a temporary file while hashing it, checks the
// digest, extracts the binary into a temporary directory with the record
// of its digest, syncs both, and renames the directory into place. A cached
// copy that no longer matches its record is replaced.
func (f *Fetcher) install(ctx context.Context, rawURL, digest, name string) (string, bool, error) {
	cache, err := f.cacheDir()
	if err != nil {
		return "", false, err
	}
	final := filepath.Join(cache, "fetch", "sha256", digest)
	bin := filepath.Join(final, name)
	damaged := false
	if _, err := os.Lstat(final); err == nil {
		verr := verifyInstalled(final, name)
		if verr == nil {
			return bin, false, nil
		}
		damaged = true
		f.logger().Warn("cached artifact does not match what was verified, fetching it again", "path", bin, "err", verr)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", false, fmt.Errorf("artifact cache: %w", err)
	}
	tmpRoot := filepath.Join(cache, "fetch", "tmp")
	if err := os.MkdirAll(tmpRoot, 0o755); err != nil {
		return "", false, fmt.Errorf("artifact cache: %w", err)
	}
	tmpDir, err := os.MkdirTemp(tmpRoot, digest[:12]+"-")
	if err != nil {
		return "", false, fmt.Errorf("artifact cache: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	// The download itself is not synced: it is only read from, below.
	download := filepath.Join(tmpDir, "download")
	if err := f.retry(ctx, rawURL, func() error { return f.downloadTo(ctx, rawURL, download, digest) }); err != nil {
		return "", false, err
	}
	content := filepath.Join(tmpDir, "out")
	if err := os.Mkdir(content, 0o755); err != nil {
		return "", false, fmt.Errorf("artifact cache: %w", err)
	}
	sum, err := placeBinary(download, filepath.Join(content, name), name)
	if err != nil {
		return "", false, err
	}
	// atomicfile syncs the record and content/ itself, so the directory
	// is complete on disk before the rename below can be.
	if err := atomicfile.WriteFile(filepath.Join(content, markerName(name)), []byte(sum+"  "+name+"\n"), 0o644); err != nil {
		return "", false, fmt.Errorf("record digest of %s: %w", name, err)
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o755); err != nil {
		return "", false, fmt.Errorf("artifact cache: %w", err)
	}
	if damaged {
		// Into tmpDir, which goes when this returns; a daemon running the
		// old file keeps its inode.
		if err := os.Rename(final, filepath.Join(tmpDir, "damaged")); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", false, fmt.Errorf("move damaged %s aside: %w", final, err)
		}
	}
	if err := os.Rename(content, final); err != nil {
		// Another fetch of the same digest won the race; its copy is
		// identical by construction, and checked.
		if verifyInstalled(final, name) == nil {
			return bin, true, nil
		}
		return "", false, fmt.Errorf("install %s: %w", final, err)
	}
	// Makes the new entry durable; were it lost in a crash, the next
	// fetch would just download again.
	if err := atomicfile.SyncDir(filepath.Dir(final)); err != nil {
		return "", false, fmt.Errorf("install %s: %w", final, err)
	}
	return bin, true, nil
}

func markerName(name string) string { return "." + name + ".sha256" }

// verifyInstalled fails unless dir holds the binary name with the digest
// recorded when it was installed.
func verifyInstalled(dir, name string) error {
	rec, err := os.ReadFile(filepath.Join(dir, markerName(name)))
	if err != nil {
		return fmt.Errorf("no record of the binary's digest: %w", err)
	}
	fields := strings.Fields(string(rec))
	if len(fields) != 2 || fields[1] != name || len(fields[0]) != 64 {
		return fmt.Errorf("malformed digest record %s: %q", markerName(name), rec)
	}
	bin := filepath.Join(dir, name)
	st, err := os.Lstat(bin)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", bin)
	}
	got, err := sha256File(bin)
	if err != nil {
		return err
	}
	if got != fields[0] {
		return fmt.Errorf("%s has sha256 %s (%d bytes), recorded at install as %s", bin, got, st.Size(), fields[0])
	}
	return nil
}

// placeBinary writes the binary a verified download holds to dst, synced
// and executable, and returns its SHA-256: the zip entry called name
// (HashiCorp's archives hold the binary at the top level, sometimes with
// a license file beside it), or the download itself when it is no zip.
func placeBinary(download, dst, name string) (string, error) {
	h := sha256.New()
	write := func(src io.Reader) error {
		return atomicfile.Write(dst, 0o755, func(w io.Writer) error {
			_, err := io.Copy(io.MultiWriter(w, h), src)
			return err
		})
	}
	if !isZip(download) {
		in, err := os.Open(download)
		if err != nil {
			return "", err
		}
		defer in.Close()
		if err := write(in); err != nil {
			return "", fmt.Errorf("install %s: %w", name, err)
		}
		return hex.EncodeToString(h.Sum(nil)), nil
	}
	zr, err := zip.OpenReader(download)
	if err != nil {
		return "", fmt.Errorf("%w: open archive: %v", errVerify, err)
	}
	defer zr.Close()
	var names []string
	for _, zf := range zr.File {
		names = append(names, zf.Name)
		if zf.Name != name {
			continue
		}
		rc, err := zf.Open()
		if err != nil {
			return "", fmt.Errorf("extract %s: %w", name, err)
		}
		defer rc.Close()
		if err := write(rc); err != nil {
			return "", fmt.Errorf("extract %s: %w", name, err)
		}
		return hex.EncodeToString(h.Sum(nil)), nil
	}
	return "", fmt.Errorf("archive has no %q (entries: %s)", name, strings.Join(names, ", "))
}

func isZip(path string) bool {
	fh, err := os.Open(path)
	if err != nil {
		return false
	}
	defer fh.Close()
	magic := make([]byte, 4)
	if _, err := io.ReadFull(fh, magic); err != nil {
		return false
	}
	return bytes.Equal(magic, []byte("PK\x03\x04"))
}
