// Package s3client opens S3 clients for steppe's stores (bundles and
// artifacts) from an s3://bucket/prefix location and the standard AWS
// chain, and turns the SDK's errors into ones that say what to do.
package s3client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// What an S3 request can fail with, wrapped with the object it was for.
var (
	// ErrThrottled: the store answered 503 SlowDown (or another
	// throttling code); ask again later, less often.
	ErrThrottled = errors.New("S3 throttled the request (SlowDown): backing off")
	// ErrDenied: the credentials were refused or lack the permission.
	ErrDenied = errors.New("S3 denied the request: check the credentials (the standard AWS chain: AWS_ACCESS_KEY_ID, AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE) and the bucket's policy")
	// ErrNoBucket: the bucket does not exist.
	ErrNoBucket = errors.New("no such bucket: create it, or correct the store's s3://BUCKET/PREFIX")
	// ErrNoKey: the object does not exist.
	ErrNoKey = errors.New("no such object")
	// ErrPrecondition: a conditional request's condition did not hold
	// (412, or 409 ConditionalRequestConflict).
	ErrPrecondition = errors.New("precondition failed")
)

// Options configure a client beyond its s3:// location.
type Options struct {
	// Endpoint is the S3 API's URL (a gateway's, such as
	// http://127.0.0.1:8333); empty means the standard chain's
	// (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile) or AWS's own.
	// A custom endpoint is addressed path-style (endpoint/bucket/key).
	Endpoint string
	// Region; empty means the standard chain's (AWS_REGION, the
	// profile), else us-east-1.
	Region string
	// Profile is the shared configuration's profile; empty means the
	// standard chain's (AWS_PROFILE, else "default").
	Profile string
	// HTTPClient does the requests; nil means the SDK's.
	HTTPClient *http.Client
	// Interval is how often a poller looks for a change (interval=10s
	// in the location); zero means its default.
	Interval time.Duration
}

// Location is a parsed s3://bucket/prefix.
type Location struct {
	Bucket, Prefix string
}

// String is s3://bucket/prefix.
func (l Location) String() string {
	if l.Prefix == "" {
		return "s3://" + l.Bucket
	}
	return "s3://" + l.Bucket + "/" + l.Prefix
}

// Key is the object key of name under the prefix.
func (l Location) Key(name string) string {
	if l.Prefix == "" {
		return name
	}
	return l.Prefix + "/" + name
}

// Parse splits s3://bucket/prefix?endpoint=URL&region=R&interval=D into
// the location and what the query sets in o.
func Parse(location string, o Options) (Location, Options, error) {
	u, err := url.Parse(location)
	if err != nil || u.Scheme != "s3" || u.Host == "" {
		return Location{}, o, fmt.Errorf("S3 store %q: want s3://BUCKET/PREFIX[?endpoint=URL&region=REGION&interval=10s]", location)
	}
	q := u.Query()
	for k := range q {
		switch k {
		case "endpoint", "region", "interval":
		default:
			return Location{}, o, fmt.Errorf("S3 store %q: unknown option %q (endpoint, region and interval are known)", location, k)
		}
	}
	if v := q.Get("endpoint"); v != "" {
		if eu, err := url.Parse(v); err != nil || (eu.Scheme != "http" && eu.Scheme != "https") || eu.Host == "" {
			return Location{}, o, fmt.Errorf("S3 store %q: endpoint %q: want an http(s):// URL", location, v)
		}
		o.Endpoint = v
	}
	if v := q.Get("region"); v != "" {
		o.Region = v
	}
	if v := q.Get("interval"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return Location{}, o, fmt.Errorf("S3 store %q: interval %q: want a duration such as 10s", location, v)
		}
		o.Interval = d
	}
	return Location{Bucket: u.Host, Prefix: strings.Trim(u.Path, "/")}, o, nil
}

// New returns a client for o, with the credentials, region and endpoint
// of the standard AWS chain as far as a machine's agent needs it (see
// chain.go): the environment, the shared credentials and config files,
// and the EC2 instance role where AWS_EC2_METADATA_DISABLED=false says
// so (off a cloud, a probe of the metadata address leaves the machine's
// network: DESIGN decision 11). The SDK's config module, with its SSO
// and STS clients, is not linked: it cost every agent 3 MiB of memory.
// Each call is tried once: callers back off with internal/backoff, and
// the SDK's own retries would hide a throttling store behind its quota.
func New(ctx context.Context, o Options) (*s3.Client, error) {
	ch, err := loadChain(o)
	if err != nil {
		return nil, err
	}
	so := s3.Options{
		Region:       ch.region,
		Credentials:  aws.NewCredentialsCache(ch),
		Retryer:      aws.NopRetryer{},
		UsePathStyle: ch.endpoint != "",
	}
	if ch.endpoint != "" {
		so.BaseEndpoint = aws.String(ch.endpoint)
	}
	if o.HTTPClient != nil {
		so.HTTPClient = o.HTTPClient
	}
	return s3.New(so), nil
}

// Wrap says what op on where failed and wraps ErrNoBucket, ErrNoKey,
// ErrDenied, ErrThrottled or ErrPrecondition where the SDK's error is one.
func Wrap(op, where string, err error) error {
	var api smithy.APIError
	code := ""
	if errors.As(err, &api) {
		code = api.ErrorCode()
	}
	status := HTTPStatus(err)
	switch {
	case code == "NoSuchBucket":
		return fmt.Errorf("%s %s: %w", op, where, ErrNoBucket)
	case code == "NoSuchKey" || code == "NotFound" || status == http.StatusNotFound:
		return fmt.Errorf("%s %s: %w", op, where, ErrNoKey)
	case code == "PreconditionFailed" || code == "ConditionalRequestConflict" || status == http.StatusPreconditionFailed:
		return fmt.Errorf("%s %s: %w", op, where, ErrPrecondition)
	case code == "AccessDenied" || code == "InvalidAccessKeyId" || code == "SignatureDoesNotMatch" || status == http.StatusForbidden:
		return fmt.Errorf("%s %s: %w (%s)", op, where, ErrDenied, code)
	case code == "SlowDown" || code == "Throttling" || code == "ThrottlingException" || code == "RequestLimitExceeded" ||
		status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests:
		return fmt.Errorf("%s %s: %w (HTTP %d %s)", op, where, ErrThrottled, status, code)
	}
	return fmt.Errorf("%s %s: %w", op, where, err)
}

// HTTPStatus is the HTTP status of an SDK error's response, or 0.
func HTTPStatus(err error) int {
	var re *smithyhttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}
