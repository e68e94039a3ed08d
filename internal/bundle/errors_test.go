package bundle

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/testenv"
)

// A signature by a key the reader does not trust and a signature that
// does not verify with the trusted key it names are told apart, each
// naming the keys involved.
func TestSignatureErrors(t *testing.T) {
	trusted, other, stranger := mustKey(t), mustKey(t), mustKey(t)
	keys := []PublicKey{trusted.Public(), other.Public()}
	m := baseManifest(3)
	raw := mustMarshal(t, m)

	_, err := VerifySignature(keys, raw, Sign(stranger, raw))
	if !errors.Is(err, ErrUntrustedKey) || errors.Is(err, ErrBadSignature) {
		t.Fatalf("signed by an untrusted key: %v", err)
	}
	for _, id := range []string{stranger.ID, trusted.ID, other.ID} {
		if !strings.Contains(err.Error(), id) {
			t.Errorf("untrusted key: %q does not name key %s", err, id)
		}
	}
	t.Logf("untrusted key: %v", err)

	m.Variables = map[string]string{"changed": "after signing"}
	_, err = VerifySignature(keys, mustMarshal(t, m), Sign(other, raw))
	if !errors.Is(err, ErrBadSignature) || errors.Is(err, ErrUntrustedKey) {
		t.Fatalf("changed after signing: %v", err)
	}
	if want := "signature does not verify with key " + other.ID + ": the bundle was changed after signing"; !strings.Contains(err.Error(), want) {
		t.Errorf("changed after signing: %q does not say %q", err, want)
	}
	t.Logf("changed after signing: %v", err)

	// Through Verify, both are final: the same bytes fail the same way.
	for name, b := range map[string][]byte{
		"untrusted": buildBundle(t, &stranger, baseManifest(3), sampleFiles),
		"tampered": func() []byte {
			mm := baseManifest(3)
			mm.Files = []File{fileOf("a", "a")}
			sig := Sign(trusted, mustMarshal(t, mm))
			mm.Role = "client"
			return craftRaw(t, mustMarshal(t, mm), nil, []entry{reg(SignatureName, string(sig)), reg("a", "a")}, nil)
		}(),
	} {
		_, _, err := Verify(context.Background(), bytes.NewReader(b), Policy{Keys: keys})
		var invalid *InvalidError
		if !errors.As(err, &invalid) || !(errors.Is(err, ErrUntrustedKey) || errors.Is(err, ErrBadSignature)) {
			t.Errorf("%s: Verify: %v, want a final signature error", name, err)
		}
	}

	// The key id in manifest.sig only words the error: a signature by a
	// trusted key under another id is still that key's.
	if id, err := VerifySignature(keys, raw, bytes.Replace(Sign(trusted, raw), []byte(trusted.ID), []byte(stranger.ID), 1)); err != nil || id != trusted.ID {
		t.Fatalf("relabelled signature: %s, %v", id, err)
	}
}

// A download the server cuts with a reset mid-body is an error that may
// pass: not an InvalidError, and nothing is left behind.
func TestConnectionResetMayPass(t *testing.T) {
	key := mustKey(t)
	v2 := buildBundle(t, &key, baseManifest(2), sampleFiles)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nETag: \"v2\"\r\nContent-Length: ")
		buf.WriteString(strconv.Itoa(len(v2)) + "\r\n\r\n")
		buf.Write(v2[:len(v2)/2])
		buf.Flush()
		c.(*net.TCPConn).SetLinger(0) // close sends RST: a reset, not an EOF
		c.Close()
	}))
	defer srv.Close()
	rel := t.TempDir()
	if _, err := Unpack(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), map[string]string{"v1": "one"})), rel, policy(key)); err != nil {
		t.Fatal(err)
	}
	if err := Activate(rel, 1); err != nil {
		t.Fatal(err)
	}
	st, _ := NewHTTPStore(srv.URL, nil)
	p := policy(key)
	p.After = 1
	_, _, err := pullOnce(t, st, "", 0, rel, p)
	var invalid *InvalidError
	if err == nil || errors.As(err, &invalid) {
		t.Fatalf("reset download: %v, want an error that may pass", err)
	}
	if !errors.Is(err, syscall.ECONNRESET) && !strings.Contains(err.Error(), "unexpected EOF") {
		t.Errorf("reset download: %v does not say the connection was cut", err)
	}
	t.Logf("reset download: %v", err)
	assertOnlyV1(t, rel)
}

// Unpacking onto a full disk fails with ENOSPC, which may pass: not an
// InvalidError, nothing left behind, and the same bytes unpack once there
// is room.
func TestDiskFullMayPass(t *testing.T) {
	testenv.NeedRoot(t, "mounting a small tmpfs")
	key := mustKey(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatalf("mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	rel := filepath.Join(dir, "releases")
	if _, err := Unpack(context.Background(), bytes.NewReader(buildBundle(t, &key, baseManifest(1), map[string]string{"v1": "one"})), rel, policy(key)); err != nil {
		t.Fatal(err)
	}
	if err := Activate(rel, 1); err != nil {
		t.Fatal(err)
	}
	v2 := buildBundle(t, &key, baseManifest(2), sampleFiles) // 100 kB of data
	p := policy(key)
	p.After = 1
	_, err := Unpack(context.Background(), bytes.NewReader(v2), rel, p)
	var invalid *InvalidError
	if !errors.Is(err, syscall.ENOSPC) || errors.As(err, &invalid) {
		t.Fatalf("unpack onto a full disk: %v, want ENOSPC that may pass", err)
	}
	t.Logf("disk full: %v", err)
	assertOnlyV1(t, rel)

	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, "size=4m"); err != nil {
		t.Fatalf("grow the tmpfs: %v", err)
	}
	r, err := Unpack(context.Background(), bytes.NewReader(v2), rel, p)
	if err != nil || r.Version != 2 {
		t.Fatalf("the same bundle with room on the disk: %+v, %v", r, err)
	}
	if b, err := os.ReadFile(filepath.Join(r.Dir, "deep/a/b/c/d/e/data.txt")); err != nil || len(b) != 100000 {
		t.Fatalf("unpacked file: %d bytes, %v", len(b), err)
	}
}
