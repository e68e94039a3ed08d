package bundle

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/testenv"
)

func openS3(t *testing.T, location string, o S3Options) *S3Store {
	t.Helper()
	st, err := NewS3Store(context.Background(), location, o)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func putRaw(t *testing.T, st *S3Store, key string, body []byte) {
	t.Helper()
	if _, err := st.client.PutObject(context.Background(), &s3.PutObjectInput{Bucket: &st.Bucket, Key: &key, Body: bytes.NewReader(body)}); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

func fetchVerify(t *testing.T, st Store, etag string, wait time.Duration, p Policy) (*Manifest, string, error) {
	t.Helper()
	f, err := st.Fetch(context.Background(), "prod", "server", etag, wait)
	if err != nil {
		return nil, "", err
	}
	defer f.Body.Close()
	m, _, err := Verify(context.Background(), f.Body, p)
	return m, f.ETag, err
}

// TestS3Store runs the S3 store against a real SeaweedFS S3 gateway on
// 127.0.0.1 (started here; no fake): publish and poll, two publishers at
// once, torn and stale pointers, missing bucket, denied credentials, and
// throttling through a proxy that answers 503 SlowDown.
func TestS3Store(t *testing.T) {
	w := testenv.StartWeed(t)
	w.Env(t)
	key := mustKey(t)
	pol := policy(key)
	loc := "s3://steppe-test/bundles?endpoint=" + url.QueryEscape(w.Endpoint) + "&region=us-east-1"

	t.Run("publish and poll", func(t *testing.T) {
		st := openS3(t, loc, S3Options{Interval: 100 * time.Millisecond})
		w.CreateBucket(t, st.Bucket)
		if _, err := st.Fetch(context.Background(), "prod", "server", "", 0); !errors.Is(err, ErrNotFound) {
			t.Fatalf("nothing published: want ErrNotFound, got %v", err)
		}
		if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles)), PublishOptions{Keys: []PublicKey{key.Public()}}); err != nil {
			t.Fatal(err)
		}
		m, etag, err := fetchVerify(t, st, "", 0, pol)
		if err != nil || m.Version != 1 || etag == "" {
			t.Fatalf("fetch v1: %+v %q %v", m, etag, err)
		}
		if _, _, err := fetchVerify(t, st, etag, 0, pol); !errors.Is(err, ErrNotModified) {
			t.Fatalf("unchanged: want ErrNotModified, got %v", err)
		}
		start := time.Now()
		if _, _, err := fetchVerify(t, st, etag, 500*time.Millisecond, pol); !errors.Is(err, ErrNotModified) || time.Since(start) < 500*time.Millisecond {
			t.Fatalf("unchanged with a wait: %v after %v", err, time.Since(start))
		}
		// Not greater: refused, and the pointer stays.
		if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles)), PublishOptions{}); err == nil || !strings.Contains(err.Error(), "not greater") {
			t.Fatalf("republish of version 1: %v", err)
		}
		// A waiting fetch sees a publish made while it waits.
		go func() {
			time.Sleep(300 * time.Millisecond)
			if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(2), sampleFiles)), PublishOptions{}); err != nil {
				t.Error(err)
			}
		}()
		p := pol
		p.After = 1
		m, _, err = fetchVerify(t, st, etag, 20*time.Second, p)
		if err != nil || m.Version != 2 {
			t.Fatalf("waiting fetch: %+v %v", m, err)
		}
	})

	t.Run("two publishers", func(t *testing.T) {
		st := openS3(t, loc, S3Options{})
		w.CreateBucket(t, st.Bucket)
		st.Prefix = "two-publishers"
		if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles)), PublishOptions{}); err != nil {
			t.Fatal(err)
		}
		// A reads the pointer (version 1) and writes its object; before it
		// writes the pointer, B publishes version 3 all the way. A's
		// pointer write, conditional on version 1's pointer, must fail.
		a := openS3(t, loc, S3Options{})
		a.Prefix = st.Prefix
		inB := make(chan struct{})
		bDone := make(chan error)
		a.beforePointer = func() {
			close(inB)
			<-bDone
		}
		go func() {
			<-inB
			_, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(3), sampleFiles)), PublishOptions{})
			bDone <- err
			close(bDone)
		}()
		_, errA := a.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(2), sampleFiles)), PublishOptions{})
		errB := <-bDone
		if errB != nil {
			t.Fatalf("publisher B: %v", errB)
		}
		if !errors.Is(errA, ErrPublishConflict) {
			t.Fatalf("publisher A, interleaved with B: want ErrPublishConflict, got %v", errA)
		}
		t.Logf("A: %v", errA)
		m, _, err := fetchVerify(t, st, "", 0, pol)
		if err != nil || m.Version != 3 {
			t.Fatalf("after the two: %+v %v (want B's version 3)", m, err)
		}

		// Eight at once, each its own version: whatever wins, the pointer
		// names a version whose publish succeeded, and every failure says why.
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok := map[uint64]bool{}
		for v := uint64(10); v < 18; v++ {
			b := buildBundle(t, &key, baseManifest(v), sampleFiles)
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := st.Publish(context.Background(), bytes.NewReader(b), PublishOptions{})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					ok[v] = true
				case errors.Is(err, ErrPublishConflict), strings.Contains(err.Error(), "not greater"):
				default:
					t.Errorf("publisher of %d: %v", v, err)
				}
			}()
		}
		wg.Wait()
		m, _, err = fetchVerify(t, st, "", 0, pol)
		if err != nil || !ok[m.Version] {
			t.Fatalf("after eight at once: the pointer names %+v (%v); the publishes that succeeded: %v", m, err, ok)
		}
		t.Logf("eight at once: %d succeeded, version %d is the latest", len(ok), m.Version)
	})

	t.Run("torn and stale", func(t *testing.T) {
		st := openS3(t, loc, S3Options{})
		w.CreateBucket(t, st.Bucket)
		st.Prefix = "torn"
		v1 := buildBundle(t, &key, baseManifest(1), sampleFiles)
		if _, err := st.Publish(context.Background(), bytes.NewReader(v1), PublishOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(2), sampleFiles)), PublishOptions{}); err != nil {
			t.Fatal(err)
		}
		pk := "torn/prod/server/latest.json"
		ptr := func(p s3Pointer) []byte { b, _ := json.Marshal(p); return b }
		sum := sha256.Sum256(v1)
		// A pointer to an object that is not there.
		putRaw(t, st, pk, ptr(s3Pointer{Version: 5, Key: "torn/prod/server/5.tar.gz", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(v1))}))
		if _, _, err := fetchVerify(t, st, "", 0, pol); err == nil || errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "missing") {
			t.Fatalf("pointer to a missing object: %v", err)
		} else {
			t.Logf("missing: %v", err)
		}
		// A pointer whose object is not the one it names.
		putRaw(t, st, pk, ptr(s3Pointer{Version: 2, Key: "torn/prod/server/1.tar.gz", SHA256: strings.Repeat("0", 64), Size: int64(len(v1))}))
		if _, _, err := fetchVerify(t, st, "", 0, pol); err == nil || !strings.Contains(err.Error(), "torn or stale") {
			t.Fatalf("pointer with another digest: %v", err)
		}
		// A stale pointer (back to version 1, consistent) for an agent
		// that accepted 2: fetched, then refused for what it is.
		putRaw(t, st, pk, ptr(s3Pointer{Version: 1, Key: "torn/prod/server/1.tar.gz", SHA256: hex.EncodeToString(sum[:]), Size: int64(len(v1))}))
		p := pol
		p.After = 2
		var stale *StaleError
		if _, _, err := fetchVerify(t, st, "", 0, p); !errors.As(err, &stale) {
			t.Fatalf("stale pointer: want a StaleError, got %v", err)
		}
		// Not a pointer at all.
		putRaw(t, st, pk, []byte("<html>"))
		if _, _, err := fetchVerify(t, st, "", 0, pol); err == nil || !strings.Contains(err.Error(), "not a pointer") {
			t.Fatalf("garbage pointer: %v", err)
		}
	})

	t.Run("clear errors", func(t *testing.T) {
		nob := openS3(t, "s3://no-such-bucket/x?endpoint="+url.QueryEscape(w.Endpoint), S3Options{})
		if _, err := nob.Fetch(context.Background(), "prod", "server", "", 0); !errors.Is(err, ErrNoBucket) {
			t.Fatalf("missing bucket: want ErrNoBucket, got %v", err)
		} else {
			t.Logf("missing bucket: %v", err)
		}
		wrong := openS3(t, loc, S3Options{Profile: "wrong"})
		if _, err := wrong.Fetch(context.Background(), "prod", "server", "", 0); !errors.Is(err, ErrDenied) {
			t.Fatalf("wrong secret: want ErrDenied, got %v", err)
		} else {
			t.Logf("wrong secret: %v", err)
		}
		reader := openS3(t, loc, S3Options{Profile: "reader"})
		reader.Prefix = "reader"
		if _, err := reader.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles)), PublishOptions{}); !errors.Is(err, ErrDenied) {
			t.Fatalf("publish with read-only credentials: want ErrDenied, got %v", err)
		}
		if _, err := NewS3Store(context.Background(), "s3://b/p?endpont=x", S3Options{}); err == nil || !strings.Contains(err.Error(), "unknown option") {
			t.Fatalf("misspelt option: %v", err)
		}
	})

	t.Run("throttling", func(t *testing.T) {
		// A proxy in front of the gateway answers 503 SlowDown while on.
		th := w.ThrottlingProxy(t)
		direct := openS3(t, loc, S3Options{})
		w.CreateBucket(t, direct.Bucket)
		direct.Prefix = "throttle"
		if _, err := direct.Publish(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), sampleFiles)), PublishOptions{}); err != nil {
			t.Fatal(err)
		}
		st := openS3(t, "s3://steppe-test/throttle?endpoint="+url.QueryEscape(th.URL), S3Options{Interval: 100 * time.Millisecond})
		th.On.Store(true)
		if _, err := st.Fetch(context.Background(), "prod", "server", "", 0); !errors.Is(err, ErrThrottled) {
			t.Fatalf("throttled: want ErrThrottled, got %v", err)
		} else {
			t.Logf("throttled: %v", err)
		}
		// An agent's pull loop (backoff from 250ms) under throttling gets
		// nothing and keeps asking, less often; once the store recovers it
		// gets the release.
		fl := newFleet(key.Public())
		ctx, cancel := context.WithCancel(context.Background())
		defer func() { cancel(); fl.wg.Wait() }()
		fl.wg.Add(1)
		go fl.run(ctx, st, time.Second)
		time.Sleep(2 * time.Second)
		n := th.Refused.Load()
		if n < 3 || n > 8 {
			t.Fatalf("%d requests refused in 2 s of throttling: want a few, spaced by the backoff (250ms doubling)", n)
		}
		fl.mu.Lock()
		got := len(fl.got[1])
		fl.mu.Unlock()
		if got != 0 {
			t.Fatal("a throttled agent got a release")
		}
		th.On.Store(false)
		off := time.Now()
		at := fl.have(t, 1, 1, 30*time.Second)
		t.Logf("%d requests refused; release fetched %v after the store recovered", n, at[0].Sub(off))
	})
}
