package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/s3client"
	"github.com/steppe/steppe/internal/testenv"
)

// TestPullFromS3: an agent whose bundle store is s3://… on a real
// SeaweedFS gateway (behind a proxy that can throttle) runs its releases
// from it, keeps its last good release while the store throttles it
// (503 SlowDown) and while the pointer names a missing object (a torn
// listing), and takes the next release once the store is well again.
func TestPullFromS3(t *testing.T) {
	w := testenv.StartWeed(t)
	w.Env(t)
	th := w.ThrottlingProxy(t)
	ctx := context.Background()
	direct := "s3://agents/b?endpoint=" + url.QueryEscape(w.Endpoint)
	pub, err := bundle.NewS3Store(ctx, direct, bundle.S3Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := s3client.New(ctx, s3client.Options{Endpoint: w.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	bucket := "agents"
	w.CreateBucket(t, bucket)
	s := newTestStore(t)
	publish := func(v uint64) {
		t.Helper()
		if _, err := pub.Publish(ctx, bytes.NewReader(s.build(v, nil)), bundle.PublishOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	publish(1)
	s.url = "s3://agents/b?interval=200ms&endpoint=" + url.QueryEscape(th.URL)
	cl, _ := runAgent(t, s)
	running := func(v uint64) func(BundleStatus, []string) bool {
		return func(b BundleStatus, r []string) bool {
			return b.Version == v && b.Pending == 0 && len(r) == 1 && r[0] == "hello"
		}
	}
	waitBundle(t, cl, "release 1 from S3", 30*time.Second, running(1))

	th.On.Store(true)
	publish(2)
	st := waitBundle(t, cl, "a throttled pull shows in status", 20*time.Second, func(b BundleStatus, r []string) bool {
		return strings.Contains(b.LastError, "SlowDown")
	})
	if st.Version != 1 {
		t.Fatalf("throttled: running %d, want the last good 1", st.Version)
	}
	time.Sleep(2 * time.Second)
	refused := th.Refused.Load()
	waitBundle(t, cl, "still release 1 while throttled", time.Second, running(1))
	if refused > 12 {
		t.Fatalf("%d requests in about 3 s of throttling: the agent does not back off", refused)
	}
	th.On.Store(false)
	waitBundle(t, cl, "release 2 once the store recovers", 40*time.Second, running(2))

	// A torn listing: the pointer names version 3, whose object is not
	// there. The agent says so and keeps release 2.
	ptr, _ := json.Marshal(map[string]any{"version": 3, "key": "b/c1/web/3.tar.gz", "sha256": strings.Repeat("ab", 32), "size": 100})
	key := "b/c1/web/latest.json"
	if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: &bucket, Key: &key, Body: bytes.NewReader(ptr)}); err != nil {
		t.Fatal(err)
	}
	st = waitBundle(t, cl, "a torn listing shows in status", 20*time.Second, func(b BundleStatus, r []string) bool {
		return strings.Contains(b.LastError, "torn or stale")
	})
	if st.Version != 2 {
		t.Fatalf("torn listing: running %d, want 2", st.Version)
	}
	waitBundle(t, cl, "still release 2 after the torn listing", time.Second, running(2))
	t.Logf("throttled: %d requests refused; torn: %s", refused, st.LastError)
}
