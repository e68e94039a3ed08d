package artifact

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/s3client"
	"github.com/steppe/steppe/internal/testenv"
)

// TestFetchFromS3: a store in the release layout, uploaded as is into a
// real SeaweedFS S3 gateway on 127.0.0.1, is fetched and verified like
// one over HTTP; a tampered SHA256SUMS, a missing version, a missing
// bucket and denied credentials are clear errors.
func TestFetchFromS3(t *testing.T) {
	w := testenv.StartWeed(t)
	w.Env(t)
	ts := newTestStore(t)
	ctx := context.Background()
	c, err := s3client.New(ctx, s3client.Options{Endpoint: w.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	bucket := "artifacts"
	w.CreateBucket(t, bucket)
	upload := func(rel string, b []byte) {
		key := "store/" + rel
		if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: &bucket, Key: &key, Body: strings.NewReader(string(b))}); err != nil {
			t.Fatalf("upload %s: %v", key, err)
		}
	}
	err = filepath.WalkDir(ts.dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(ts.dir, p)
		upload(filepath.ToSlash(rel), b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	store := "s3://artifacts/store?endpoint=" + url.QueryEscape(w.Endpoint)
	f := quietFetcher(t)
	p, err := f.Fetch(ctx, store, "nomad", "1.9.3", "linux", "amd64", ts.keyring)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); string(got) != "#!/bin/sh\necho Nomad v1.9.3\n" {
		t.Fatalf("fetched binary = %q", got)
	}
	if _, err := f.Fetch(ctx, store, "nomad", "1.8.0", "linux", "amd64", ts.keyring); !errors.Is(err, s3client.ErrNoKey) {
		t.Fatalf("missing version: want ErrNoKey, got %v", err)
	}
	// Tampered: the signature no longer matches.
	sums, _ := os.ReadFile(filepath.Join(ts.dir, strings.TrimPrefix(sumsPath, "/")))
	upload("nomad/1.10.5/nomad_1.10.5_SHA256SUMS", append(sums, []byte("0000  extra\n")...))
	if _, err := f.Fetch(ctx, store, "nomad", "1.10.5", "linux", "amd64", ts.keyring); err == nil || !strings.Contains(err.Error(), "not signed by a trusted key") {
		t.Fatalf("tampered SHA256SUMS: %v", err)
	}
	if _, err := quietFetcher(t).Fetch(ctx, "s3://no-such-bucket/store?endpoint="+url.QueryEscape(w.Endpoint), "nomad", "1.9.3", "linux", "amd64", ts.keyring); !errors.Is(err, s3client.ErrNoBucket) {
		t.Fatalf("missing bucket: want ErrNoBucket, got %v", err)
	}
	t.Setenv("AWS_PROFILE", "wrong")
	if _, err := quietFetcher(t).Fetch(ctx, store, "nomad", "1.9.3", "linux", "amd64", ts.keyring); !errors.Is(err, s3client.ErrDenied) {
		t.Fatalf("wrong secret: want ErrDenied, got %v", err)
	}
}
