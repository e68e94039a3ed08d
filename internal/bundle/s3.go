package bundle

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/backoff"
	"github.com/steppe/steppe/internal/s3client"
)

// Errors of an S3 store, wrapped with what was asked of which bucket.
var (
	// ErrThrottled: the store answered 503 SlowDown; ask later, less often.
	ErrThrottled = s3client.ErrThrottled
	// ErrDenied: the credentials were refused or lack the permission.
	ErrDenied = s3client.ErrDenied
	// ErrNoBucket: the bucket does not exist.
	ErrNoBucket = s3client.ErrNoBucket
	// ErrPublishConflict: another publisher moved the pointer between
	// this publisher's read of it and its write.
	ErrPublishConflict = errors.New("another publish changed the latest version at the same time")
)

// S3Store is a bundle store in an S3 bucket (AWS or any gateway that
// speaks its API, such as SeaweedFS):
//
//	{prefix}/{cluster}/{role}/{version}.tar.gz   a published bundle, never overwritten
//	{prefix}/{cluster}/{role}/latest.json        the pointer: version, object key, SHA-256, size
//
// S3 makes each PUT atomic (a reader sees the whole old or the whole new
// object) and reads strongly consistent after a write, but knows nothing
// of two objects together. So a publish writes the version's object
// first (If-None-Match: *, so no version is ever replaced) and then the
// pointer, conditional on the ETag of the pointer it read (If-Match, or
// If-None-Match: * for the first): of two publishers the second fails
// instead of interleaving. A reader follows the pointer and checks the
// object's SHA-256 and size against it, so a pointer to a missing or
// different object (a torn or stale listing, a store that does not
// enforce the conditions) is an error and never a release; what the
// bundle is (signature, version above the accepted one, files) is then
// verified by the agent as for every store.
//
// S3 has no long poll: a waiting Fetch asks for the pointer with
// If-None-Match at a jittered interval.
type S3Store struct {
	Bucket, Prefix string
	// Interval is the time between two looks at the pointer while a Fetch
	// waits; zero means 10s. Each look is taken up to a fifth early, at
	// random, so that machines started together do not ask together.
	Interval time.Duration

	client *s3.Client

	mu sync.Mutex
	// seen is when the pointer of a cluster/role was last found unchanged,
	// by its ETag: the agent's next Fetch after a wait ran out looks again
	// only an interval after it, so a machine asks once per interval.
	seen map[string]seenPointer
	// beforePointer, when set, runs between a publish's object and its
	// pointer: tests use it to interleave two publishers.
	beforePointer func()
}

type seenPointer struct {
	etag string
	at   time.Time
}

// S3Options configure an S3Store beyond its s3:// location (endpoint,
// region, profile, HTTP client, poll interval).
type S3Options = s3client.Options

// maxPointerBytes bounds latest.json.
const maxPointerBytes = 4 << 10

// s3Pointer is latest.json.
type s3Pointer struct {
	Version uint64 `json:"version"`
	Key     string `json:"key"`
	SHA256  string `json:"sha256"`
	Size    int64  `json:"size"`
}

// NewS3Store opens the store at location:
// s3://bucket/prefix[?endpoint=URL&region=R&interval=10s]. The
// credentials come from the standard AWS chain (see s3client.New).
func NewS3Store(ctx context.Context, location string, o S3Options) (*S3Store, error) {
	loc, o, err := s3client.Parse(location, o)
	if err != nil {
		return nil, err
	}
	client, err := s3client.New(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("S3 store %s: %w", loc, err)
	}
	return &S3Store{Bucket: loc.Bucket, Prefix: loc.Prefix, Interval: o.Interval, client: client}, nil
}

func (s *S3Store) url(key string) string { return "s3://" + s.Bucket + "/" + key }

func (s *S3Store) where() string {
	return s3client.Location{Bucket: s.Bucket, Prefix: s.Prefix}.String()
}

func (s *S3Store) key(cluster, role, name string) (string, error) {
	if err := CheckName("cluster", cluster); err != nil {
		return "", err
	}
	if err := CheckName("role", role); err != nil {
		return "", err
	}
	k := cluster + "/" + role + "/" + name
	if s.Prefix != "" {
		k = s.Prefix + "/" + k
	}
	return k, nil
}

func (s *S3Store) interval() time.Duration {
	if s.Interval > 0 {
		return s.Interval
	}
	return 10 * time.Second
}

// Fetch implements Store: the bundle the pointer names, checked against
// it. etag is the pointer's ETag.
func (s *S3Store) Fetch(ctx context.Context, cluster, role, etag string, wait time.Duration) (*Fetched, error) {
	pk, err := s.key(cluster, role, "latest.json")
	if err != nil {
		return nil, fmt.Errorf("fetch: %w", err)
	}
	deadline := time.Now().Add(wait)
	// The interval, up to a fifth taken off at random.
	every := backoff.Policy{Min: s.interval(), Max: s.interval(), Factor: 1, Jitter: 0.2}
	if etag != "" {
		s.mu.Lock()
		last, ok := s.seen[pk]
		s.mu.Unlock()
		if ok && last.etag == etag {
			next := last.at.Add(every.Delay(0))
			if next.After(deadline) {
				next = deadline
			}
			if err := sleepUntil(ctx, next); err != nil {
				return nil, err
			}
			if !time.Now().Before(deadline) {
				return nil, ErrNotModified
			}
		}
	}
	for {
		ptr, cur, err := s.readPointer(ctx, pk, etag)
		switch {
		case err == nil && cur != etag:
			return s.fetchObject(ctx, ptr, cur)
		case err == nil, errors.Is(err, ErrNotModified):
			err = ErrNotModified
			s.mu.Lock()
			if s.seen == nil {
				s.seen = map[string]seenPointer{}
			}
			s.seen[pk] = seenPointer{etag: etag, at: time.Now()}
			s.mu.Unlock()
		case errors.Is(err, ErrNotFound):
		default:
			return nil, err
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, err
		}
		if err := sleepUntil(ctx, time.Now().Add(min(every.Delay(0), left))); err != nil {
			return nil, err
		}
	}
}

func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return nil
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}

// readPointer gets latest.json (ErrNotModified when its ETag is still
// ifNoneMatch, ErrNotFound when nothing was published).
func (s *S3Store) readPointer(ctx context.Context, key, ifNoneMatch string) (*s3Pointer, string, error) {
	in := &s3.GetObjectInput{Bucket: &s.Bucket, Key: &key}
	if ifNoneMatch != "" {
		in.IfNoneMatch = aws.String(ifNoneMatch)
	}
	out, err := s.client.GetObject(ctx, in)
	if err != nil {
		if s3client.HTTPStatus(err) == http.StatusNotModified {
			return nil, "", ErrNotModified
		}
		err = s.wrap("get", key, err)
		if errors.Is(err, s3client.ErrNoKey) {
			return nil, "", fmt.Errorf("%w: %w", ErrNotFound, err)
		}
		return nil, "", err
	}
	defer out.Body.Close()
	b, err := io.ReadAll(io.LimitReader(out.Body, maxPointerBytes+1))
	if err != nil {
		return nil, "", fmt.Errorf("get %s: %w", s.url(key), err)
	}
	var p s3Pointer
	if len(b) > maxPointerBytes {
		return nil, "", fmt.Errorf("get %s: larger than %d bytes: not a pointer steppe wrote", s.url(key), maxPointerBytes)
	}
	if err := json.Unmarshal(b, &p); err != nil || p.Key == "" || len(p.SHA256) != 64 {
		return nil, "", fmt.Errorf("get %s: not a pointer steppe wrote (want {version, key, sha256, size}): %v", s.url(key), err)
	}
	return &p, aws.ToString(out.ETag), nil
}

// fetchObject reads the object ptr names and checks it against ptr.
func (s *S3Store) fetchObject(ctx context.Context, ptr *s3Pointer, etag string) (*Fetched, error) {
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.Bucket, Key: &ptr.Key})
	if err != nil {
		if err = s.wrap("get", ptr.Key, err); errors.Is(err, s3client.ErrNoKey) {
			return nil, fmt.Errorf("fetch %s: the pointer names version %d, whose object is missing (a torn or stale listing): keeping the running release", s.url(ptr.Key), ptr.Version)
		}
		return nil, err
	}
	defer out.Body.Close()
	// Bundles are small; reading one whole lets its digest be checked
	// before anything of it is used.
	b, err := io.ReadAll(io.LimitReader(out.Body, DefaultMaxTotalBytes+maxManifestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", s.url(ptr.Key), err)
	}
	sum := sha256.Sum256(b)
	if int64(len(b)) != ptr.Size || hex.EncodeToString(sum[:]) != ptr.SHA256 {
		return nil, fmt.Errorf("fetch %s: %d bytes with SHA-256 %x, but the pointer says %d bytes with %s (a torn or stale listing): keeping the running release",
			s.url(ptr.Key), len(b), sum, ptr.Size, ptr.SHA256)
	}
	return &Fetched{Body: io.NopCloser(bytes.NewReader(b)), ETag: etag}, nil
}

// Publish stores a signed bundle as the latest for its cluster and role:
// its object, then the pointer, conditional on the pointer it replaces.
// It refuses what DirStore.Publish refuses, and fails with
// ErrPublishConflict when another publish moved the pointer meanwhile.
func (s *S3Store) Publish(ctx context.Context, r io.Reader, o PublishOptions) (*Manifest, error) {
	b, err := io.ReadAll(io.LimitReader(&ctxReader{ctx: ctx, r: r}, DefaultMaxTotalBytes+maxManifestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	m, err := checkPublishable(ctx, bytes.NewReader(b), o)
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if (o.Cluster != "" && o.Cluster != m.Cluster) || (o.Role != "" && o.Role != m.Role) {
		return nil, fmt.Errorf("publish: bundle is for %s/%s, not %s/%s", m.Cluster, m.Role, o.Cluster, o.Role)
	}
	pk, err := s.key(m.Cluster, m.Role, "latest.json")
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	vk, _ := s.key(m.Cluster, m.Role, strconv.FormatUint(m.Version, 10)+".tar.gz")
	old, oldTag, err := s.readPointer(ctx, pk, "")
	switch {
	case errors.Is(err, ErrNotFound):
		old = nil
	case err != nil:
		return nil, fmt.Errorf("publish: %w", err)
	case m.Version <= old.Version:
		return nil, fmt.Errorf("publish: version %d is not greater than the published %d for %s/%s at %s", m.Version, old.Version, m.Cluster, m.Role, s.where())
	}
	sum := sha256.Sum256(b)
	ptr := s3Pointer{Version: m.Version, Key: vk, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(b))}
	_, err = s.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket: &s.Bucket, Key: &vk, Body: bytes.NewReader(b), ContentLength: aws.Int64(int64(len(b))),
		ContentType: aws.String("application/gzip"), IfNoneMatch: aws.String("*"),
	})
	if err != nil {
		err = s.wrap("put", vk, err)
	}
	if errors.Is(err, s3client.ErrPrecondition) {
		// The version's object exists: the same bytes (this publish again,
		// after a failure between the two writes) may go on; others not.
		if same, cerr := s.sameObject(ctx, vk, ptr.SHA256); cerr != nil {
			return nil, fmt.Errorf("publish: %w", cerr)
		} else if !same {
			return nil, fmt.Errorf("publish: %s: version %d was already published with other content (%w); publish a newer version", s.url(vk), m.Version, ErrPublishConflict)
		}
	} else if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	if s.beforePointer != nil {
		s.beforePointer()
	}
	pb, _ := json.Marshal(ptr)
	in := &s3.PutObjectInput{
		Bucket: &s.Bucket, Key: &pk, Body: bytes.NewReader(pb), ContentLength: aws.Int64(int64(len(pb))),
		ContentType: aws.String("application/json"), CacheControl: aws.String("no-cache"),
	}
	if old == nil {
		in.IfNoneMatch = aws.String("*")
	} else {
		in.IfMatch = aws.String(oldTag)
	}
	if _, err := s.client.PutObject(ctx, in); err != nil {
		if err = s.wrap("put", pk, err); errors.Is(err, s3client.ErrPrecondition) {
			return nil, fmt.Errorf("publish version %d to %s: %w; look at what is published and publish again above it", m.Version, s.where(), ErrPublishConflict)
		}
		return nil, fmt.Errorf("publish: %w", err)
	}
	return m, nil
}

// sameObject says whether the object at key has the SHA-256 sum.
func (s *S3Store) sameObject(ctx context.Context, key, sum string) (bool, error) {
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.Bucket, Key: &key})
	if err != nil {
		return false, s.wrap("get", key, err)
	}
	defer out.Body.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(out.Body, DefaultMaxTotalBytes+maxManifestBytes+1)); err != nil {
		return false, fmt.Errorf("get %s: %w", s.url(key), err)
	}
	return hex.EncodeToString(h.Sum(nil)) == sum, nil
}

// wrap says which object of the store failed, and how (s3client.Wrap).
func (s *S3Store) wrap(op, key string, err error) error {
	return s3client.Wrap(op, s.url(key), err)
}
