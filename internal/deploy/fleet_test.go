package deploy

import (
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/cluster"
)

func TestFleetFromSpecAndDrift(t *testing.T) {
	spec := cluster.DefaultSpec()
	f := newFleet(spec)
	if got := len(f.machines(cluster.RoleServer, "")); got != 3 {
		t.Fatalf("%d servers, want 3", got)
	}
	if got := len(f.machines(cluster.RoleClient, "default")); got != 2 {
		t.Fatalf("%d clients, want 2", got)
	}
	if w := f.reconcile(spec); len(w) != 0 {
		t.Fatalf("a fleet made from the spec drifts from it: %q", w)
	}

	// What upgrade and scale changed is reported, not undone; a pool the
	// spec adds is made.
	f.Versions[cluster.NomadProduct] = "1.11.0"
	f.Pools["default"] = 4
	spec.Pools = append(spec.Pools, cluster.Pool{Name: "gpu", Count: 1})
	w := strings.Join(f.reconcile(spec), "\n")
	for _, want := range []string{"older than the 1.11.0 the cluster runs", "steppe scale default 2"} {
		if !strings.Contains(w, want) {
			t.Errorf("drift %q lacks %q", w, want)
		}
	}
	if got := f.machines(cluster.RoleClient, "gpu"); len(got) != 1 || got[0].Name != "steppe-gpu-1" || got[0].Versions[cluster.NomadProduct] != "1.11.0" {
		t.Errorf("new pool's machines: %+v", got)
	}
}

func TestFleetNamesAndRemoval(t *testing.T) {
	f := newFleet(cluster.DefaultSpec())
	// A new machine is numbered past the highest: a removed machine's
	// name is not given to a new one while a higher one lives.
	a := f.add("steppe", cluster.RoleClient, "default", f.Versions, "steppe-default-1")
	if a.Name != "steppe-default-3" {
		t.Fatalf("new machine %s, want steppe-default-3", a.Name)
	}
	f.remove("steppe-default-1")
	if m := f.machine("steppe-default-3"); m == nil || m.Replaces != "" {
		t.Fatalf("the replacement still replaces a removed machine: %+v", m)
	}
	if b := f.add("steppe", cluster.RoleClient, "default", f.Versions, ""); b.Name != "steppe-default-4" {
		t.Fatalf("new machine %s, want steppe-default-4", b.Name)
	}
	var names []string
	for _, m := range f.machines(cluster.RoleClient, "default") {
		names = append(names, m.Name)
	}
	// Ordered by number, not as strings: scale removes the highest.
	if got := strings.Join(names, " "); got != "steppe-default-2 steppe-default-3 steppe-default-4" {
		t.Fatalf("pool order %q", got)
	}
	dir := t.TempDir()
	if err := f.save(dir); err != nil {
		t.Fatal(err)
	}
	g, err := loadFleet(dir)
	if err != nil || g == nil || len(g.Machines) != len(f.Machines) {
		t.Fatalf("loaded %+v, %v", g, err)
	}
}
