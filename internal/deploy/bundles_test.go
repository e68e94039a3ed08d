package deploy

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/testenv"
)

func TestHCLTemplate(t *testing.T) {
	cases := map[string]string{
		"-config-file={{ .Machine.Tags.config_dir }}/consul.json": `"-config-file=${release}/consul.json"`,
		"{{ .Machine.Tags.secrets_dir }}/x":                       `"${secrets}/x"`,
		"{{ .Machine.Address }}:4646":                             `"${machine.address}:4646"`,
		`a "q" \ ${literal} %{x}`:                                 `"a \"q\" \\ $${literal} %%{x}"`,
		"cost$${{ .Machine.Name }}":                               `"cost${"$"}${"$"}${machine.name}"`,
	}
	for in, want := range cases {
		got, err := hclTemplate(in)
		if err != nil || got != want {
			t.Errorf("%q: got %s (%v), want %s", in, got, err, want)
		}
	}
	if _, err := hclTemplate("{{ .Vars.x }}"); err == nil {
		t.Error("a template action service files cannot express was accepted")
	}
}

func testPlan(t *testing.T) cluster.RolePlan {
	t.Helper()
	spec := cluster.DefaultSpec()
	servers := spec.MachineList()[:3]
	for i := range servers {
		servers[i].Address = "127.0.0." + string(rune('1'+i))
	}
	plans, err := cluster.Plan(spec, servers)
	if err != nil {
		t.Fatal(err)
	}
	return plans[0]
}

func TestServiceHCLNamesTheReleaseFiles(t *testing.T) {
	b, err := ServiceHCL(testPlan(t).Services)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, want := range []string{`command = artifact.consul`, `files = ["consul.json"]`, `files = ["nomad.json"]`, `after = ["consul"]`,
		`"-config-file=${secrets}/consul.json"`, `stop_signal = "SIGINT"`, "notify = true", `env = {`,
		fmt.Sprintf(`memory_max = "%d"`, cluster.DefaultServerConsulMemory), fmt.Sprintf(`memory_max = "%d"`, cluster.DefaultServerNomadMemory)} {
		if !strings.Contains(s, want) {
			t.Errorf("service file lacks %s:\n%s", want, s)
		}
	}
}

// Publishing the same plan again publishes nothing; a change publishes
// the next version.
func TestPublishRoleOnlyWhenChanged(t *testing.T) {
	publishRoleOnlyWhenChanged(t, t.TempDir(), t.TempDir)
}

// The same into an S3 bundle store (bundle_store = "s3://…") on a real
// SeaweedFS gateway on 127.0.0.1.
func TestPublishRoleToS3(t *testing.T) {
	w := testenv.StartWeed(t)
	w.Env(t)
	w.CreateBucket(t, "deploy")
	n := 0
	fresh := func() string {
		n++
		return fmt.Sprintf("s3://deploy/fresh-%d?endpoint=%s", n, url.QueryEscape(w.Endpoint))
	}
	publishRoleOnlyWhenChanged(t, "s3://deploy/a?endpoint="+url.QueryEscape(w.Endpoint), fresh)
}

func publishRoleOnlyWhenChanged(t *testing.T, dir string, fresh func() string) {
	key, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p := testPlan(t)
	first, err := publishRole(ctx, dir, "c1", p, "file:///store", key, 0)
	if err != nil || !first.Changed || first.Version != 1 {
		t.Fatalf("first publish %+v %v", first, err)
	}
	again, err := publishRole(ctx, dir, "c1", p, "file:///store", key, 0)
	if err != nil || again.Changed || again.Version != 1 {
		t.Fatalf("same plan again %+v %v", again, err)
	}
	p.Vars["nomad_version"] = "1.10.6"
	next, err := publishRole(ctx, dir, "c1", p, "file:///store", key, 0)
	if err != nil || !next.Changed || next.Version != 2 {
		t.Fatalf("changed plan %+v %v", next, err)
	}
	if moved, err := publishRole(ctx, dir, "c1", p, "file:///elsewhere", key, 0); err != nil || !moved.Changed || moved.Version != 3 {
		t.Fatalf("artifact store moved %+v %v", moved, err)
	}
	// A name whose bundles left the store (a removed machine) continues
	// above the highest version it ever had.
	if again, err := publishRole(ctx, fresh(), "c1", p, "file:///store", key, 7); err != nil || !again.Changed || again.Version != 8 {
		t.Fatalf("publish after 7 in an empty store %+v %v", again, err)
	}
}
