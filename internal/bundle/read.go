package bundle

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"time"
)

// maxSignatureBytes bounds manifest.sig.
const maxSignatureBytes = 4096

// Limits bound what a bundle may unpack to, so that a decompression bomb
// stops early instead of filling the disk.
type Limits struct {
	MaxFiles      int   // entries besides the manifest and its signature
	MaxFileBytes  int64 // uncompressed size of one file
	MaxTotalBytes int64 // uncompressed size of all files together
}

// The default limits, used for every zero field of Limits, suit
// configuration bundles: binaries travel as artifacts, not in bundles.
const (
	DefaultMaxFiles      = 4096
	DefaultMaxFileBytes  = 64 << 20
	DefaultMaxTotalBytes = 256 << 20
)

func (l Limits) orDefault() Limits {
	if l.MaxFiles <= 0 {
		l.MaxFiles = DefaultMaxFiles
	}
	if l.MaxFileBytes <= 0 {
		l.MaxFileBytes = DefaultMaxFileBytes
	}
	if l.MaxTotalBytes <= 0 {
		l.MaxTotalBytes = DefaultMaxTotalBytes
	}
	return l
}

// Policy says which bundles a reader accepts.
type Policy struct {
	// Keys are the trusted signing keys; a bundle signed by any is accepted.
	Keys []PublicKey
	// Cluster and Role, when set, must equal the manifest's.
	Cluster, Role string
	// After is the last accepted version: the bundle's must be greater.
	After uint64
	// Now is the time expiry is checked against; zero means time.Now().
	Now    time.Time
	Limits Limits
}

// InvalidError is a bundle refused for what it is: its signature, its
// manifest, the policy (cluster, role, version, expiry, limits) or its
// entries against the signed manifest. The same bytes would be refused
// again, so a puller waits for a new publish. Every other error of Unpack
// and Verify (the stream cut or unreadable, a full disk) says nothing
// about the bundle and may pass on another try.
type InvalidError struct{ Err error }

func (e *InvalidError) Error() string { return e.Err.Error() }
func (e *InvalidError) Unwrap() error { return e.Err }

// invalidf makes an InvalidError.
func invalidf(format string, args ...any) error {
	return &InvalidError{Err: fmt.Errorf(format, args...)}
}

// streamError wraps an error of the gzip or tar reader, or of a sink,
// with what was being read. Data that is not a bundle is final; an error
// of the stream underneath (cut, reset, unexpected EOF) or of the disk is
// not, because the same bundle may be read whole next time.
func streamError(err error, format string, args ...any) error {
	err = noEOF(err)
	args = append(args, err)
	switch {
	case errors.Is(err, errBomb) || errors.Is(err, gzip.ErrHeader) || errors.Is(err, tar.ErrHeader):
		return invalidf(format+": %w", args...)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf(format+": %w (truncated download?)", args...)
	}
	return fmt.Errorf(format+": %w", args...)
}

// sink receives a bundle's parts as they are read and checked.
type sink interface {
	// manifest is called once, before any file, with the exact manifest
	// bytes, the signature bytes (nil when unsigned) and the parsed manifest.
	manifest(raw, sig []byte, m *Manifest) error
	// file must consume r (exactly f.Size bytes). The caller checks the
	// hash when r is drained: the sink must not publish the file before
	// the whole bundle is read without error.
	file(f File, r io.Reader) error
}

// readOptions tune readBundle for its three uses: verifying (signature
// required), signing (signature ignored) and building checks.
type readOptions struct {
	policy      Policy
	requireSig  bool
	checkPolicy bool
}

// readBundle reads a bundle stream, checks it entry by entry and hands the
// checked parts to s. No file content reaches s before the signature over
// the manifest that lists its hash has been verified (when requireSig).
func readBundle(ctx context.Context, r io.Reader, o readOptions, s sink) (*Manifest, string, error) {
	lim := o.policy.Limits.orDefault()
	gz, err := gzip.NewReader(&ctxReader{ctx: ctx, r: r})
	if err != nil {
		if errors.Is(err, gzip.ErrHeader) {
			return nil, "", invalidf("bundle: not a gzip stream: %w", err)
		}
		return nil, "", streamError(err, "bundle: reading the gzip header")
	}
	defer gz.Close()
	// Tar headers and padding come on top of the file bytes; the bound on
	// all decompressed bytes stops a bomb hidden in headers, padding or
	// data after the last entry.
	budget := lim.MaxTotalBytes + maxManifestBytes + maxSignatureBytes + int64(lim.MaxFiles+3)*16<<10
	lr := &limitReader{r: gz, n: budget}
	tr := tar.NewReader(lr)

	hdr, err := tr.Next()
	if err != nil {
		return nil, "", streamError(err, "bundle: reading the first entry")
	}
	if hdr.Name != ManifestName || hdr.Typeflag != tar.TypeReg {
		return nil, "", invalidf("bundle: first entry is %q, want the regular file %s", hdr.Name, ManifestName)
	}
	raw, err := readSmall(tr, hdr, maxManifestBytes)
	if err != nil {
		return nil, "", err
	}

	var sig []byte
	hdr, err = tr.Next()
	switch {
	case err == io.EOF:
		hdr = nil
	case err != nil:
		return nil, "", streamError(err, "bundle: reading the entry after %s", ManifestName)
	case hdr.Name == SignatureName:
		if hdr.Typeflag != tar.TypeReg {
			return nil, "", invalidf("bundle: %s is not a regular file", SignatureName)
		}
		if sig, err = readSmall(tr, hdr, maxSignatureBytes); err != nil {
			return nil, "", err
		}
		hdr = nil
	}
	var keyID string
	if o.requireSig {
		if sig == nil {
			return nil, "", invalidf("%w: no %s right after %s", ErrUnsigned, SignatureName, ManifestName)
		}
		if keyID, err = VerifySignature(o.policy.Keys, raw, sig); err != nil {
			return nil, "", invalidf("bundle: %w", err)
		}
	}
	m, err := ParseManifest(raw)
	if err != nil {
		return nil, "", invalidf("bundle: %w", err)
	}
	if o.checkPolicy {
		if err := checkPolicy(m, o.policy); err != nil {
			return nil, "", &InvalidError{Err: err}
		}
	}
	if err := checkLimits(m, lim); err != nil {
		return nil, "", &InvalidError{Err: err}
	}
	if err := s.manifest(raw, sig, m); err != nil {
		return nil, "", err
	}

	want := make(map[string]File, len(m.Files))
	for _, f := range m.Files {
		want[f.Path] = f
	}
	seen := make(map[string]bool, len(m.Files))
	for {
		if hdr == nil {
			hdr, err = tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, "", streamError(err, "bundle: reading the entry after %d files", len(seen))
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, "", err
		}
		f, err := checkEntry(hdr, want, seen)
		if err != nil {
			return nil, "", invalidf("bundle: %w", err)
		}
		seen[f.Path] = true
		hr := &hashReader{r: io.LimitReader(tr, f.Size), h: sha256.New()}
		// An error here is the stream's or the disk's (ENOSPC), never
		// the bundle's: what the bytes are is checked below.
		if err := s.file(f, hr); err != nil {
			return nil, "", streamError(err, "bundle: file %q", f.Path)
		}
		// Drain what the sink left so the hash covers every byte.
		if _, err := io.Copy(io.Discard, hr); err != nil {
			return nil, "", streamError(err, "bundle: file %q", f.Path)
		}
		if hr.n != f.Size {
			return nil, "", fmt.Errorf("bundle: file %q: got %d bytes, manifest says %d (truncated download?)", f.Path, hr.n, f.Size)
		}
		if got := hex.EncodeToString(hr.h.Sum(nil)); got != f.SHA256 {
			return nil, "", invalidf("bundle: file %q: sha256 %s does not match the manifest's %s (tampered?)", f.Path, got, f.SHA256)
		}
		hdr = nil
	}
	for _, f := range m.Files {
		if !seen[f.Path] {
			return nil, "", invalidf("bundle: file %q is in the manifest but not in the bundle", f.Path)
		}
	}
	// Read to the end of the gzip stream so that its checksum is checked
	// and a truncated download is noticed even after the last entry.
	const maxTrailer = 64 << 10 // a writer's padding; anything more is not a bundle
	n, err := io.Copy(io.Discard, io.LimitReader(lr, maxTrailer+1))
	if err != nil {
		return nil, "", streamError(err, "bundle: after the last entry")
	}
	if n > maxTrailer {
		return nil, "", invalidf("bundle: more than %d bytes of data after the end of the archive (decompression bomb?)", maxTrailer)
	}
	return m, keyID, nil
}

func checkEntry(hdr *tar.Header, want map[string]File, seen map[string]bool) (File, error) {
	if err := CheckPath(hdr.Name); err != nil {
		return File{}, fmt.Errorf("entry %w", err)
	}
	switch hdr.Typeflag {
	case tar.TypeReg:
	case tar.TypeSymlink:
		return File{}, fmt.Errorf("entry %q: symlink to %q refused (bundles carry only regular files)", hdr.Name, hdr.Linkname)
	case tar.TypeLink:
		return File{}, fmt.Errorf("entry %q: hard link to %q refused (bundles carry only regular files)", hdr.Name, hdr.Linkname)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		return File{}, fmt.Errorf("entry %q: device or fifo refused (bundles carry only regular files)", hdr.Name)
	case tar.TypeDir:
		return File{}, fmt.Errorf("entry %q: directory entry refused (bundles carry only regular files)", hdr.Name)
	default:
		return File{}, fmt.Errorf("entry %q: tar type %q refused (bundles carry only regular files)", hdr.Name, hdr.Typeflag)
	}
	f, ok := want[hdr.Name]
	if !ok {
		return File{}, fmt.Errorf("entry %q is not in the manifest", hdr.Name)
	}
	if seen[hdr.Name] {
		return File{}, fmt.Errorf("entry %q appears twice", hdr.Name)
	}
	if hdr.Size != f.Size {
		return File{}, fmt.Errorf("entry %q: size %d, manifest says %d", hdr.Name, hdr.Size, f.Size)
	}
	return f, nil
}

// StaleError is a signed bundle whose version is not greater than the
// last one accepted: a replay, or (Version == After) the release a
// restarted agent already runs.
type StaleError struct {
	Version, After uint64
}

func (e *StaleError) Error() string {
	return fmt.Sprintf("bundle: version %d is not greater than the last accepted %d (replayed or stale)", e.Version, e.After)
}

func checkPolicy(m *Manifest, p Policy) error {
	if p.Cluster != "" && m.Cluster != p.Cluster {
		return fmt.Errorf("bundle: for cluster %q, want %q", m.Cluster, p.Cluster)
	}
	if p.Role != "" && m.Role != p.Role {
		return fmt.Errorf("bundle: for role %q, want %q", m.Role, p.Role)
	}
	if m.Version <= p.After {
		return &StaleError{Version: m.Version, After: p.After}
	}
	now := p.Now
	if now.IsZero() {
		now = time.Now()
	}
	if !now.Before(m.Expires) {
		return fmt.Errorf("bundle: version %d expired at %s", m.Version, m.Expires.UTC().Format(time.RFC3339))
	}
	return nil
}

func checkLimits(m *Manifest, lim Limits) error {
	if len(m.Files) > lim.MaxFiles {
		return fmt.Errorf("bundle: %d files, more than the limit of %d", len(m.Files), lim.MaxFiles)
	}
	var total int64
	for _, f := range m.Files {
		if f.Size > lim.MaxFileBytes {
			return fmt.Errorf("bundle: file %q: %d bytes, more than the limit of %d", f.Path, f.Size, lim.MaxFileBytes)
		}
		total += f.Size
		if total > lim.MaxTotalBytes {
			return fmt.Errorf("bundle: files add up to more than the limit of %d bytes", lim.MaxTotalBytes)
		}
	}
	return nil
}

func readSmall(tr *tar.Reader, hdr *tar.Header, max int64) ([]byte, error) {
	if hdr.Size > max || hdr.Size < 0 {
		return nil, invalidf("bundle: %s is %d bytes, more than the limit of %d", hdr.Name, hdr.Size, max)
	}
	var b bytes.Buffer
	if _, err := io.CopyN(&b, tr, hdr.Size); err != nil {
		return nil, streamError(err, "bundle: reading %s", hdr.Name)
	}
	return b.Bytes(), nil
}

// noEOF turns a bare io.EOF in the middle of a stream into
// io.ErrUnexpectedEOF, which says what happened.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

var errBomb = errors.New("decompressed data exceeds the limit (decompression bomb?)")

type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		// Tell a stream that merely ends here from one that goes on.
		var one [1]byte
		n, err := l.r.Read(one[:])
		if n > 0 {
			return 0, errBomb
		}
		if err == nil {
			err = io.ErrNoProgress
		}
		return 0, err
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

type hashReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (h *hashReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

// ctxReader stops reading a stream when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// discard is the sink of Verify.
type discard struct{}

func (discard) manifest([]byte, []byte, *Manifest) error { return nil }
func (discard) file(File, io.Reader) error               { return nil }

// Verify reads a whole bundle and checks it against p: signature by a
// trusted key, cluster, role, version, expiry, limits and every file's size
// and hash. It writes nothing. It returns the manifest and the signer's id.
// An *InvalidError is a refusal of the bundle itself; any other error is
// the stream's and may pass on another read.
func Verify(ctx context.Context, r io.Reader, p Policy) (*Manifest, string, error) {
	return readBundle(ctx, r, readOptions{policy: p, requireSig: true, checkPolicy: true}, discard{})
}

// Inspect reads a bundle, signed or not, and checks that its files match
// its manifest, without checking the signature or any policy. It is for
// tools (publish, sign), never for deciding what to run.
func Inspect(ctx context.Context, r io.Reader) (m *Manifest, signed bool, err error) {
	var s inspectSink
	m, _, err = readBundle(ctx, r, readOptions{}, &s)
	return m, s.signed, err
}

type inspectSink struct{ signed bool }

func (s *inspectSink) manifest(_, sig []byte, _ *Manifest) error { s.signed = sig != nil; return nil }
func (s *inspectSink) file(File, io.Reader) error                { return nil }
