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
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/steppe/steppe/internal/atomicfile"
)

// ErrNotModified means the store's latest bundle still has the ETag the
// caller already holds (after waiting, when a wait was asked for).
var ErrNotModified = errors.New("bundle not modified")

// ErrNotFound means nothing has been published for the cluster and role.
var ErrNotFound = errors.New("no bundle published")

// Fetched is the latest bundle of a store. The caller closes Body; it is
// untrusted until Unpack or Verify has read all of it without error.
type Fetched struct {
	Body io.ReadCloser
	ETag string // opaque; give it back to Fetch to learn of changes only
}

// Store is where agents pull bundles from. Agents may define a smaller
// interface of their own; DirStore and HTTPStore satisfy this one.
type Store interface {
	// Fetch returns the latest bundle for cluster and role. When etag is
	// the ETag of the latest bundle, Fetch returns ErrNotModified, after
	// waiting up to wait for a newer one to be published.
	Fetch(ctx context.Context, cluster, role, etag string, wait time.Duration) (*Fetched, error)
}

// OpenStore opens the store an agent's configuration names: an http:// or
// https:// URL of a bundle server (fetched with client; nil means a
// default client), an s3://bucket/prefix (see S3Store), or a local
// directory.
func OpenStore(location string, client *http.Client) (Store, error) {
	if strings.HasPrefix(location, "http://") || strings.HasPrefix(location, "https://") {
		return NewHTTPStore(location, client)
	}
	if strings.HasPrefix(location, "s3://") {
		// Loading the AWS configuration reads files and the environment
		// only; credentials are resolved at the first request.
		return NewS3Store(context.Background(), location, S3Options{HTTPClient: client})
	}
	if strings.Contains(location, "://") {
		return nil, fmt.Errorf("bundle store %q: want an http:// or https:// URL, an s3://BUCKET/PREFIX or a directory", location)
	}
	if location == "" {
		return nil, fmt.Errorf("bundle store: no location given")
	}
	return NewDirStore(location), nil
}

// Publisher is a store the operator publishes into as well as agents
// pull from: a DirStore or an S3Store.
type Publisher interface {
	Store
	Publish(ctx context.Context, r io.Reader, o PublishOptions) (*Manifest, error)
}

// OpenPublisher opens the store at location for publishing: an
// s3://bucket/prefix or a local directory.
func OpenPublisher(ctx context.Context, location string) (Publisher, error) {
	if strings.HasPrefix(location, "s3://") {
		return NewS3Store(ctx, location, S3Options{})
	}
	if strings.Contains(location, "://") || location == "" {
		return nil, fmt.Errorf("bundle store %q: want an s3://BUCKET/PREFIX or a directory to publish into", location)
	}
	return NewDirStore(location), nil
}

// latestName is the file in DIR/<cluster>/<role>/ that holds the latest
// bundle; published versions sit beside it as <version>.tar.gz.
const latestName = "latest.tar.gz"

// DirStore is a store in a local directory: DIR/<cluster>/<role>/latest.tar.gz.
type DirStore struct {
	Dir string
	// PollInterval is how often a waiting Fetch looks for a change;
	// zero means 200ms.
	PollInterval time.Duration

	etags etagCache
}

// NewDirStore returns a store in dir.
func NewDirStore(dir string) *DirStore { return &DirStore{Dir: dir} }

func (d *DirStore) latestPath(cluster, role string) (string, error) {
	if err := CheckName("cluster", cluster); err != nil {
		return "", err
	}
	if err := CheckName("role", role); err != nil {
		return "", err
	}
	return filepath.Join(d.Dir, cluster, role, latestName), nil
}

func (d *DirStore) pollInterval() time.Duration {
	if d.PollInterval > 0 {
		return d.PollInterval
	}
	return 200 * time.Millisecond
}

// open opens the latest bundle and returns it with its ETag, computed from
// the open file so that the two always belong together.
func (d *DirStore) open(cluster, role string) (*os.File, string, error) {
	p, err := d.latestPath(cluster, role)
	if err != nil {
		return nil, "", err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "", ErrNotFound
	}
	if err != nil {
		return nil, "", err
	}
	etag, err := d.etags.get(f)
	if err != nil {
		f.Close()
		return nil, "", err
	}
	return f, etag, nil
}

// Fetch implements Store. A waiting Fetch looks at the file's stat every
// PollInterval, which costs one stat per interval per waiting caller.
func (d *DirStore) Fetch(ctx context.Context, cluster, role, etag string, wait time.Duration) (*Fetched, error) {
	deadline := time.Now().Add(wait)
	for {
		f, cur, err := d.open(cluster, role)
		switch {
		case err == nil && (etag == "" || cur != etag):
			return &Fetched{Body: f, ETag: cur}, nil
		case err == nil:
			f.Close()
			err = ErrNotModified
		case !errors.Is(err, ErrNotFound):
			return nil, fmt.Errorf("fetch %s/%s from %s: %w", cluster, role, d.Dir, err)
		}
		if !time.Now().Before(deadline) {
			return nil, err
		}
		t := time.NewTimer(min(d.pollInterval(), time.Until(deadline)))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// PublishOptions check a bundle before it is published.
type PublishOptions struct {
	// Keys, when set, must include the key that signed the bundle. Without
	// keys only the bundle's integrity is checked (agents check the rest).
	Keys []PublicKey
	// Cluster and Role, when set, must equal the manifest's.
	Cluster, Role string
	// Now is for the expiry check; zero means time.Now().
	Now time.Time
}

// Publish stores a signed bundle as the latest for its cluster and role.
// It refuses an unsigned bundle, a bundle whose files do not match its
// manifest, and a version not greater than the one already published.
// Files appear atomically (temporary file, fsync, rename): a reader sees
// the old or the new bundle, never part of one.
func (d *DirStore) Publish(ctx context.Context, r io.Reader, o PublishOptions) (*Manifest, error) {
	in := filepath.Join(d.Dir, ".incoming")
	if err := os.MkdirAll(in, 0o755); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	tmp, err := os.CreateTemp(in, "bundle-*")
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if _, err := io.Copy(tmp, &ctxReader{ctx: ctx, r: r}); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	m, err := checkPublishable(ctx, tmp, o)
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if (o.Cluster != "" && o.Cluster != m.Cluster) || (o.Role != "" && o.Role != m.Role) {
		return nil, fmt.Errorf("publish: bundle is for %s/%s, not %s/%s", m.Cluster, m.Role, o.Cluster, o.Role)
	}
	latest, err := d.latestPath(m.Cluster, m.Role)
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if old, err := d.publishedVersion(latest); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	} else if m.Version <= old {
		return nil, fmt.Errorf("publish: version %d is not greater than the published %d for %s/%s", m.Version, old, m.Cluster, m.Role)
	}
	dir := filepath.Dir(latest)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	versioned := filepath.Join(dir, strconv.FormatUint(m.Version, 10)+".tar.gz")
	if err := os.Rename(tmp.Name(), versioned); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	// The latest file is a hard link to the versioned one, swapped in by
	// rename.
	link := filepath.Join(dir, ".latest.tmp-"+strconv.FormatUint(m.Version, 10))
	os.Remove(link)
	if err := os.Link(versioned, link); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if err := os.Rename(link, latest); err != nil {
		os.Remove(link)
		return nil, fmt.Errorf("publish: %w", err)
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	return m, nil
}

func checkPublishable(ctx context.Context, r io.Reader, o PublishOptions) (*Manifest, error) {
	if len(o.Keys) > 0 {
		m, _, err := Verify(ctx, r, Policy{Keys: o.Keys, Now: o.Now})
		return m, err
	}
	m, signed, err := Inspect(ctx, r)
	if err != nil {
		return nil, err
	}
	if !signed {
		return nil, fmt.Errorf("%w: sign it first (steppe bundle sign)", ErrUnsigned)
	}
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	if !now.Before(m.Expires) {
		return nil, fmt.Errorf("version %d expired at %s", m.Version, m.Expires.UTC().Format(time.RFC3339))
	}
	return m, nil
}

// publishedVersion reads the version of the latest published bundle from
// its manifest (0 when none).
func (d *DirStore) publishedVersion(latest string) (uint64, error) {
	f, err := os.Open(latest)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	m, _, err := Inspect(context.Background(), f)
	if err != nil {
		return 0, fmt.Errorf("the published %s: %w", latest, err)
	}
	return m.Version, nil
}

// etagCache remembers the content hash of files by identity (device,
// inode, size, mtime): a published file never changes in place, so the
// hash is computed once per publish, not once per request.
type etagCache struct {
	mu sync.Mutex
	m  map[fileID]string
}

type fileID struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

func statID(fi fs.FileInfo) fileID {
	id := fileID{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
	}
	return id
}

func (c *etagCache) get(f *os.File) (string, error) {
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	id := statID(fi)
	c.mu.Lock()
	etag, ok := c.m[id]
	c.mu.Unlock()
	if ok {
		return etag, nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	etag = sumETag(h.Sum(nil))
	c.mu.Lock()
	if c.m == nil || len(c.m) > 4096 {
		c.m = make(map[fileID]string)
	}
	c.m[id] = etag
	c.mu.Unlock()
	return etag, nil
}

// sumETag is the ETag of content whose SHA-256 is sum: the same for the
// same bytes wherever they are read from.
func sumETag(sum []byte) string { return `"` + hex.EncodeToString(sum[:16]) + `"` }

// contentETag is sumETag of data.
func contentETag(data []byte) string {
	sum := sha256.Sum256(data)
	return sumETag(sum[:])
}

// HTTPStore fetches bundles from a steppe bundle server (or any HTTP
// server that follows the same protocol):
//
//	GET {base}/v1/bundles/{cluster}/{role}[?wait=30s]
//	    If-None-Match: {etag} → 200 with ETag, 304, or 404
//	PUT {base}/v1/bundles/{cluster}/{role} → 201 (servers that trust keys)
type HTTPStore struct {
	BaseURL string
	// Client does the requests; nil means a client with no overall timeout
	// (long polls are bounded by the context and the wait).
	Client *http.Client
}

// NewHTTPStore returns a store at baseURL (http:// or https://).
func NewHTTPStore(baseURL string, client *http.Client) (*HTTPStore, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("bundle store %q: want an http:// or https:// URL", baseURL)
	}
	if client == nil {
		client = &http.Client{}
	}
	return &HTTPStore{BaseURL: baseURL, Client: client}, nil
}

func (h *HTTPStore) url(cluster, role string) (string, error) {
	if err := CheckName("cluster", cluster); err != nil {
		return "", err
	}
	if err := CheckName("role", role); err != nil {
		return "", err
	}
	base := h.BaseURL
	for len(base) > 0 && base[len(base)-1] == '/' {
		base = base[:len(base)-1]
	}
	return base + "/v1/bundles/" + cluster + "/" + role, nil
}

// Fetch implements Store.
func (h *HTTPStore) Fetch(ctx context.Context, cluster, role, etag string, wait time.Duration) (*Fetched, error) {
	u, err := h.url(cluster, role)
	if err != nil {
		return nil, fmt.Errorf("fetch: %w", err)
	}
	if wait > 0 {
		u += "?wait=" + url.QueryEscape(wait.String())
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", u, err)
	}
	if etag != "" {
		req.Header.Set("If-None-Match", etag)
	}
	resp, err := h.Client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", u, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return &Fetched{Body: resp.Body, ETag: resp.Header.Get("ETag")}, nil
	case http.StatusNotModified:
		resp.Body.Close()
		return nil, ErrNotModified
	case http.StatusNotFound:
		resp.Body.Close()
		return nil, fmt.Errorf("fetch %s: %w", u, ErrNotFound)
	default:
		return nil, fmt.Errorf("fetch %s: %w", u, statusError(resp))
	}
}

// Publish uploads a signed bundle; the server checks it against the keys
// it trusts and refuses a version not greater than the published one.
func (h *HTTPStore) Publish(ctx context.Context, r io.Reader) (*Manifest, error) {
	b, err := io.ReadAll(io.LimitReader(r, DefaultMaxTotalBytes+1))
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	m, signed, err := Inspect(ctx, bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if !signed {
		return nil, fmt.Errorf("publish: %w: sign it first (steppe bundle sign)", ErrUnsigned)
	}
	u, err := h.url(m.Cluster, m.Role)
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u, bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", u, err)
	}
	req.Header.Set("Content-Type", "application/gzip")
	resp, err := h.Client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusCreated {
		return nil, fmt.Errorf("publish %s: %w", u, statusError(resp))
	}
	resp.Body.Close()
	return m, nil
}

func statusError(resp *http.Response) error {
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return fmt.Errorf("HTTP %s: %s", resp.Status, bytes.TrimSpace(msg))
}
