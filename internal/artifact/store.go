package artifact

import (
	"archive/zip"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/steppe/steppe/internal/atomicfile"
	"golang.org/x/sys/unix"
)

// The operator's side of the store: publish writes the layout that
// layout.go describes. The indexes below are for discovery by people and
// tools; the agent never reads them (they are unsigned).

// ProductIndex is DIR/PRODUCT/index.json, shaped like
// https://releases.hashicorp.com/PRODUCT/index.json.
type ProductIndex struct {
	Name     string                  `json:"name"`
	Versions map[string]VersionIndex `json:"versions"`
}

// VersionIndex is DIR/PRODUCT/VERSION/index.json, shaped like
// https://releases.hashicorp.com/PRODUCT/VERSION/index.json.
type VersionIndex struct {
	Name              string   `json:"name"`
	Version           string   `json:"version"`
	Shasums           string   `json:"shasums"`
	ShasumsSignature  string   `json:"shasums_signature"`
	ShasumsSignatures []string `json:"shasums_signatures,omitempty"`
	Builds            []Build  `json:"builds"`
}

// Build is one archive of a version.
type Build struct {
	Name     string `json:"name"`
	Version  string `json:"version"`
	OS       string `json:"os"`
	Arch     string `json:"arch"`
	Filename string `json:"filename"`
	URL      string `json:"url"`
}

// Published describes one version in a store.
type Published struct {
	Dir           string // the store
	Archive       string // path of the zip
	ArchiveSHA256 string
	Shasums       string // path of the SHA256SUMS file
	Signature     string // path of its detached signature
	PublicKey     string // path of the store's exported public key
}

// publish puts a binary into the store at storeDir as a linux/amd64 build
// of product@version, signs the SHA256SUMS with key and rewrites the
// indexes. modTime is the archive entry's time, so the same binary gives a
// byte-identical zip. Publishing a version already present with the same
// binary and a valid signature by key rewrites nothing but the indexes.
func publish(storeDir string, key *openpgp.Entity, product, ver, binary string, modTime time.Time) (Published, error) {
	vdir := filepath.Join(storeDir, product, ver)
	zipName := archiveName(product, ver, "linux", "amd64")
	sums := shasumsName(product, ver)
	out := Published{
		Dir:       storeDir,
		Archive:   filepath.Join(vdir, zipName),
		Shasums:   filepath.Join(vdir, sums),
		Signature: filepath.Join(vdir, sums+".sig"),
		PublicKey: filepath.Join(storeDir, StoreKeyFile),
	}
	if err := os.MkdirAll(vdir, 0o755); err != nil {
		return out, fmt.Errorf("publish %s %s: %w", product, ver, err)
	}
	// Publishers of different versions share the product index; one at a
	// time, so that none drops another's version from it.
	lock, err := os.OpenFile(filepath.Join(storeDir, ".publish.lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return out, fmt.Errorf("publish %s %s: %w", product, ver, err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return out, fmt.Errorf("publish %s %s: lock store: %w", product, ver, err)
	}
	pub, err := armoredPublicKey(key)
	if err != nil {
		return out, err
	}
	if old, err := os.ReadFile(out.PublicKey); err != nil || !bytes.Equal(old, pub) {
		if err == nil && len(old) > 0 {
			// A store signed by another key would silently stop verifying
			// for every agent that pinned the old key.
			if err := sameKey(old, key); err != nil {
				return out, fmt.Errorf("publish into %s: %w", storeDir, err)
			}
		}
		if err := atomicfile.WriteFile(out.PublicKey, pub, 0o644); err != nil {
			return out, fmt.Errorf("export store key: %w", err)
		}
	}

	if sum, ok := upToDate(out, key, zipName, product, binary); ok {
		out.ArchiveSHA256 = sum
	} else {
		data, err := zipBinary(binary, product, modTime)
		if err != nil {
			return out, fmt.Errorf("publish %s %s: %w", product, ver, err)
		}
		if err := atomicfile.WriteFile(out.Archive, data, 0o644); err != nil {
			return out, fmt.Errorf("publish %s %s: %w", product, ver, err)
		}
		out.ArchiveSHA256 = sha256Hex(data)
		sumsData := []byte(fmt.Sprintf("%s  %s\n", out.ArchiveSHA256, zipName))
		sig, err := signDetached(key, sumsData)
		if err != nil {
			return out, err
		}
		// Signature first: a reader that sees the new SHA256SUMS with the
		// old signature fails closed, which is right.
		if err := atomicfile.WriteFile(out.Shasums, sumsData, 0o644); err != nil {
			return out, err
		}
		if err := atomicfile.WriteFile(out.Signature, sig, 0o644); err != nil {
			return out, err
		}
	}
	vi := VersionIndex{
		Name: product, Version: ver,
		Shasums: sums, ShasumsSignature: sums + ".sig",
		ShasumsSignatures: []string{sums + ".sig"},
		Builds: []Build{{
			Name: product, Version: ver, OS: "linux", Arch: "amd64",
			Filename: zipName, URL: zipName,
		}},
	}
	if err := writeJSON(filepath.Join(vdir, "index.json"), vi); err != nil {
		return out, err
	}
	if err := rewriteProductIndex(storeDir, product); err != nil {
		return out, err
	}
	return out, nil
}

// upToDate reports whether the store already holds this binary of the
// version, signed by key.
func upToDate(p Published, key *openpgp.Entity, zipName, product, binary string) (string, bool) {
	sumsData, err := os.ReadFile(p.Shasums)
	if err != nil {
		return "", false
	}
	sig, err := os.ReadFile(p.Signature)
	if err != nil {
		return "", false
	}
	kr, err := keyringOf(key)
	if err != nil {
		return "", false
	}
	if _, err := kr.VerifyDetached(sumsData, sig); err != nil {
		return "", false
	}
	want, err := lookupSum(sumsData, zipName)
	if err != nil {
		return "", false
	}
	got, err := sha256File(p.Archive)
	if err != nil || got != want {
		return "", false
	}
	// The archive's digest is signed; what is left to know is whether it
	// holds this binary. The entry's CRC-32 and size say so without
	// inflating ~100 MB (a rebuilt binary differs in both).
	same, err := zipEntryMatches(p.Archive, product, binary)
	if err != nil || !same {
		return "", false
	}
	return got, true
}

func sameKey(armoredPub []byte, key *openpgp.Entity) error {
	kr, err := ReadKeyring(armoredPub)
	if err != nil {
		return fmt.Errorf("existing %s: %w", StoreKeyFile, err)
	}
	for _, fp := range kr.Fingerprints() {
		if fp == fmt.Sprintf("%X", key.PrimaryKey.Fingerprint) {
			return nil
		}
	}
	return fmt.Errorf("the store is signed by key %v, not by this cache's key %X; publish into another directory or use the cache that holds the store's key", kr.Fingerprints(), key.PrimaryKey.Fingerprint)
}

// zipBinary makes a zip holding one executable entry named name, with a
// fixed time so that the same binary gives the same archive.
func zipBinary(binary, name string, modTime time.Time) ([]byte, error) {
	f, err := os.Open(binary)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	h := &zip.FileHeader{Name: name, Method: zip.Deflate, Modified: modTime.UTC()}
	h.SetMode(0o755)
	w, err := zw.CreateHeader(h)
	if err != nil {
		return nil, err
	}
	if _, err := io.Copy(w, f); err != nil {
		return nil, fmt.Errorf("zip %s: %w", binary, err)
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// zipEntryMatches reports whether the archive's entry called name has the
// size and CRC-32 of the file at path.
func zipEntryMatches(archive, name, path string) (bool, error) {
	zr, err := zip.OpenReader(archive)
	if err != nil {
		return false, err
	}
	defer zr.Close()
	for _, f := range zr.File {
		if f.Name != name {
			continue
		}
		st, err := os.Stat(path)
		if err != nil {
			return false, err
		}
		if uint64(st.Size()) != f.UncompressedSize64 {
			return false, nil
		}
		sum, err := crc32File(path)
		if err != nil {
			return false, err
		}
		return sum == f.CRC32, nil
	}
	return false, nil
}

// rewriteProductIndex regenerates DIR/PRODUCT/index.json from the version
// indexes present, with urls relative to the product directory.
func rewriteProductIndex(storeDir, product string) error {
	pdir := filepath.Join(storeDir, product)
	entries, err := os.ReadDir(pdir)
	if err != nil {
		return fmt.Errorf("index %s: %w", product, err)
	}
	pi := ProductIndex{Name: product, Versions: map[string]VersionIndex{}}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(pdir, e.Name(), "index.json"))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("index %s: %w", product, err)
		}
		var vi VersionIndex
		if err := json.Unmarshal(b, &vi); err != nil {
			return fmt.Errorf("index %s/%s/index.json: %w", product, e.Name(), err)
		}
		for i := range vi.Builds {
			vi.Builds[i].URL = vi.Version + "/" + vi.Builds[i].Filename
		}
		pi.Versions[vi.Version] = vi
	}
	return writeJSON(filepath.Join(pdir, "index.json"), pi)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o644)
}

// Publish puts a binary made elsewhere (steppe itself, which is not built
// from module sources here) into the store at storeDir as a linux/amd64
// build of product@version, signed with the store key of the cache
// cacheDir (made when it has none), as Build publishes what it builds.
func Publish(cacheDir, storeDir, product, version, binary string) (Published, error) {
	if err := checkName("product", product); err != nil {
		return Published{}, err
	}
	ver, err := normalizeVersion(version)
	if err != nil {
		return Published{}, fmt.Errorf("%s: %w", product, err)
	}
	st, err := os.Stat(binary)
	if err != nil {
		return Published{}, fmt.Errorf("publish %s %s: %w", product, ver, err)
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return Published{}, fmt.Errorf("publish %s %s: %s is not an executable file", product, ver, binary)
	}
	key, err := loadOrCreateKey(keyFile(cacheDir))
	if err != nil {
		return Published{}, fmt.Errorf("store key: %w", err)
	}
	return publish(storeDir, key, product, ver, binary, st.ModTime().UTC().Truncate(time.Second))
}
