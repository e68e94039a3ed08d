package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
)

// TestUpFromArtifactMirror: a spec that names its own artifact store (a
// mirror in the release layout, here steppe's own store served over HTTP
// by `steppe artifact serve`) and the key that signs it. A version the
// mirror lacks is refused before any machine is made, naming the
// artifact and the store; then the cluster comes up with every machine
// told to fetch its binaries from the mirror.
func TestUpFromArtifactMirror(t *testing.T) {
	daemonBinaries(t)
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	store := artifact.DefaultStoreDir(cache)
	bin := steppeBinary(t)

	storeURL := serveStore(t, bin, store, "127.0.1.70")

	c := &upCluster{t: t, bin: bin, dir: t.TempDir()}
	c.spec = filepath.Join(c.dir, "cluster.hcl")
	c.state = filepath.Join(c.dir, "state")
	keyCopy := filepath.Join(c.dir, "keys", "mirror.asc")
	if err := os.MkdirAll(filepath.Dir(keyCopy), 0o755); err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(filepath.Join(store, artifact.StoreKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyCopy, key, 0o644); err != nil {
		t.Fatal(err)
	}
	writeSpec := func(nomad string) {
		spec := fmt.Sprintf(`name = "e2emirror"
artifact_store = %q
artifact_keys  = ["keys/mirror.asc"]
versions {
  nomad  = %q
  consul = %q
}
servers {
  count = 1
}
pool "default" {
  count = 1
}
provider "local" {
  first_address = "127.0.1.71"
}
`, storeURL, nomad, cluster.DefaultConsulVersion)
		if err := os.WriteFile(c.spec, []byte(spec), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if out, err := c.steppe(5*time.Minute, "down", "-state", c.state); err != nil {
			t.Errorf("cleanup: steppe down: %v\n%s", err, out)
		}
	})

	// A version the mirror does not have: refused, nothing made.
	writeSpec("1.10.99")
	out, err := c.steppe(5*time.Minute, "up", "-spec", c.spec, "-state", c.state)
	if err == nil {
		t.Fatalf("up with nomad 1.10.99, which the mirror lacks, succeeded:\n%s", out)
	}
	for _, want := range []string{"missing artifact", "nomad 1.10.99", storeURL} {
		if !strings.Contains(out, want) {
			t.Errorf("the refusal does not say %q:\n%s", want, out)
		}
	}
	if ms, _ := os.ReadDir(filepath.Join(c.state, "machines")); len(ms) > 0 {
		t.Errorf("a refused up made %d machines", len(ms))
	}
	// What the refused up left, down removes.
	if out, err := c.steppe(time.Minute, "down", "-state", c.state); err != nil {
		t.Errorf("steppe down after a refused up: %v\n%s", err, out)
	}
	if _, err := os.Stat(c.state); err == nil {
		t.Errorf("steppe down after a refused up left %s", c.state)
	}

	writeSpec(cluster.DefaultNomadVersion)
	out, took := c.up()
	t.Logf("up from the mirror %s in %v", storeURL, took.Round(time.Millisecond))
	if !strings.Contains(out, "verified (store "+storeURL+")") {
		t.Errorf("up did not verify the artifacts from the mirror:\n%s", out)
	}
	st := c.status()
	if !st.Healthy || len(st.Agents) != 2 {
		t.Fatalf("status after up: healthy %v, %d agents, problems %q", st.Healthy, len(st.Agents), st.Problems)
	}
	// Every machine's bundle sends its agent to the mirror for binaries,
	// and the key it trusts is the state directory's copy of the spec's.
	for _, a := range st.Agents {
		f, err := os.Open(filepath.Join(c.state, "bundles", "e2emirror", a.Machine, "latest.tar.gz"))
		if err != nil {
			t.Fatal(err)
		}
		m, _, err := bundle.Inspect(context.Background(), f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, art := range m.Artifacts {
			if art.Store != storeURL {
				t.Errorf("machine %s fetches %s from %q, not the mirror %s", a.Machine, art.Product, art.Store, storeURL)
			}
		}
		cfg, err := os.ReadFile(filepath.Join(c.state, "machines", a.Machine, "agent.hcl"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(cfg), filepath.Join(c.state, "artifact-keys", "0.asc")) {
			t.Errorf("machine %s does not trust the state directory's copy of the mirror's key:\n%s", a.Machine, cfg)
		}
	}
}
