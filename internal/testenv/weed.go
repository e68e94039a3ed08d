package testenv

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/steppe/steppe/internal/s3client"
)

// WeedVersion is the SeaweedFS module version scripts/build-weed builds.
const WeedVersion = "v0.0.0-20261109003541-7506e5f91cd6"

// WeedBinary is the cached `weed` (SeaweedFS), or the end of the test
// (Lacks) when scripts/build-weed has not built it.
func WeedBinary(t testing.TB) string {
	t.Helper()
	cache := os.Getenv("STEPPE_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			t.Fatalf("weed: no STEPPE_CACHE and %v", err)
		}
		cache = filepath.Join(home, ".cache", "steppe")
	}
	p := filepath.Join(cache, "weed", WeedVersion, "weed")
	if _, err := os.Stat(p); err != nil {
		Lacks(t, "no SeaweedFS binary at %s: build it with scripts/build-weed (about 15 minutes once)", p)
	}
	return p
}

// Weed is a SeaweedFS server (master, volume, filer and S3 gateway in one
// process) on 127.0.0.1, started for a test and killed at its end.
type Weed struct {
	// Endpoint is the S3 gateway's URL.
	Endpoint string
	// CredentialsFile is an AWS shared credentials file (0600) with the
	// profiles "default" (may do anything), "reader" (may read and list)
	// and "wrong" (a known key with a wrong secret).
	CredentialsFile string
	// Log is the server's output.
	Log string
	// Pid is the server's process.
	Pid int
}

// StartWeed starts SeaweedFS with its S3 gateway and waits until the
// gateway answers. Nothing it starts listens beyond 127.0.0.1, and its
// telemetry is off.
func StartWeed(t testing.TB) *Weed {
	t.Helper()
	bin := WeedBinary(t)
	dir := t.TempDir()
	const (
		admin, adminSecret   = "STEPPEADMINKEY", "steppe-admin-secret-for-tests"
		reader, readerSecret = "STEPPEREADERKEY", "steppe-reader-secret-for-tests"
	)
	s3conf := fmt.Sprintf(`{"identities":[
 {"name":"admin","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Admin","Read","Write","List","Tagging"]},
 {"name":"reader","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Read","List"]}]}`,
		admin, adminSecret, reader, readerSecret)
	conf := filepath.Join(dir, "s3.json")
	if err := os.WriteFile(conf, []byte(s3conf), 0o600); err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(dir, "credentials")
	credText := fmt.Sprintf("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n\n[reader]\naws_access_key_id = %s\naws_secret_access_key = %s\n\n[wrong]\naws_access_key_id = %s\naws_secret_access_key = not-the-secret\n",
		admin, adminSecret, reader, readerSecret, admin)
	if err := os.WriteFile(creds, []byte(credText), 0o600); err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, 8)
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "weed.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	p := func(i int) string { return strconv.Itoa(ports[i]) }
	cmd := exec.Command(bin, "server",
		"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir="+data, "-volume.max=4",
		"-master.port="+p(0), "-master.port.grpc="+p(1), "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
		"-volume.port="+p(2), "-volume.port.grpc="+p(3),
		"-filer", "-filer.port="+p(4), "-filer.port.grpc="+p(5),
		"-s3", "-s3.port="+p(6), "-s3.port.grpc="+p(7), "-s3.config="+conf, "-s3.iam=false",
	)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", bin, err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cmd.Process.Kill()
			cmd.Wait()
			logf.Close()
		})
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("weed log (tail):\n%s", b)
		}
	})
	w := &Weed{Endpoint: "http://127.0.0.1:" + p(6), CredentialsFile: creds, Log: logPath, Pid: cmd.Process.Pid}
	// The gateway answers once it is up; an unsigned request gets 403.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, w.Endpoint+"/", nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			return w
		}
		if ctx.Err() != nil {
			stop()
			b, _ := os.ReadFile(logPath)
			t.Fatalf("SeaweedFS's S3 gateway did not answer at %s within 90 s: %v\n%s", w.Endpoint, err, tail(b, 3000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return b
}

// freePorts returns n ports of 127.0.0.1 that were free a moment ago.
func freePorts(t testing.TB, n int) []int {
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// Env points the standard AWS chain of this test process at w's
// credentials file only: nothing from the machine's environment or
// profiles, no metadata service. The secrets stay in the 0600 file; the
// environment names only its path.
func (w *Weed) Env(t testing.TB) {
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
		"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", w.CredentialsFile)
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "no-config"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// Throttle is a proxy in front of a Weed's S3 gateway that answers every
// request with 503 SlowDown, as S3 does when throttling, while On is set,
// and forwards them otherwise (with the Host the client signed).
type Throttle struct {
	URL     string
	On      atomic.Bool
	Refused atomic.Int64 // requests answered 503
}

// ThrottlingProxy starts a Throttle on 127.0.0.1 for the test.
func (w *Weed) ThrottlingProxy(t testing.TB) *Throttle {
	target, err := url.Parse(w.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	th := &Throttle{}
	rp := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target)
		pr.Out.Host = pr.In.Host
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if th.On.Load() {
			th.Refused.Add(1)
			rw.Header().Set("Content-Type", "application/xml")
			rw.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(rw, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`)
			return
		}
		rp.ServeHTTP(rw, r)
	}))
	t.Cleanup(srv.Close)
	th.URL = srv.URL
	return th
}

// CreateBucket creates bucket with the "default" profile's keys, waiting
// (up to a minute) while SeaweedFS's volume server is still joining its
// master. A bucket that exists already is fine.
func (w *Weed) CreateBucket(t testing.TB, bucket string) {
	t.Helper()
	ctx := context.Background()
	c, err := s3client.New(ctx, s3client.Options{Endpoint: w.Endpoint, Profile: "default"})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(300 * time.Millisecond) {
		_, err := c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: &bucket})
		if err == nil || strings.Contains(err.Error(), "BucketAlreadyOwnedByYou") || strings.Contains(err.Error(), "BucketAlreadyExists") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("create bucket %s at %s: %v", bucket, w.Endpoint, err)
		}
	}
}
