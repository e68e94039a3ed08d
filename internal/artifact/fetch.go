package artifact

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Fetcher downloads verified binaries from a release-style store (the
// official release site or one made by Builder) into a cache by digest.
type Fetcher struct {
	// CacheDir holds fetch/sha256/DIGEST/NAME; "" means DefaultCacheDir.
	CacheDir string
	// Client does the requests; nil means a client with a 10 minute timeout.
	Client *http.Client
	// Attempts per request (network errors, 5xx, 429); 0 means 5.
	Attempts int
	// Backoff is the first retry's delay, doubled each time with jitter;
	// 0 means 500ms.
	Backoff time.Duration
	// Log receives what was fetched; nil means slog.Default().
	Log *slog.Logger
}

// Fetch is (&Fetcher{}).Fetch: the default cache and client.
func Fetch(ctx context.Context, storeURL, product, version, goos, arch string, keyring *Keyring) (string, error) {
	return (&Fetcher{}).Fetch(ctx, storeURL, product, version, goos, arch, keyring)
}

// errVerify marks content that failed verification; it is not retried.
var errVerify = errors.New("verification failed")

// Fetch follows the release flow: STORE/PRODUCT/VERSION/index.json, the
// SHA256SUMS it names, its detached signature checked against keyring (any
// trusted key), then the archive's SHA-256. The archive's binary is
// extracted and installed atomically under its digest, and its path is
// returned. A version already fetched is not downloaded again, but the
// signed SHA256SUMS is always checked.
func (f *Fetcher) Fetch(ctx context.Context, storeURL, product, version, goos, arch string, keyring *Keyring) (string, error) {
	if keyring == nil {
		return "", fmt.Errorf("fetch %s %s: no trusted keys given", product, version)
	}
	version = strings.TrimPrefix(version, "v")
	if _, err := normalizeVersion(version); err != nil {
		return "", fmt.Errorf("fetch %s: %w", product, err)
	}
	base, err := url.Parse(strings.TrimSuffix(storeURL, "/") + "/")
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: store url %q: %w", product, version, storeURL, err)
	}
	indexURL := base.JoinPath(product, version, "index.json")
	raw, err := f.get(ctx, indexURL.String())
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: index: %w", product, version, err)
	}
	var vi VersionIndex
	if err := json.Unmarshal(raw, &vi); err != nil {
		return "", fmt.Errorf("fetch %s %s: index %s: %w", product, version, indexURL, err)
	}
	if vi.Name != product || vi.Version != version {
		return "", fmt.Errorf("fetch %s %s: index %s is for %s %s", product, version, indexURL, vi.Name, vi.Version)
	}
	var build *Build
	for i := range vi.Builds {
		if vi.Builds[i].OS == goos && vi.Builds[i].Arch == arch {
			build = &vi.Builds[i]
			break
		}
	}
	if build == nil {
		return "", fmt.Errorf("fetch %s %s: no %s/%s build in %s", product, version, goos, arch, indexURL)
	}
	if build.Filename == "" || strings.ContainsAny(build.Filename, "/\\") {
		return "", fmt.Errorf("fetch %s %s: index %s: bad filename %q", product, version, indexURL, build.Filename)
	}
	sumsURL, err := indexURL.Parse(vi.Shasums)
	if err != nil || vi.Shasums == "" {
		return "", fmt.Errorf("fetch %s %s: index %s: bad shasums %q", product, version, indexURL, vi.Shasums)
	}
	sums, err := f.get(ctx, sumsURL.String())
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: SHA256SUMS: %w", product, version, err)
	}
	signer, err := f.verifySums(ctx, indexURL, vi, sums, keyring)
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: %s is not signed by a trusted key (%v): %w", product, version, sumsURL, keyring.Fingerprints(), err)
	}
	digest, err := lookupSum(sums, build.Filename)
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: %w", product, version, err)
	}
	archiveURL, err := indexURL.Parse(build.URL)
	if err != nil || build.URL == "" {
		return "", fmt.Errorf("fetch %s %s: index %s: bad url %q", product, version, indexURL, build.URL)
	}
	path, fetched, err := f.install(ctx, archiveURL.String(), digest, product)
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: %w", product, version, err)
	}
	f.logger().Info("artifact ready", "product", product, "version", version, "path", path,
		"sha256", digest, "signer", signer, "downloaded", fetched)
	return path, nil
}

// verifySums checks the signatures the index names, shasums_signature
// first, then each of shasums_signatures (the release site signs with
// several keys during a rotation, one file per key), and returns the
// fingerprint of the first trusted signer.
func (f *Fetcher) verifySums(ctx context.Context, indexURL *url.URL, vi VersionIndex, sums []byte, keyring *Keyring) (string, error) {
	var names []string
	seen := map[string]bool{}
	for _, n := range append([]string{vi.ShasumsSignature}, vi.ShasumsSignatures...) {
		if n != "" && !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("%w: index names no signature", errVerify)
	}
	var errs []error
	for _, n := range names {
		u, err := indexURL.Parse(n)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
			continue
		}
		sig, err := f.get(ctx, u.String())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		signer, err := keyring.VerifyDetached(sums, sig)
		if err == nil {
			return signer, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", n, err))
	}
	return "", errors.Join(errs...)
}

// FetchURL downloads a plain URL whose SHA-256 is pinned. A zip archive
// (by content) is extracted and its entry called name installed; anything
// else is installed as the binary itself.
func (f *Fetcher) FetchURL(ctx context.Context, rawURL, sha256Hex, name string) (string, error) {
	sha256Hex = strings.ToLower(strings.TrimSpace(sha256Hex))
	if len(sha256Hex) != 64 || strings.Trim(sha256Hex, "0123456789abcdef") != "" {
		return "", fmt.Errorf("fetch %s: pinned sha256 %q is not 64 hex digits", rawURL, sha256Hex)
	}
	if name == "" || strings.ContainsAny(name, "/\\") || strings.HasPrefix(name, ".") {
		return "", fmt.Errorf("fetch %s: bad binary name %q", rawURL, name)
	}
	path, fetched, err := f.install(ctx, rawURL, sha256Hex, name)
	if err != nil {
		return "", fmt.Errorf("fetch %s: %w", rawURL, err)
	}
	f.logger().Info("artifact ready", "url", rawURL, "path", path, "sha256", sha256Hex, "downloaded", fetched)
	return path, nil
}

// install makes fetch/sha256/DIGEST/NAME exist: downloads the archive to a
// temporary file while hashing it, checks the digest, extracts, and
// renames the finished directory into place. Nothing partial is ever
// visible under the digest.
func (f *Fetcher) install(ctx context.Context, rawURL, digest, name string) (string, bool, error) {
	cache := f.CacheDir
	if cache == "" {
		var err error
		if cache, err = DefaultCacheDir(); err != nil {
			return "", false, err
		}
	}
	final := filepath.Join(cache, "fetch", "sha256", digest)
	bin := filepath.Join(final, name)
	if st, err := os.Stat(bin); err == nil && st.Mode().IsRegular() {
		return bin, false, nil
	}
	tmpRoot := filepath.Join(cache, "fetch", "tmp")
	if err := os.MkdirAll(tmpRoot, 0o755); err != nil {
		return "", false, err
	}
	tmpDir, err := os.MkdirTemp(tmpRoot, digest[:12]+"-")
	if err != nil {
		return "", false, err
	}
	defer os.RemoveAll(tmpDir)
	download := filepath.Join(tmpDir, "download")
	if err := f.retry(ctx, rawURL, func() error { return f.downloadTo(ctx, rawURL, download, digest) }); err != nil {
		return "", false, err
	}
	content := filepath.Join(tmpDir, "out")
	if err := os.Mkdir(content, 0o755); err != nil {
		return "", false, err
	}
	if isZip(download) {
		if err := extractEntry(download, name, filepath.Join(content, name)); err != nil {
			return "", false, err
		}
	} else if err := os.Rename(download, filepath.Join(content, name)); err != nil {
		return "", false, err
	}
	if err := os.Chmod(filepath.Join(content, name), 0o755); err != nil {
		return "", false, err
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o755); err != nil {
		return "", false, err
	}
	if err := os.Rename(content, final); err != nil {
		// Another fetch of the same digest won the race; its copy is
		// identical by construction.
		if _, serr := os.Stat(bin); serr == nil {
			return bin, true, nil
		}
		return "", false, fmt.Errorf("install %s: %w", final, err)
	}
	return bin, true, nil
}

// downloadTo writes the body of url to path and fails unless its SHA-256
// is digest.
func (f *Fetcher) downloadTo(ctx context.Context, rawURL, path, digest string) error {
	resp, err := f.do(ctx, rawURL)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), resp.Body)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("download %s: after %d bytes: %w", rawURL, n, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != digest {
		return fmt.Errorf("%w: %s has sha256 %s (%d bytes), want %s", errVerify, rawURL, got, n, digest)
	}
	return nil
}

// get returns the body of a small document.
func (f *Fetcher) get(ctx context.Context, rawURL string) ([]byte, error) {
	var body []byte
	err := f.retry(ctx, rawURL, func() error {
		resp, err := f.do(ctx, rawURL)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		if err != nil {
			return fmt.Errorf("read %s: %w", rawURL, err)
		}
		body = b
		return nil
	})
	return body, err
}

// httpStatusError is a non-200 answer; 5xx and 429 are retried.
type httpStatusError struct {
	url  string
	code int
}

func (e *httpStatusError) Error() string {
	return fmt.Sprintf("GET %s: %d %s", e.url, e.code, http.StatusText(e.code))
}

func (f *Fetcher) do(ctx context.Context, rawURL string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errVerify, err)
	}
	if req.URL.Scheme == "file" {
		return openFileURL(req.URL)
	}
	client := f.Client
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Minute}
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		return nil, &httpStatusError{url: rawURL, code: resp.StatusCode}
	}
	return resp, nil
}

// openFileURL answers a file:// URL like a store server would: machines
// that share the operator's filesystem (the local provider) read the store
// in place. What is read is verified exactly as over HTTP.
func openFileURL(u *url.URL) (*http.Response, error) {
	f, err := os.Open(u.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, &httpStatusError{url: u.String(), code: http.StatusNotFound}
	}
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, &httpStatusError{url: u.String(), code: http.StatusNotFound}
	}
	return &http.Response{StatusCode: http.StatusOK, Body: f}, nil
}

func retryable(err error) bool {
	if errors.Is(err, errVerify) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var se *httpStatusError
	if errors.As(err, &se) {
		return se.code >= 500 || se.code == http.StatusTooManyRequests
	}
	return true // network errors, truncated bodies
}

func (f *Fetcher) retry(ctx context.Context, what string, op func() error) error {
	attempts := f.Attempts
	if attempts <= 0 {
		attempts = 5
	}
	delay := f.Backoff
	if delay <= 0 {
		delay = 500 * time.Millisecond
	}
	var err error
	for i := 1; ; i++ {
		if err = op(); err == nil || !retryable(err) || i >= attempts {
			if err != nil && i > 1 {
				return fmt.Errorf("%w (after %d attempts)", err, i)
			}
			return err
		}
		wait := delay/2 + rand.N(delay)
		f.logger().Warn("artifact fetch failed, retrying", "what", what, "attempt", i, "in", wait.Round(time.Millisecond), "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(wait):
		}
		delay *= 2
	}
}

func (f *Fetcher) logger() *slog.Logger {
	if f.Log != nil {
		return f.Log
	}
	return slog.Default()
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

// extractEntry copies the zip entry called name to dst. HashiCorp's
// archives hold the binary at the top level (and sometimes a license
// file beside it).
func extractEntry(archive, name, dst string) error {
	zr, err := zip.OpenReader(archive)
	if err != nil {
		return fmt.Errorf("%w: open archive: %v", errVerify, err)
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
			return err
		}
		defer rc.Close()
		out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, rc); err != nil {
			out.Close()
			return fmt.Errorf("extract %s: %w", name, err)
		}
		return out.Close()
	}
	return fmt.Errorf("archive has no %q (entries: %s)", name, strings.Join(names, ", "))
}
