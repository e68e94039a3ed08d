package artifact

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/backoff"
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
	// Backoff is the first retry's delay, doubled each time (up to a
	// minute), with jitter of half of it either way; 0 means 500ms.
	Backoff time.Duration
	// Log receives what was fetched; nil means slog.Default().
	Log *slog.Logger

	mu sync.Mutex
	s3 map[string]*s3.Client // by bucket and options (s3.go)
}

// Fetch is (&Fetcher{}).Fetch: the default cache and client.
func Fetch(ctx context.Context, storeURL, product, version, goos, arch string, keyring *Keyring) (string, error) {
	return (&Fetcher{}).Fetch(ctx, storeURL, product, version, goos, arch, keyring)
}

// errVerify marks content that failed verification; it is not retried.
var errVerify = errors.New("verification failed")

// Fetch follows the release flow with names derived from its arguments:
// STORE/PRODUCT/VERSION/PRODUCT_VERSION_SHA256SUMS, its detached signature
// checked against keyring (any trusted key), the line of
// PRODUCT_VERSION_OS_ARCH.zip in it, then that archive's SHA-256. The
// archive's binary is extracted and installed atomically under the
// archive's digest, and its path is returned. A version already fetched is
// not downloaded again, but the signed SHA256SUMS is always checked, and
// so is the cached binary.
//
// The store's index.json is never read: it is unsigned, and a name taken
// from it could point a version at another version's genuinely signed
// files. The signed SHA256SUMS names its files with the version, so a
// store that serves another version's files under this one is refused.
func (f *Fetcher) Fetch(ctx context.Context, storeURL, product, version, goos, arch string, keyring *Keyring) (string, error) {
	if keyring == nil {
		return "", fmt.Errorf("fetch %s %s: no trusted keys given", product, version)
	}
	version, err := normalizeVersion(version)
	if err != nil {
		return "", fmt.Errorf("fetch %s: %w", product, err)
	}
	for _, n := range [][2]string{{"product", product}, {"os", goos}, {"arch", arch}} {
		if err := checkName(n[0], n[1]); err != nil {
			return "", fmt.Errorf("fetch %s %s: %w", product, version, err)
		}
	}
	base, err := url.Parse(strings.TrimSuffix(storeURL, "/") + "/")
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: store url %q: %w", product, version, storeURL, err)
	}
	vdir := base.JoinPath(product, version)
	sumsName := shasumsName(product, version)
	sumsURL := vdir.JoinPath(sumsName)
	sums, err := f.get(ctx, sumsURL.String())
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: SHA256SUMS: %w", product, version, err)
	}
	signer, err := f.verifySums(ctx, vdir, sumsName, sums, keyring)
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: %s is not signed by a trusted key (%v): %w", product, version, sumsURL, keyring.Fingerprints(), err)
	}
	archive := archiveName(product, version, goos, arch)
	digest, err := lookupSum(sums, archive)
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: %w", product, version, sumsMismatch(sums, sumsURL, product, version, goos, arch, archive, err))
	}
	path, fetched, err := f.install(ctx, vdir.JoinPath(archive).String(), digest, product)
	if err != nil {
		return "", fmt.Errorf("fetch %s %s: %w", product, version, err)
	}
	f.logger().Info("artifact ready", "product", product, "version", version, "path", path,
		"sha256", digest, "signer", signer, "downloaded", fetched)
	return path, nil
}

// sumsMismatch explains a signed SHA256SUMS without the archive asked for:
// a file of another version (a mirror serving one version's files under
// another's path), or no build for the platform.
func sumsMismatch(sums []byte, sumsURL *url.URL, product, version, goos, arch, archive string, err error) error {
	listed := sumsFiles(sums)
	shown := listed
	if len(shown) > 5 {
		shown = append(shown[:5:5], "...")
	}
	ours := false
	for _, n := range listed {
		ours = ours || strings.HasPrefix(n, product+"_"+version+"_")
	}
	if len(listed) > 0 && !ours {
		return fmt.Errorf("%w: the signed SHA256SUMS served at %s lists %s, not %s: the store serves another version's files under %s %s; refusing them (fix or re-sync the store)",
			errVerify, sumsURL, strings.Join(shown, ", "), archive, product, version)
	}
	return fmt.Errorf("no %s/%s build: the signed SHA256SUMS at %s lists no %s (it lists %s): %w",
		goos, arch, sumsURL, archive, strings.Join(shown, ", "), err)
}

// verifySums checks the signatures of SHA256SUMS at their derived names,
// the default .sig first, then one per trusted key (the release site signs
// with several keys during a rotation, one file per key), and returns the
// fingerprint of the first trusted signer.
func (f *Fetcher) verifySums(ctx context.Context, vdir *url.URL, sumsName string, sums []byte, keyring *Keyring) (string, error) {
	var errs []error
	for _, n := range signatureNames(sumsName, keyring.shortIDs()) {
		sig, err := f.get(ctx, vdir.JoinPath(n).String())
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
	err  error // what an S3 store said, if that was the store
}

func (e *httpStatusError) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return fmt.Sprintf("GET %s: %d %s", e.url, e.code, http.StatusText(e.code))
}

func (e *httpStatusError) Unwrap() error { return e.err }

func (f *Fetcher) do(ctx context.Context, rawURL string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errVerify, err)
	}
	if req.URL.Scheme == "file" {
		return openFileURL(req.URL)
	}
	if req.URL.Scheme == "s3" {
		return f.openS3(ctx, req.URL)
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
	first := f.Backoff
	if first <= 0 {
		first = 500 * time.Millisecond
	}
	// Each wait lies between half and one and a half times the doubled
	// delay: a nominal 3/2 of it with up to 2/3 taken off. Capped at a
	// minute, so that many Attempts do not wait for hours.
	pause := backoff.Policy{Min: first * 3 / 2, Max: time.Minute, Factor: 2, Jitter: 2.0 / 3}
	var err error
	for i := 1; ; i++ {
		if err = op(); err == nil || !retryable(err) || i >= attempts {
			if err != nil && i > 1 {
				return fmt.Errorf("%w (after %d attempts)", err, i)
			}
			return err
		}
		wait := pause.Delay(i - 1)
		f.logger().Warn("artifact fetch failed, retrying", "what", what, "attempt", i, "in", wait.Round(time.Millisecond), "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(wait):
		}
	}
}

func (f *Fetcher) logger() *slog.Logger {
	if f.Log != nil {
		return f.Log
	}
	return slog.Default()
}
