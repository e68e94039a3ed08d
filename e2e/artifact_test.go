package e2e

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/testenv"
)

// artifactVersions are the versions the end-to-end tests rely on;
// scripts/prepare-artifacts builds them into the default cache first, so
// here they come from the cache in seconds. Cold, each takes minutes.
var artifactVersions = []struct{ product, version, title string }{
	{"nomad", "1.9.3", "Nomad"},
	{"nomad", "1.10.5", "Nomad"},
	{"consul", "1.14.8", "Consul"},
	{"consul", "1.14.11", "Consul"},
	{"vault", "1.21.0", "Vault"},
}

// artifactSteppe builds the real steppe binary for the test.
func artifactSteppe(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "steppe")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/steppe")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build steppe: %v\n%s", err, out)
	}
	return bin
}

func artifactRun(t *testing.T, ctx context.Context, bin string, args ...string) (stdout, stderr string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Run(); err != nil {
		t.Fatalf("steppe %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, o.String(), e.String())
	}
	return o.String(), e.String()
}

func artifactSHA256(t *testing.T, r io.Reader) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func TestArtifactBuildNomadAndConsul(t *testing.T) {
	if testing.Short() && !testenv.InCI() {
		t.Skip("-short: building Nomad and Consul from source takes minutes when the cache is cold")
	}
	if _, err := exec.LookPath("musl-gcc"); err != nil {
		t.Fatal("musl-gcc is missing (apt-get install musl-tools): Nomad cannot be built statically")
	}
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	steppe := artifactSteppe(t)

	var refs []string
	for _, v := range artifactVersions {
		refs = append(refs, v.product+"@"+v.version)
	}
	// Into the default cache (what CI keeps), then again: all cached.
	artifactRun(t, ctx, steppe, append([]string{"artifact", "build"}, refs...)...)
	out, _ := artifactRun(t, ctx, steppe, append([]string{"artifact", "build"}, refs...)...)
	for _, r := range refs {
		if !regexp.MustCompile(regexp.QuoteMeta(r) + ` cached in `).MatchString(out) {
			t.Errorf("second build of %s was not served from the cache:\n%s", r, out)
		}
	}

	store := artifact.DefaultStoreDir(cache)
	keyring, err := artifact.ReadKeyringFile(filepath.Join(store, artifact.StoreKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	artifactGPGVerify(t, ctx, store, "nomad", "1.9.3")
	for _, v := range artifactVersions {
		t.Run(v.product+"@"+v.version, func(t *testing.T) {
			pathOut, _ := artifactRun(t, ctx, steppe, "artifact", "path", v.product+"@"+v.version)
			bin := strings.TrimSpace(pathOut)
			if want, err := artifact.BinaryPath(cache, v.product, v.version); err != nil || want != bin {
				t.Fatalf("steppe artifact path = %q; BinaryPath = %q, %v", bin, want, err)
			}

			// `version` reports exactly the asked version.
			vout, err := exec.CommandContext(ctx, bin, "version").CombinedOutput()
			if err != nil {
				t.Fatalf("%s version: %v\n%s", bin, err, vout)
			}
			first, _, _ := strings.Cut(string(vout), "\n")
			if want := v.title + " v" + v.version; first != want && !strings.HasPrefix(first, want+" ") {
				t.Errorf("%s version: first line %q, want %q", v.product, first, want)
			}

			// Statically linked: no interpreter, no needed libraries.
			f, err := elf.Open(bin)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range f.Progs {
				if p.Type == elf.PT_INTERP {
					t.Errorf("%s has a program interpreter", bin)
				}
			}
			if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
				t.Errorf("%s needs shared libraries %v", bin, libs)
			}
			f.Close()

			// The store: signed SHA256SUMS naming the archive's digest, and
			// an archive holding exactly the cached binary.
			vdir := filepath.Join(store, v.product, v.version)
			base := v.product + "_" + v.version
			sums, err := os.ReadFile(filepath.Join(vdir, base+"_SHA256SUMS"))
			if err != nil {
				t.Fatal(err)
			}
			sig, err := os.ReadFile(filepath.Join(vdir, base+"_SHA256SUMS.sig"))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := keyring.VerifyDetached(sums, sig); err != nil {
				t.Errorf("SHA256SUMS signature: %v", err)
			}
			zipName := base + "_linux_amd64.zip"
			zf, err := os.Open(filepath.Join(vdir, zipName))
			if err != nil {
				t.Fatal(err)
			}
			zipSum := artifactSHA256(t, zf)
			zf.Close()
			if want := zipSum + "  " + zipName + "\n"; string(sums) != want {
				t.Errorf("SHA256SUMS = %q, want %q", sums, want)
			}
			tampered := bytes.Replace(sums, []byte(zipSum[:16]), []byte(strings.Repeat("0", 16)), 1)
			if _, err := keyring.VerifyDetached(tampered, sig); err == nil {
				t.Error("a tampered SHA256SUMS verified")
			}
			zr, err := zip.OpenReader(filepath.Join(vdir, zipName))
			if err != nil {
				t.Fatal(err)
			}
			defer zr.Close()
			if len(zr.File) != 1 || zr.File[0].Name != v.product {
				t.Fatalf("archive entries %v, want just %s", zr.File, v.product)
			}
			rc, err := zr.File[0].Open()
			if err != nil {
				t.Fatal(err)
			}
			inZip := artifactSHA256(t, rc)
			rc.Close()
			bf, err := os.Open(bin)
			if err != nil {
				t.Fatal(err)
			}
			if onDisk := artifactSHA256(t, bf); onDisk != inZip {
				t.Errorf("archive's %s (%s) differs from the cached binary (%s)", v.product, inZip, onDisk)
			}
			bf.Close()
		})
	}
}

// TestArtifactServeAndFetch serves the default store with `steppe artifact
// serve` and fetches a built version from it the way an agent does.
func TestArtifactServeAndFetch(t *testing.T) {
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	steppe := artifactSteppe(t)
	// Cached after prepare-artifacts (builds otherwise), then published into
	// a store of its own with -out after the positional argument.
	store := filepath.Join(t.TempDir(), "store")
	artifactRun(t, ctx, steppe, "artifact", "build", "consul@1.14.11", "-out", store)
	for _, f := range []string{artifact.StoreKeyFile, "consul/index.json", "consul/1.14.11/index.json",
		"consul/1.14.11/consul_1.14.11_linux_amd64.zip", "consul/1.14.11/consul_1.14.11_SHA256SUMS",
		"consul/1.14.11/consul_1.14.11_SHA256SUMS.sig"} {
		if _, err := os.Stat(filepath.Join(store, f)); err != nil {
			t.Errorf("-out store lacks %s: %v", f, err)
		}
	}
	if _, err := os.Stat(filepath.Join(store, "nomad")); err == nil {
		t.Error("-out store holds nomad, which was not asked for")
	}
	if _, err := artifact.BinaryPath(cache, "consul", "1.14.11"); err != nil {
		t.Fatal(err)
	}

	url := serveStore(t, steppe, store, "127.0.0.1")

	keyring, err := artifact.ReadKeyringFile(filepath.Join(store, artifact.StoreKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	f := &artifact.Fetcher{CacheDir: t.TempDir(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	got, err := f.Fetch(ctx, url, "consul", "1.14.11", "linux", "amd64", keyring)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, got, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "Consul v1.14.11\n") {
		t.Errorf("fetched consul version: %v\n%s", err, out)
	}
}

// artifactGPGVerify checks a store signature with GnuPG, the client
// people use on HashiCorp's own SHA256SUMS, when it is installed.
func artifactGPGVerify(t *testing.T, ctx context.Context, store, product, version string) {
	t.Helper()
	gpg, err := exec.LookPath("gpg")
	if err != nil {
		if testenv.InCI() {
			t.Fatal("gpg not installed (.ci/run installs gnupg): the store signature must be checked with GnuPG too")
		}
		t.Log("gpg not installed: the store signature is checked with go-crypto only")
		return
	}
	home := t.TempDir()
	if out, err := exec.CommandContext(ctx, gpg, "--homedir", home, "--batch", "--import", filepath.Join(store, artifact.StoreKeyFile)).CombinedOutput(); err != nil {
		t.Fatalf("gpg --import: %v\n%s", err, out)
	}
	sums := filepath.Join(store, product, version, product+"_"+version+"_SHA256SUMS")
	out, err := exec.CommandContext(ctx, gpg, "--homedir", home, "--batch", "--verify", sums+".sig", sums).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Good signature") {
		t.Errorf("gpg --verify %s: %v\n%s", sums, err, out)
	}
}

// serveStore runs `steppe artifact serve store` on a free port of host
// until the test ends and returns its URL, as the command prints it.
func serveStore(t *testing.T, steppe, store, host string) string {
	t.Helper()
	cmd := exec.Command(steppe, "artifact", "serve", store, "-addr", host+":0")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
	})
	sc := bufio.NewScanner(stderr)
	addrRE := regexp.MustCompile(`on (http://` + regexp.QuoteMeta(host) + `:\d+)/`)
	var url string
	for sc.Scan() {
		if m := addrRE.FindStringSubmatch(sc.Text()); m != nil {
			url = m[1]
			break
		}
	}
	if url == "" {
		t.Fatalf("steppe artifact serve printed no address (%v)", sc.Err())
	}
	go io.Copy(io.Discard, stderr)
	return url
}
