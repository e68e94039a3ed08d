package provider

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/image"
	"github.com/steppe/steppe/internal/testenv"
)

// qemuImage builds a static steppe and an image of the cached kernel,
// for direct kernel boot; it ends the test when QEMU or the kernel is
// missing.
func qemuImage(t *testing.T, dir string) (kernel, initrd, cmdline string) {
	t.Helper()
	testenv.NeedRoot(t, "VMs on taps")
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testenv.Lacks(t, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86): %v", err)
	}
	cache := os.Getenv("STEPPE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "steppe")
	}
	k, err := image.CachedKernel(cache)
	if err != nil {
		testenv.Lacks(t, "%v", err)
	}
	steppe := filepath.Join(dir, "steppe")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", steppe, "github.com/steppe/steppe/cmd/steppe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build steppe: %v\n%s", err, out)
	}
	boot := filepath.Join(dir, "boot")
	if _, err := image.Build(context.Background(), image.Options{Kernel: k, Steppe: steppe, Out: filepath.Join(dir, "steppe.img"), BootDir: boot}); err != nil {
		t.Fatal(err)
	}
	c, _ := os.ReadFile(filepath.Join(boot, "cmdline"))
	return filepath.Join(boot, "vmlinuz"), filepath.Join(boot, "initrd.img"), string(c)
}

// testTLS makes a CA and a server certificate for ip.
func testTLS(t *testing.T, ip string) (caPEM []byte, cert tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: ip}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP(ip)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestQEMUMachine: a qemu machine boots from the image with its config
// and data disks and a tap on the cluster's bridge, pulls its signed
// bundle over TLS from a bundle server on the bridge, runs the bundle's
// service (answering on the VM's address) with its secret delivered
// through the config disk; its agent answers status at Machine.Socket;
// after a hard power-off it boots again with its data disk (not
// formatted again, the accepted bundle kept); Destroy leaves no process,
// tap or file.
func TestQEMUMachine(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd, cmdline := qemuImage(t, dir)
	ca, cert := testTLS(t, "10.213.31.1")
	q, err := NewQEMU(QEMUOptions{Dir: filepath.Join(dir, "machines"), Cluster: "cq", Subnet: "10.213.31.0/24", Kernel: kernel, Initrd: initrd, Cmdline: cmdline, TrustedCA: ca, DataDiskSize: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.net.ensureBridge(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(q.net.bridge); err == nil {
			netlink.LinkDel(l)
		}
	})

	// The bundle: one service, the image's own steppe serving /run/steppe
	// (where the secret is) on the VM's address.
	key, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	_, pub, err := bundle.WriteKeyPair(filepath.Join(dir, "keys", "bundle"), key)
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src")
	os.MkdirAll(filepath.Join(src, "services"), 0o755)
	os.WriteFile(filepath.Join(src, "services", "steppe.hcl"), []byte(`service "web" {
  command = "/init"
  args    = ["artifact", "serve", "/run/steppe", "-addr", "10.213.31.100:8080"]
  ready {
    http = "http://10.213.31.100:8080/"
  }
}
`), 0o644)
	var buf bytes.Buffer
	now := time.Now()
	if _, err := bundle.Build(&buf, src, bundle.Manifest{Cluster: "cq", Role: "client", Version: 1, Created: now.Add(-time.Minute), Expires: now.Add(time.Hour)}, &key); err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(dir, "store")
	if _, err := bundle.NewDirStore(store).Publish(context.Background(), bytes.NewReader(buf.Bytes()), bundle.PublishOptions{}); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "10.213.31.1:8480")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: bundle.NewServer(store, bundle.ServerOptions{}).Handler(), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go srv.ServeTLS(ln, "", "")
	defer srv.Close()

	ctx := context.Background()
	start := time.Now()
	m, err := q.Create(ctx, CreateRequest{
		Machine: cluster.Machine{Name: "c1", Role: cluster.RoleClient, Pool: "vm"},
		Agent:   AgentConfig{Cluster: "cq", BundleRole: "client", BundleStore: "https://10.213.31.1:8480", BundleKeys: []string{pub}},
		Secrets: func(cm cluster.Machine, secretsDir string) (map[string][]byte, error) {
			if secretsDir != image.SecretsDir || cm.Address != "10.213.31.100" {
				t.Errorf("secrets asked for %+v in %s", cm, secretsDir)
			}
			return map[string][]byte{"token": []byte("s3cret-" + cm.Name)}, nil
		},
	})
	if err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, readFile(m.Log))
	}
	t.Logf("Create (VM start to agent answering): %s", time.Since(start).Round(time.Millisecond))
	defer q.Destroy(ctx, "c1")
	if m.Address != "10.213.31.100" || !m.Running || m.Socket != filepath.Join(m.Dir, image.APISocket) {
		t.Fatalf("machine %+v", m)
	}
	waitWeb := func(what string) agent.StatusReport {
		t.Helper()
		deadline := time.Now().Add(3 * time.Minute)
		for time.Now().Before(deadline) {
			st, err := agent.NewClient(m.Socket).Status(ctx)
			if err == nil && st.Bundle != nil && st.Bundle.Version == 1 {
				for _, s := range st.Services {
					if s.Name == "web" && s.State == "running" && s.Ready {
						return st
					}
				}
			}
			time.Sleep(300 * time.Millisecond)
		}
		t.Fatalf("%s: web never ready\nconsole:\n%s", what, readFile(m.Log))
		return agent.StatusReport{}
	}
	waitWeb("first boot")
	t.Logf("VM start to the bundle's service ready: %s", time.Since(start).Round(time.Millisecond))
	get := func(url string) string {
		t.Helper()
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if got := get("http://10.213.31.100:8080/secrets/token"); got != "s3cret-c1" {
		t.Errorf("the secret on the machine: %q", got)
	}
	for _, f := range []string{"config.img"} {
		if st, err := os.Stat(filepath.Join(m.Dir, f)); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v (want 0600: it holds secrets)", f, st.Mode(), err)
		}
	}
	if list, _ := q.List(ctx); len(list) != 1 || !list[0].Running {
		t.Errorf("List: %+v", list)
	}

	// Hard power-off, then boot again: the data disk is kept.
	if err := q.Stop(ctx, "c1", true); err != nil {
		t.Fatal(err)
	}
	if list, _ := q.List(ctx); len(list) != 1 || list[0].Running {
		t.Errorf("List after the power-off: %+v", list)
	}
	os.Rename(m.Log, m.Log+".1")
	if _, err := q.Start(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	waitWeb("after a hard power-off")
	if con := readFile(m.Log); !strings.Contains(con, "formatted=false") {
		t.Errorf("the data disk was formatted again:\n%s", con)
	}

	tap := q.TapName("c1")
	if err := q.Destroy(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.Dir); !os.IsNotExist(err) {
		t.Errorf("machine directory left: %v", err)
	}
	if _, err := netlink.LinkByName(tap); err == nil {
		t.Errorf("tap %s left", tap)
	}
	if out, _ := exec.Command("pgrep", "-f", m.Dir).Output(); len(out) > 0 {
		t.Errorf("processes left: %s", out)
	}
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
