package artifact

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The go.mod files in testdata are the real ones of the released versions
// (copied from the module proxy's .mod files).

func readTestGoMod(t *testing.T, name string) goMod {
	t.Helper()
	m, err := newGoTool("").readGoMod(context.Background(), filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// downloadCached downloads a module through the tests' loopback proxy,
// which serves only this machine's module cache (main_test.go).
func downloadCached(ctx context.Context, t *testing.T, g *goTool, path, version string) moduleInfo {
	t.Helper()
	root, err := g.download(ctx, path, version, nil)
	if err != nil {
		t.Fatalf("download %s %s: %v (the tests' proxy serves only this machine's module cache: run `make artifacts` first, as `make test` does)", path, version, err)
	}
	return root
}

func TestMissingLocalReplacesOnRealGoMods(t *testing.T) {
	cases := []struct {
		file string
		want map[string]string // module => required version
		dirs map[string]string // module => dir
	}{
		{
			file: "nomad-1.9.3.go.mod",
			want: map[string]string{"github.com/hashicorp/nomad/api": "v0.0.0-20230103221135-ce00d683f9be"},
			dirs: map[string]string{"github.com/hashicorp/nomad/api": "./api"},
		},
		{
			file: "consul-1.14.8.go.mod",
			want: map[string]string{
				"github.com/hashicorp/consul/api":          "v1.18.0",
				"github.com/hashicorp/consul/sdk":          "v0.13.0",
				"github.com/hashicorp/consul/proto-public": "v0.2.1",
			},
			dirs: map[string]string{
				"github.com/hashicorp/consul/api":          "./api",
				"github.com/hashicorp/consul/sdk":          "./sdk",
				"github.com/hashicorp/consul/proto-public": "./proto-public",
			},
		},
		{
			file: "vault-1.21.0.go.mod",
			want: map[string]string{
				"github.com/hashicorp/vault/api":                 "v1.22.0",
				"github.com/hashicorp/vault/api/auth/approle":    "v0.1.0",
				"github.com/hashicorp/vault/api/auth/kubernetes": "v0.10.0",
				"github.com/hashicorp/vault/api/auth/userpass":   "v0.1.0",
				"github.com/hashicorp/vault/sdk":                 "v0.20.0",
			},
		},
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			m := readTestGoMod(t, c.file)
			missing, present := missingLocalReplaces(m, t.TempDir())
			if len(present) != 0 {
				t.Errorf("present = %v, want none in an empty tree", present)
			}
			got := map[string]string{}
			for _, lr := range missing {
				got[lr.module] = lr.required
				if d, ok := c.dirs[lr.module]; ok && d != lr.dir {
					t.Errorf("%s: dir %q, want %q", lr.module, lr.dir, d)
				}
			}
			if len(got) != len(c.want) {
				t.Fatalf("missing replaces = %v, want %v", got, c.want)
			}
			for mod, req := range c.want {
				if got[mod] != req {
					t.Errorf("%s: required %q, want %q", mod, got[mod], req)
				}
			}
		})
	}
}

func TestPresentReplaceDirIsKept(t *testing.T) {
	m := readTestGoMod(t, "nomad-1.9.3.go.mod")
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "api"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "api", "go.mod"), []byte("module github.com/hashicorp/nomad/api\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing, present := missingLocalReplaces(m, src)
	if len(missing) != 0 || len(present) != 1 || present[0].How != ResolvedPresent {
		t.Fatalf("missing=%v present=%v; want ./api reported present", missing, present)
	}
}

func TestCommitPseudoVersion(t *testing.T) {
	o := &origin{Hash: "d92bf1014886c0ff9f882f4a2691d5ae8ad8131c", Time: time.Date(2024, 11, 11, 16, 35, 41, 0, time.UTC)}
	if got, want := commitPseudoVersion(o), "v0.0.0-20241111163541-d92bf1014886"; got != want {
		t.Errorf("pseudo = %q, want %q", got, want)
	}
	// A time in another zone is converted to UTC, as the go command does.
	o.Time = o.Time.In(time.FixedZone("X", 3600))
	if got, want := commitPseudoVersion(o), "v0.0.0-20241111163541-d92bf1014886"; got != want {
		t.Errorf("pseudo = %q, want %q", got, want)
	}
	if got := commitPseudoVersion(nil); got != "" {
		t.Errorf("pseudo of unknown origin = %q, want empty", got)
	}
	if got := commitPseudoVersion(&origin{Hash: "d92bf1014886c0ff"}); got != "" {
		t.Errorf("pseudo without time = %q, want empty", got)
	}
}

// The resolution tests talk to the real Go module proxy (the only network
// these machines have): Nomad's api sub-module at the 1.9.3 commit can be
// had, Consul's at the 1.14.8 commit cannot.

func TestResolveReplacesNomadUsesTaggedCommit(t *testing.T) {
	ctx := context.Background()
	g := newGoTool("")
	root := downloadCached(ctx, t, g, "github.com/hashicorp/nomad", "v1.9.3")
	if got := commitPseudoVersion(root.Origin); got != "v0.0.0-20241111163541-d92bf1014886" {
		t.Fatalf("nomad 1.9.3 pseudo-version from its .info = %q", got)
	}
	m := readTestGoMod(t, "nomad-1.9.3.go.mod")
	src := t.TempDir()
	res, edits, err := resolveReplaces(ctx, g, m, root.Origin, nil, src, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(edits) != 0 {
		t.Errorf("edits = %v, want none (the replace stays, pointing at the placed ./api)", edits)
	}
	if len(res) != 1 || res[0].How != ResolvedCommit || res[0].Version != "v0.0.0-20241111163541-d92bf1014886" {
		t.Fatalf("resolutions = %+v", res)
	}
	b, err := os.ReadFile(filepath.Join(src, "api", "go.mod"))
	if err != nil {
		t.Fatalf("./api not placed: %v", err)
	}
	if !strings.HasPrefix(string(b), "module github.com/hashicorp/nomad/api") {
		t.Errorf("./api/go.mod starts %q", firstLine(string(b)))
	}
	// The placed copy is writable (the module cache's is not).
	if err := os.WriteFile(filepath.Join(src, "api", "go.mod"), b, 0o644); err != nil {
		t.Errorf("placed ./api is not writable: %v", err)
	}
	if !strings.Contains(res[0].String(), "tagged commit") {
		t.Errorf("String() = %q", res[0].String())
	}
}

func TestResolveReplacesConsulFallsBackToRequired(t *testing.T) {
	ctx := context.Background()
	g := newGoTool("")
	root := downloadCached(ctx, t, g, "github.com/hashicorp/consul", "v1.14.8")
	m := readTestGoMod(t, "consul-1.14.8.go.mod")
	src := t.TempDir()
	res, edits, err := resolveReplaces(ctx, g, m, root.Origin, nil, src, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"github.com/hashicorp/consul/api":          "v1.18.0",
		"github.com/hashicorp/consul/sdk":          "v0.13.0",
		"github.com/hashicorp/consul/proto-public": "v0.2.1",
	}
	if len(res) != len(want) {
		t.Fatalf("resolutions = %+v", res)
	}
	for _, r := range res {
		if r.How != ResolvedRequired || r.Version != want[r.Module] {
			t.Errorf("%s: %s %s, want required %s", r.Module, r.How, r.Version, want[r.Module])
		}
		if r.Tried != commitPseudoVersion(root.Origin) {
			t.Errorf("%s: tried %q, want the commit pseudo-version", r.Module, r.Tried)
		}
		if !strings.Contains(r.String(), "not obtainable") {
			t.Errorf("String() = %q does not say the commit version was tried", r.String())
		}
	}
	// Apply the edits to a copy of the real go.mod: no local replace is left
	// and the other replace stays.
	gomod := filepath.Join(t.TempDir(), "go.mod")
	raw, err := os.ReadFile(filepath.Join("testdata", "consul-1.14.8.go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(gomod, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := g.editGoMod(ctx, gomod, edits...); err != nil {
		t.Fatal(err)
	}
	after, err := g.readGoMod(ctx, gomod)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Replace) != 1 || after.Replace[0].Old.Path != "launchpad.net/gocheck" {
		t.Errorf("replaces after edit = %+v, want only launchpad.net/gocheck", after.Replace)
	}
}

func TestDownloadUnavailableVersion(t *testing.T) {
	_, err := newGoTool("").download(context.Background(), "github.com/hashicorp/nomad", "v1.9.2", nil)
	if err == nil {
		t.Fatal("nomad 1.9.2 downloaded; the proxy is known to refuse it")
	}
	if !strings.Contains(err.Error(), "not obtainable") {
		t.Errorf("error %q does not say the version is not obtainable", err)
	}
}

func TestResolveReplacesConsul1148UsesPinnedAPI(t *testing.T) {
	ctx := context.Background()
	g := newGoTool("")
	root := downloadCached(ctx, t, g, "github.com/hashicorp/consul", "v1.14.8")
	pins := products()["consul"].pins["1.14.8"]
	m := readTestGoMod(t, "consul-1.14.8.go.mod")
	res, edits, err := resolveReplaces(ctx, g, m, root.Origin, pins, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	how := map[string]string{}
	for _, r := range res {
		how[r.Module] = r.How + " " + r.Version
	}
	if how["github.com/hashicorp/consul/api"] != "pinned v1.18.1" || how["github.com/hashicorp/consul/sdk"] != "required v0.13.0" {
		t.Errorf("resolutions = %v", how)
	}
	gomod := filepath.Join(t.TempDir(), "go.mod")
	raw, _ := os.ReadFile(filepath.Join("testdata", "consul-1.14.8.go.mod"))
	if err := os.WriteFile(gomod, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := g.editGoMod(ctx, gomod, edits...); err != nil {
		t.Fatal(err)
	}
	after, err := g.readGoMod(ctx, gomod)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range after.Require {
		if r.Path == "github.com/hashicorp/consul/api" && r.Version != "v1.18.1" {
			t.Errorf("go.mod requires api %s after the edit, want v1.18.1", r.Version)
		}
	}
}
