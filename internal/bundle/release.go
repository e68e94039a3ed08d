package bundle

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/steppe/steppe/internal/atomicfile"
)

// CurrentName is the symlink in a releases directory that points at the
// active release.
const CurrentName = "current"

// tmpPrefix starts the names of unfinished releases; Prune removes them.
const tmpPrefix = ".unpack-"

// Release is a verified bundle unpacked on disk.
type Release struct {
	Version  uint64
	Dir      string // releasesDir/<version>
	Manifest *Manifest
	KeyID    string // the trusted key that signed it
}

// Unpack verifies the bundle read from r against p and unpacks it into the
// new directory releasesDir/<version>. The files are written into a hidden
// temporary directory through an os.Root (so no name can resolve outside
// it) and the directory is renamed into place only when the whole bundle
// has been read and checked: on any error nothing is left behind and the
// current release is untouched. An existing directory of the same version
// that is not current (an unfinished earlier attempt) is replaced.
//
// An *InvalidError means the bundle itself was refused (signature,
// manifest, policy, entries); any other error (the stream cut short, the
// disk full) may pass when the same bundle is read again.
func Unpack(ctx context.Context, r io.Reader, releasesDir string, p Policy) (*Release, error) {
	return unpack(ctx, r, releasesDir, readOptions{policy: p, requireSig: true, checkPolicy: true})
}

// unpack is Unpack with the checks chosen by o; only the fuzzer turns the
// signature and policy checks off, to reach the unpacker with random input.
func unpack(ctx context.Context, r io.Reader, releasesDir string, o readOptions) (*Release, error) {
	if err := os.MkdirAll(releasesDir, 0o755); err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	tmp, err := os.MkdirTemp(releasesDir, tmpPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	root, err := os.OpenRoot(tmp)
	if err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	defer root.Close()
	sink := &unpackSink{root: root}
	if prev, err := linkSource(releasesDir, filepath.Base(tmp)); err == nil {
		defer prev.close()
		sink.prev = prev
	}
	m, keyID, err := readBundle(ctx, r, o, sink)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	if err := sink.sync(); err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	final := filepath.Join(releasesDir, strconv.FormatUint(m.Version, 10))
	if cur, _, err := Current(releasesDir); err == nil && cur == m.Version {
		return nil, invalidf("unpack: version %d is the current release already", m.Version)
	}
	if err := os.RemoveAll(final); err != nil {
		return nil, fmt.Errorf("unpack: removing an unfinished %s: %w", final, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	ok = true
	if err := atomicfile.SyncDir(releasesDir); err != nil {
		return nil, fmt.Errorf("unpack: %w", err)
	}
	return &Release{Version: m.Version, Dir: final, Manifest: m, KeyID: keyID}, nil
}

type unpackSink struct {
	root *os.Root
	// prev, when set, is the current release: a file it has with the
	// same content and mode is hard-linked instead of written. Releases
	// mostly repeat the last one, and on ext4 creating and syncing a file
	// is what an update costs (the tar entry is still read and checked
	// against the manifest by readBundle).
	prev *prevRelease
	// names and dirs written, synced together at the end: on ext4 the
	// first fsync commits every file written before it, so the later ones
	// cost little, where a fsync after each file would wait for a journal
	// commit per file.
	names []string
	dirs  map[string]bool
}

func (s *unpackSink) manifest(raw, sig []byte, _ *Manifest) error {
	// Keep the signed manifest with the release so that later readers
	// (the agent after a restart, people) see exactly what was verified.
	if err := s.write(ManifestName, 0o644, bytes.NewReader(raw)); err != nil {
		return err
	}
	return s.write(SignatureName, 0o644, bytes.NewReader(sig))
}

func (s *unpackSink) file(f File, r io.Reader) error {
	if d := path.Dir(f.Path); d != "." {
		if err := s.root.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if s.dirs == nil {
			s.dirs = make(map[string]bool)
		}
		for ; d != "." && !s.dirs[d]; d = path.Dir(d) {
			s.dirs[d] = true
		}
	}
	if s.prev != nil && s.prev.link(f) {
		return nil
	}
	return s.write(f.Path, os.FileMode(f.Mode), r)
}

// prevRelease is the current release as a source of hard links: both it
// and the unfinished release are names inside one os.Root opened on the
// releases directory, so no link can reach outside it.
type prevRelease struct {
	root  *os.Root // the releases directory
	dir   string   // the current release's name in it
	tmp   string   // the unfinished release's name in it
	files map[string]File
}

// linkSource opens the current release of releasesDir as a link source
// for the unfinished release tmp.
func linkSource(releasesDir, tmp string) (*prevRelease, error) {
	v, _, err := Current(releasesDir)
	if err != nil {
		return nil, err
	}
	rel, err := ReadRelease(releasesDir, v)
	if err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(releasesDir)
	if err != nil {
		return nil, err
	}
	p := &prevRelease{root: root, dir: strconv.FormatUint(v, 10), tmp: tmp, files: map[string]File{}}
	for _, f := range rel.Manifest.Files {
		p.files[f.Path] = f
	}
	return p, nil
}

func (p *prevRelease) close() { p.root.Close() }

// link hard-links f from the current release when that release has the
// same path with the same size, mode and SHA-256 on its manifest and on
// disk (read back: a release is trusted for what it says, not assumed
// intact). It reports whether it did.
func (p *prevRelease) link(f File) bool {
	old, ok := p.files[f.Path]
	if !ok || old.SHA256 != f.SHA256 || old.Size != f.Size || old.Mode != f.Mode {
		return false
	}
	src := path.Join(p.dir, f.Path)
	fh, err := p.root.Open(src)
	if err != nil {
		return false
	}
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(fh, f.Size+1))
	fi, serr := fh.Stat()
	fh.Close()
	if err != nil || serr != nil || n != f.Size || !fi.Mode().IsRegular() || fi.Mode().Perm() != os.FileMode(f.Mode).Perm() || hex.EncodeToString(h.Sum(nil)) != f.SHA256 {
		return false
	}
	return p.root.Link(src, path.Join(p.tmp, f.Path)) == nil
}

func (s *unpackSink) write(name string, mode os.FileMode, r io.Reader) error {
	// O_EXCL: a name is written once; nothing pre-existing is followed.
	fh, err := s.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	s.names = append(s.names, name)
	if _, err := io.Copy(fh, r); err != nil {
		fh.Close()
		return err
	}
	if err := fh.Chmod(mode); err != nil {
		fh.Close()
		return err
	}
	return fh.Close()
}

// sync makes every file and directory written durable.
func (s *unpackSink) sync() error {
	names := append(s.names, ".")
	for d := range s.dirs {
		names = append(names, d)
	}
	for _, n := range names {
		fh, err := s.root.Open(n)
		if err != nil {
			return err
		}
		err = fh.Sync()
		fh.Close()
		if err != nil {
			return fmt.Errorf("sync %s: %w", n, err)
		}
	}
	return nil
}

// ReadRelease reads the manifest kept in a release directory. It trusts
// the directory: Unpack verified the manifest before writing it there.
func ReadRelease(releasesDir string, version uint64) (*Release, error) {
	dir := filepath.Join(releasesDir, strconv.FormatUint(version, 10))
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return nil, fmt.Errorf("release %d: %w", version, err)
	}
	m, err := ParseManifest(b)
	if err != nil {
		return nil, fmt.Errorf("release %d: %w", version, err)
	}
	if m.Version != version {
		return nil, fmt.Errorf("release %d: its manifest says version %d", version, m.Version)
	}
	return &Release{Version: version, Dir: dir, Manifest: m}, nil
}

// Activate makes releasesDir/<version> the current release by renaming a
// new symlink over "current": readers see the old or the new target, never
// neither.
func Activate(releasesDir string, version uint64) error {
	name := strconv.FormatUint(version, 10)
	fi, err := os.Lstat(filepath.Join(releasesDir, name))
	if err != nil {
		return fmt.Errorf("activate %d: %w", version, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("activate %d: %s is not a directory", version, filepath.Join(releasesDir, name))
	}
	// Relative target: the releases directory can be moved as a whole.
	if err := atomicfile.Symlink(name, filepath.Join(releasesDir, CurrentName)); err != nil {
		return fmt.Errorf("activate %d: %w", version, err)
	}
	return nil
}

// ErrNoCurrent means no release has been activated yet.
var ErrNoCurrent = errors.New("no current release")

// Current returns the version and directory of the current release.
func Current(releasesDir string) (uint64, string, error) {
	target, err := os.Readlink(filepath.Join(releasesDir, CurrentName))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, "", ErrNoCurrent
	}
	if err != nil {
		return 0, "", fmt.Errorf("current release: %w", err)
	}
	v, err := strconv.ParseUint(target, 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("current release: %s points at %q, not a version", filepath.Join(releasesDir, CurrentName), target)
	}
	return v, filepath.Join(releasesDir, target), nil
}

// Releases lists the versions unpacked in releasesDir, lowest first.
func Releases(releasesDir string) ([]uint64, error) {
	ents, err := os.ReadDir(releasesDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var vs []uint64
	for _, e := range ents {
		if v, err := strconv.ParseUint(e.Name(), 10, 64); err == nil && e.IsDir() {
			vs = append(vs, v)
		}
	}
	sort.Slice(vs, func(i, j int) bool { return vs[i] < vs[j] })
	return vs, nil
}

// Remove deletes one release; it refuses to remove the current one.
func Remove(releasesDir string, version uint64) error {
	if cur, _, err := Current(releasesDir); err == nil && cur == version {
		return fmt.Errorf("remove release %d: it is the current release", version)
	}
	if err := os.RemoveAll(filepath.Join(releasesDir, strconv.FormatUint(version, 10))); err != nil {
		return fmt.Errorf("remove release %d: %w", version, err)
	}
	return nil
}

// Prune keeps the current release and the keep-1 highest releases below
// it (the ones to roll back to), and removes older releases and unfinished
// unpacks. Releases newer than the current one are left alone: one may be
// on its way to activation; the caller removes a failed one with Remove.
// It must not run while an Unpack into the same directory is under way
// (the agent's single loop does one after the other). It returns the
// versions removed.
func Prune(releasesDir string, keep int) ([]uint64, error) {
	if keep < 1 {
		keep = 1
	}
	cur, _, err := Current(releasesDir)
	if err != nil {
		return nil, fmt.Errorf("prune: %w", err)
	}
	ents, err := os.ReadDir(releasesDir)
	if err != nil {
		return nil, fmt.Errorf("prune: %w", err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			if err := os.RemoveAll(filepath.Join(releasesDir, e.Name())); err != nil {
				return nil, fmt.Errorf("prune: %w", err)
			}
		}
	}
	vs, err := Releases(releasesDir)
	if err != nil {
		return nil, fmt.Errorf("prune: %w", err)
	}
	var older []uint64
	for _, v := range vs {
		if v < cur {
			older = append(older, v)
		}
	}
	var removed []uint64
	if n := len(older) - (keep - 1); n > 0 {
		for _, v := range older[:n] {
			if err := Remove(releasesDir, v); err != nil {
				return removed, fmt.Errorf("prune: %w", err)
			}
			removed = append(removed, v)
		}
	}
	return removed, nil
}

// acceptedName is the file in a state directory that holds the highest
// accepted version.
const acceptedName = "accepted-version"

// LoadAccepted returns the highest version accepted so far (0 if none).
func LoadAccepted(stateDir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, acceptedName))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("accepted version: %w", err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("accepted version: %s holds %q, not a version", filepath.Join(stateDir, acceptedName), b)
	}
	return v, nil
}

// SaveAccepted records version as accepted, atomically (temp, fsync,
// rename, fsync the directory). It refuses to lower the recorded version:
// the record only grows, whatever the caller does.
func SaveAccepted(stateDir string, version uint64) error {
	old, err := LoadAccepted(stateDir)
	if err != nil {
		return err
	}
	if version < old {
		return fmt.Errorf("accepted version: %d is lower than the recorded %d", version, old)
	}
	if version == old {
		return nil
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("accepted version: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(stateDir, acceptedName), []byte(strconv.FormatUint(version, 10)+"\n"), 0o600); err != nil {
		return fmt.Errorf("accepted version: %w", err)
	}
	return nil
}
