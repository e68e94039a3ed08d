package cluster

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

func parseCert(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func checkPerms(t *testing.T, dir string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %04o, want %04o", p, fi.Mode().Perm(), want)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 5 {
		t.Fatalf("only %d entries checked", n)
	}
}

func TestStateCreatesCAAndKeys(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	st, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	ca := parseCert(t, st.CACertPEM())
	if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 || !ca.MaxPathLenZero {
		t.Fatalf("CA: IsCA %v usage %v", ca.IsCA, ca.KeyUsage)
	}
	if ca.PublicKeyAlgorithm != x509.ECDSA {
		t.Fatalf("CA key %v, want ECDSA", ca.PublicKeyAlgorithm)
	}
	for _, k := range []Secret{st.ConsulGossipKey(), st.NomadGossipKey()} {
		raw, err := base64.StdEncoding.DecodeString(k.Reveal())
		if err != nil || len(raw) != 32 {
			t.Fatalf("gossip key: %d bytes, %v", len(raw), err)
		}
	}
	if st.ConsulGossipKey() == st.NomadGossipKey() {
		t.Fatal("Consul and Nomad share a gossip key")
	}
	if _, err := st.OperatorCert(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Token(TokenConsulBootstrap); err != nil {
		t.Fatal(err)
	}
	checkPerms(t, dir)
}

func TestStateReopenReusesEverything(t *testing.T) {
	dir := t.TempDir()
	spec := DefaultSpec()
	m := Machine{Name: "steppe-server-1", Role: RoleServer, Address: "127.0.0.11"}
	st1, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	kp1, err := st1.NodeCert(spec, m)
	if err != nil {
		t.Fatal(err)
	}
	tok1, err := st1.Token(TokenConsulAgent(m.Name))
	if err != nil {
		t.Fatal(err)
	}

	st2, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(st1.CACertPEM(), st2.CACertPEM()) {
		t.Fatal("reopening regenerated the CA")
	}
	if st1.ConsulGossipKey() != st2.ConsulGossipKey() || st1.NomadGossipKey() != st2.NomadGossipKey() {
		t.Fatal("reopening regenerated a gossip key")
	}
	kp2, err := st2.NodeCert(spec, m)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(kp1.CertPEM, kp2.CertPEM) || kp1.KeyPEM != kp2.KeyPEM {
		t.Fatal("reopening reissued an unchanged node certificate")
	}
	tok2, err := st2.Token(TokenConsulAgent(m.Name))
	if err != nil || tok2 != tok1 {
		t.Fatalf("token changed on reopen (%v)", err)
	}

	// A changed address needs a new certificate, from the same CA.
	m.Address = "127.0.0.21"
	kp3, err := st2.NodeCert(spec, m)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(kp3.CertPEM, kp2.CertPEM) {
		t.Fatal("address changed but the certificate was kept")
	}
	if ips := parseCert(t, kp3.CertPEM).IPAddresses; !ips[len(ips)-1].Equal(net.ParseIP("127.0.0.21")) {
		t.Fatalf("new certificate IPs %v", ips)
	}
}

func TestStateConcurrentTokens(t *testing.T) {
	dir := t.TempDir()
	a, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	// Two handles (as two steppe processes would have) create tokens at
	// once: none is lost and both agree.
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := a
			if i%2 == 1 {
				st = b
			}
			if _, err := st.Token(fmt.Sprintf("t/%d", i)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	c, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(c.TokenNames()); n != 20 {
		t.Fatalf("%d tokens on disk, want 20", n)
	}
	for i := range 20 {
		n := fmt.Sprintf("t/%d", i)
		x, _ := c.LookupToken(n)
		y, _ := a.Token(n)
		if x != y || !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(x.Reveal()) {
			t.Fatalf("token %s: %q vs %q", n, x.Reveal(), y.Reveal())
		}
	}
}

func TestNodeCertificates(t *testing.T) {
	st, err := OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	spec := DefaultSpec()
	spec.Region, spec.Datacenter = "eu", "fra1"
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(st.CACertPEM())

	cases := []struct {
		m        Machine
		names    []string
		notNames []string
	}{
		{Machine{Name: "steppe-server-1", Role: RoleServer, Address: "127.0.0.11"},
			[]string{"server.fra1.consul", "server.eu.nomad", "steppe-server-1", "127.0.0.11"},
			[]string{"client.eu.nomad", "server.dc1.consul", "localhost", "127.0.0.1", "127.0.0.14"}},
		{Machine{Name: "steppe-default-1", Role: RoleClient, Pool: "default", Address: "127.0.0.14"},
			[]string{"client.eu.nomad", "client.fra1.consul", "steppe-default-1", "127.0.0.14"},
			[]string{"server.eu.nomad", "server.fra1.consul", "localhost", "127.0.0.1", "127.0.0.11"}},
	}
	for _, c := range cases {
		kp, err := st.NodeCert(spec, c.m)
		if err != nil {
			t.Fatal(err)
		}
		cert := parseCert(t, kp.CertPEM)
		for _, eku := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{eku}}); err != nil {
				t.Fatalf("%s: chain for usage %v: %v", c.m.Name, eku, err)
			}
		}
		if cert.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
			t.Fatalf("%s: key usage %v lacks digital signature", c.m.Name, cert.KeyUsage)
		}
		for _, n := range c.names {
			if err := cert.VerifyHostname(n); err != nil {
				t.Errorf("%s: %v", c.m.Name, err)
			}
		}
		for _, n := range c.notNames {
			if cert.VerifyHostname(n) == nil {
				t.Errorf("%s: certificate is valid for %s", c.m.Name, n)
			}
		}
		if _, err := tls.X509KeyPair(kp.CertPEM, []byte(kp.KeyPEM.Reveal())); err != nil {
			t.Fatalf("%s: key pair: %v", c.m.Name, err)
		}
	}

	op, err := st.OperatorCert()
	if err != nil {
		t.Fatal(err)
	}
	oc := parseCert(t, op.CertPEM)
	if _, err := oc.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Fatal("the operator's client certificate can serve")
	}
}

func TestStateRefusesExposedDir(t *testing.T) {
	dir := t.TempDir() // 0755 and empty: tightened
	if _, err := OpenState(dir); err != nil {
		t.Fatal(err)
	}
	checkPerms(t, dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenState(dir); err == nil || !strings.Contains(err.Error(), "mode 0755") {
		t.Fatalf("open of a 0755 state dir holding a CA: %v", err)
	}
	dir = t.TempDir()
	if _, err := OpenState(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, caKeyFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenState(dir); err == nil || !strings.Contains(err.Error(), "must be 0600") {
		t.Fatalf("open with a 0644 CA key: %v", err)
	}
}

func TestStateRefusesHalfCA(t *testing.T) {
	dir := t.TempDir()
	if _, err := OpenState(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, caKeyFile)); err != nil {
		t.Fatal(err)
	}
	_, err := OpenState(dir)
	if err == nil || !strings.Contains(err.Error(), "only one of") {
		t.Fatalf("open with the CA key missing: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, caKeyFile)); err == nil {
		t.Fatal("a new CA key was generated next to the old certificate")
	}
}

func TestSecretRedacts(t *testing.T) {
	s := Secret("hunter2-very-secret")
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("x", "token", s, "any", any(s))
	j, _ := json.Marshal(map[string]any{"t": s})
	out := strings.Join([]string{
		fmt.Sprint(s), fmt.Sprintf("%v %s %q %+v %#v", s, s, s, s, s),
		fmt.Sprintf("%v", struct{ T Secret }{s}), buf.String(), string(j),
	}, "\n")
	if strings.Contains(out, "hunter2") {
		t.Fatalf("secret printed:\n%s", out)
	}
	if s.Reveal() != "hunter2-very-secret" {
		t.Fatal("Reveal")
	}
}

func TestCLIEnv(t *testing.T) {
	st, err := OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	env, err := CLIEnv(st, "127.0.0.11:8501", "127.0.0.11:4646")
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(env, "\n")
	for _, want := range []string{"CONSUL_HTTP_ADDR=https://127.0.0.11:8501", "NOMAD_ADDR=https://127.0.0.11:4646", "NOMAD_CACERT=" + st.CAFile(), "CONSUL_CLIENT_KEY=" + filepath.Join(st.Dir(), "operator", "key.pem")} {
		if !strings.Contains(joined, want) {
			t.Fatalf("env lacks %s:\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "TOKEN") {
		t.Fatalf("tokens before any bootstrap:\n%s", joined)
	}
	tok, _ := st.Token(TokenNomadBootstrap)
	env, _ = CLIEnv(st, "a:1", "b:2")
	if !strings.Contains(strings.Join(env, "\n"), "NOMAD_TOKEN="+tok.Reveal()) {
		t.Fatal("no NOMAD_TOKEN after bootstrap")
	}
}
