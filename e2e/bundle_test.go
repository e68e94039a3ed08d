package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/render"
)

// TestBundleCLI drives `steppe bundle` as an operator would: keys, build,
// sign, verify, publish to a directory, serve it, publish over HTTP; and
// pulls as an agent would (long poll, verify, unpack, render).
func TestBundleCLI(t *testing.T) {
	bin := steppeBinary(t)
	work := t.TempDir()
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Dir = work
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	mustRun := func(args ...string) string {
		t.Helper()
		out, err := run(args...)
		if err != nil {
			t.Fatalf("steppe %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	mustFail := func(want string, args ...string) {
		t.Helper()
		out, err := run(args...)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() == 0 || !strings.Contains(out, want) {
			t.Fatalf("steppe %s: %v, output %q, want a failure saying %q", strings.Join(args, " "), err, out, want)
		}
	}

	mustRun("bundle", "keygen", "-out", "ops")
	mustRun("bundle", "keygen", "-out", "rogue")
	if fi, err := os.Stat(filepath.Join(work, "ops.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("ops.key: %v %v", fi.Mode(), err)
	}
	mustFail("file exists", "bundle", "keygen", "-out", "ops")

	cfg := filepath.Join(work, "cfg")
	for p, c := range map[string]string{
		"nomad/nomad.hcl.tmpl": "name = {{ quote .Machine.Name }}\nservers = {{ split \",\" .Vars.servers | toJSON }}\nlevel = {{ .Vars.level }}\n",
		"services/nomad.json":  `{"name": "nomad"}`,
		"bundle.json":          `{"variables": {"servers": "10.0.0.1,10.0.0.2", "level": "INFO"}}`,
	} {
		os.MkdirAll(filepath.Dir(filepath.Join(cfg, p)), 0o755)
		if err := os.WriteFile(filepath.Join(cfg, p), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mustRun("bundle", "build", "cfg", "-cluster", "prod", "-role", "server", "-version", "10", "-expires", "1h", "-var", "level=DEBUG", "-out", "v10.tgz")
	mustFail("not signed", "bundle", "verify", "v10.tgz", "-key", "ops.pub")
	mustRun("bundle", "sign", "v10.tgz", "-key", "ops.key")
	out := mustRun("bundle", "verify", "v10.tgz", "-key", "rogue.pub", "-key", "ops.pub", "-cluster", "prod", "-role", "server")
	if !strings.Contains(out, "ok: prod/server version 10") {
		t.Fatalf("verify said %q", out)
	}
	mustFail("not made by any trusted key", "bundle", "verify", "v10.tgz", "-key", "rogue.pub")
	mustFail("not greater than the last accepted 10", "bundle", "verify", "v10.tgz", "-key", "ops.pub", "-min-version", "11")
	mustFail(`role "server", want "client"`, "bundle", "verify", "v10.tgz", "-key", "ops.pub", "-role", "client")
	mustFail("needs -cluster", "bundle", "build", "cfg", "-role", "server", "-out", "x.tgz")

	store := filepath.Join(work, "store")
	mustRun("bundle", "publish", "v10.tgz", "-store", store, "-key", "ops.pub")
	mustFail("not greater than the published 10", "bundle", "publish", "v10.tgz", "-store", store)

	// Serve the store; the server accepts PUTs signed by ops.
	base := serveBundles(t, bin, work, "http://", store, "-key", "ops.pub")

	// Pull as an agent does.
	keys, err := bundle.ReadPublicKeyFiles(filepath.Join(work, "ops.pub"))
	if err != nil {
		t.Fatal(err)
	}
	hs, err := bundle.NewHTTPStore(base, nil)
	if err != nil {
		t.Fatal(err)
	}
	releases, state := filepath.Join(work, "machine", "releases"), filepath.Join(work, "machine", "state")
	// pull is an agent's pull step; it returns errors rather than failing
	// the test, as it also runs on a goroutine of its own.
	pull := func(etag string, wait time.Duration) (*bundle.Release, string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		f, err := hs.Fetch(ctx, "prod", "server", etag, wait)
		if err != nil {
			return nil, "", err
		}
		defer f.Body.Close()
		after, err := bundle.LoadAccepted(state)
		if err != nil {
			return nil, "", err
		}
		r, err := bundle.Unpack(ctx, f.Body, releases, bundle.Policy{Keys: keys, Cluster: "prod", Role: "server", After: after})
		if err != nil {
			return nil, "", err
		}
		if _, err := render.Render(r.Dir, r.Manifest.Templates, render.Facts{Name: "web-1"}, r.Manifest.Variables); err != nil {
			return nil, "", err
		}
		if err := bundle.SaveAccepted(state, r.Version); err != nil {
			return nil, "", err
		}
		if err := bundle.Activate(releases, r.Version); err != nil {
			return nil, "", err
		}
		return r, f.ETag, nil
	}
	r, etag, err := pull("", 0)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(releases, "current", "nomad", "nomad.hcl"))
	want := "name = \"web-1\"\nservers = [\"10.0.0.1\",\"10.0.0.2\"]\nlevel = DEBUG\n"
	if r.Version != 10 || string(got) != want {
		t.Fatalf("release %d renders %q, want %q", r.Version, got, want)
	}

	// A long poll returns when a new version is published over HTTP.
	type result struct {
		r   *bundle.Release
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, _, err := pull(etag, time.Minute)
		done <- result{r, err}
	}()
	mustRun("bundle", "build", "cfg", "-cluster", "prod", "-role", "server", "-version", "11", "-key", "ops.key", "-out", "v11.tgz")
	mustRun("bundle", "build", "cfg", "-cluster", "prod", "-role", "server", "-version", "12", "-key", "rogue.key", "-out", "rogue.tgz")
	mustFail("not made by any trusted key", "bundle", "publish", "rogue.tgz", "-store", base)
	out = mustRun("bundle", "publish", "v11.tgz", "-store", base)
	if !strings.Contains(out, "version 11") {
		t.Fatalf("publish said %q", out)
	}
	select {
	case res := <-done:
		if res.err != nil {
			t.Fatal(res.err)
		}
		if res.r.Version != 11 {
			t.Fatalf("long poll got version %d", res.r.Version)
		}
	case <-time.After(time.Minute):
		t.Fatal("long poll did not return after a publish")
	}
	if v, _, err := bundle.Current(releases); err != nil || v != 11 {
		t.Fatalf("current = %d, %v", v, err)
	}
	if v, _ := bundle.LoadAccepted(state); v != 11 {
		t.Fatalf("accepted = %d", v)
	}
	if _, err := os.Stat(filepath.Join(store, "prod", "server", strconv.Itoa(11)+".tar.gz")); err != nil {
		t.Fatal(err)
	}
}

// TestBundleServeTLS serves a store over HTTPS with a certificate made
// here and pulls from it with a client that trusts only that certificate.
func TestBundleServeTLS(t *testing.T) {
	bin := steppeBinary(t)
	work := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "bundles"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(caKey)
	os.WriteFile(filepath.Join(work, "tls.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(filepath.Join(work, "tls.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)

	k, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	now := time.Now()
	os.MkdirAll(filepath.Join(work, "cfg"), 0o755)
	os.WriteFile(filepath.Join(work, "cfg", "a.conf"), []byte("a"), 0o644)
	if _, err := bundle.Build(&buf, filepath.Join(work, "cfg"), bundle.Manifest{Cluster: "prod", Role: "server", Version: 1, Created: now, Expires: now.Add(time.Hour)}, &k); err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(work, "store")
	if _, err := bundle.NewDirStore(store).Publish(context.Background(), &buf, bundle.PublishOptions{}); err != nil {
		t.Fatal(err)
	}

	base := serveBundles(t, bin, work, "https://", store, "-tls-cert", "tls.crt", "-tls-key", "tls.key")
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	hs, err := bundle.NewHTTPStore(base, &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := hs.Fetch(context.Background(), "prod", "server", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Body.Close()
	if _, _, err := bundle.Verify(context.Background(), f.Body, bundle.Policy{Keys: []bundle.PublicKey{k.Public()}}); err != nil {
		t.Fatal(err)
	}
}

// serveBundles starts `steppe bundle serve STORE -addr 127.0.0.1:0 ARGS...`
// in dir, stopped when the test ends, and returns the base URL it printed
// (scheme is "http://" or "https://").
func serveBundles(t *testing.T, bin, dir, scheme, store string, args ...string) string {
	t.Helper()
	srv := exec.Command(bin, append([]string{"bundle", "serve", store, "-addr", "127.0.0.1:0"}, args...)...)
	srv.Dir = dir
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(line, scheme)
	if i < 0 {
		t.Fatalf("serve said %q", line)
	}
	return strings.TrimSuffix(strings.TrimSpace(line[i:]), "/v1/bundles/")
}
