package cluster

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A test build's short validity: the env var shortens node and operator
// certificates (not the CA), NodeCert keeps such a certificate (renewal
// is rotate's, not every up's), and a bad value is refused.
func TestCertValidityEnv(t *testing.T) {
	t.Setenv(CertValidityEnv, "480h")
	st, err := OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m := Machine{Name: "c-server-1", Role: RoleServer, Address: "127.0.0.11"}
	kp, err := st.NodeCert(DefaultSpec(), m)
	if err != nil {
		t.Fatal(err)
	}
	c := parseCert(t, kp.CertPEM)
	if left := time.Until(c.NotAfter); left > 481*time.Hour || left < 479*time.Hour {
		t.Fatalf("node certificate valid for %v, want 480h", left)
	}
	again, err := st.NodeCert(DefaultSpec(), m)
	if err != nil {
		t.Fatal(err)
	}
	if parseCert(t, again.CertPEM).SerialNumber.Cmp(c.SerialNumber) != 0 {
		t.Fatal("NodeCert reissued a certificate 20 days from expiry: renewal is steppe rotate certs'")
	}
	certs, err := st.Certificates()
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 || certs[0].Name != "CA" || !certs[0].CA || certs[1].Name != m.Name || certs[1].Serial != c.SerialNumber.Text(16) {
		t.Fatalf("certificates: %+v", certs)
	}
	if time.Until(certs[0].NotAfter) < 9*365*24*time.Hour {
		t.Fatalf("the CA is valid until %v: the env var must not shorten it", certs[0].NotAfter)
	}

	t.Setenv(CertValidityEnv, "soon")
	if _, err := OpenState(t.TempDir()); err == nil {
		t.Fatal("a bad STEPPE_CERT_VALIDITY was accepted")
	}
}

// A rotation reissues each certificate once: run again with the same
// start (a resumed rotation) it keeps what it issued.
func TestRotateCertOnce(t *testing.T) {
	st, err := OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	spec := DefaultSpec()
	m := Machine{Name: "c-default-1", Role: RoleClient, Pool: "default", Address: "127.0.0.14"}
	old, err := st.NodeCert(spec, m)
	if err != nil {
		t.Fatal(err)
	}
	oldOp, err := st.OperatorCert()
	if err != nil {
		t.Fatal(err)
	}
	// NotBefore has second precision and a minute of slack: a rotation
	// begun two minutes after the issue must replace it.
	since := time.Now().Add(2 * time.Minute)
	rot, err := st.RotateNodeCert(spec, m, since)
	if err != nil {
		t.Fatal(err)
	}
	if parseCert(t, rot.CertPEM).SerialNumber.Cmp(parseCert(t, old.CertPEM).SerialNumber) == 0 {
		t.Fatal("the rotation kept the old certificate")
	}
	opRot, err := st.RotateOperatorCert(since)
	if err != nil {
		t.Fatal(err)
	}
	if string(opRot.CertPEM) == string(oldOp.CertPEM) {
		t.Fatal("the rotation kept the operator's old certificate")
	}
	// Resumed: the same start, certificates issued after it are kept.
	resumeSince := time.Now().Add(-time.Second)
	a, err := st.RotateNodeCert(spec, m, resumeSince)
	if err != nil {
		t.Fatal(err)
	}
	b, err := st.RotateNodeCert(spec, m, resumeSince)
	if err != nil {
		t.Fatal(err)
	}
	if string(a.CertPEM) != string(b.CertPEM) {
		t.Fatal("a resumed rotation issued a second certificate")
	}
	if cur, _ := st.NodeCert(spec, m); string(cur.CertPEM) != string(b.CertPEM) {
		t.Fatal("NodeCert does not return the rotated certificate")
	}
}

func TestGossipKeyRotation(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	old := st.ConsulGossipKey()
	if st.PendingGossipKey(GossipConsul) {
		t.Fatal("pending before any rotation")
	}
	next, err := st.NextGossipKey(GossipConsul)
	if err != nil {
		t.Fatal(err)
	}
	if next == old || !GossipKeyValid(next.Reveal()) {
		t.Fatal("the next key is the old one or not a key")
	}
	// Cut short: the same key again.
	if again, _ := st.NextGossipKey(GossipConsul); again != next {
		t.Fatal("a resumed rotation got another key")
	}
	if !st.PendingGossipKey(GossipConsul) {
		t.Fatal("not pending")
	}
	if err := st.PromoteGossipKey(GossipConsul); err != nil {
		t.Fatal(err)
	}
	if st.ConsulGossipKey() != next || st.PendingGossipKey(GossipConsul) {
		t.Fatal("promotion did not make the next key the key")
	}
	reopened, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if reopened.ConsulGossipKey() != next || reopened.NomadGossipKey() != st.NomadGossipKey() {
		t.Fatal("the promoted key did not persist, or Nomad's changed")
	}
	checkPerms(t, dir)
	if _, err := os.Stat(filepath.Join(dir, consulGossipKey+".next")); err == nil {
		t.Fatal("the next key file is left behind")
	}
}

func TestBeginTokenRotation(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	name := TokenConsulAgent("c-server-1")
	if _, err := st.BeginTokenRotation(name); err == nil {
		t.Fatal("rotated a token that does not exist")
	}
	old, err := st.Token(name)
	if err != nil {
		t.Fatal(err)
	}
	nw, err := st.BeginTokenRotation(name)
	if err != nil {
		t.Fatal(err)
	}
	if nw == old {
		t.Fatal("no new secret")
	}
	// Resumed: the secret the daemons still use is not lost.
	again, err := st.BeginTokenRotation(name)
	if err != nil {
		t.Fatal(err)
	}
	reopened, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	prev, ok := reopened.LookupToken(PreviousTokenName(name))
	if again != nw || !ok || prev != old {
		t.Fatal("a second begin replaced the rotation under way")
	}
	if cur, _ := reopened.LookupToken(name); cur != nw {
		t.Fatal("the new secret did not persist")
	}
}
