package artifact

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/s3client"
)

// openS3 answers an s3://bucket/prefix/... URL of a store in the release
// layout (uploaded as is, for example from a directory that `steppe
// artifact build` made) like a store server would: what is read is
// verified exactly as over HTTP. The query (endpoint, region) is the
// store's; the credentials come from the standard AWS chain.
func (f *Fetcher) openS3(ctx context.Context, u *url.URL) (*http.Response, error) {
	client, err := f.s3Client(ctx, u)
	if err != nil {
		return nil, err
	}
	bucket, key := u.Host, strings.TrimPrefix(u.Path, "/")
	out, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: &bucket, Key: &key})
	if err != nil {
		err = s3client.Wrap("GET", "s3://"+bucket+"/"+key, err)
		code := 0
		switch {
		case errors.Is(err, s3client.ErrNoKey), errors.Is(err, s3client.ErrNoBucket):
			code = http.StatusNotFound
		case errors.Is(err, s3client.ErrDenied):
			code = http.StatusForbidden
		case errors.Is(err, s3client.ErrThrottled):
			code = http.StatusServiceUnavailable // retried, with backoff
		}
		if code != 0 {
			return nil, &httpStatusError{url: u.String(), code: code, err: err}
		}
		return nil, err
	}
	return &http.Response{StatusCode: http.StatusOK, Body: out.Body}, nil
}

// s3Client is the client of the store u belongs to, made once per
// bucket and options.
func (f *Fetcher) s3Client(ctx context.Context, u *url.URL) (*s3.Client, error) {
	id := u.Host + "?" + u.RawQuery
	f.mu.Lock()
	defer f.mu.Unlock()
	if c := f.s3[id]; c != nil {
		return c, nil
	}
	_, o, err := s3client.Parse("s3://"+id, s3client.Options{HTTPClient: f.Client})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errVerify, err)
	}
	c, err := s3client.New(ctx, o)
	if err != nil {
		return nil, fmt.Errorf("%w: artifact store s3://%s: %v", errVerify, u.Host, err)
	}
	if f.s3 == nil {
		f.s3 = map[string]*s3.Client{}
	}
	f.s3[id] = c
	return c, nil
}
