package cluster

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/render"
)

// facts is the render scope the plan's templates use (see the fact*
// constants): a stand-in for internal/render's scope with the same names.
func renderAll(t *testing.T, p RolePlan, m Machine) map[string][]byte {
	t.Helper()
	f := render.Facts{Name: m.Name, Address: m.Address, Tags: map[string]string{
		TagDataDir: "/var/lib/steppe/data", TagSecretsDir: "/var/lib/steppe/secrets", TagConfigDir: "/var/lib/steppe/current",
	}}
	out := map[string][]byte{}
	for name, src := range p.Files {
		// The agent's own renderer: the planned templates must pass its
		// allow-list, not only text/template's.
		b, err := render.Execute(name, string(src), f, p.Vars)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out[strings.TrimSuffix(name, ".tmpl")] = b
	}
	return out
}

func testMachines(spec *Spec) []Machine {
	ms := spec.MachineList()
	for i := range ms {
		ms[i].Address = fmt.Sprintf("127.0.0.%d", 11+i)
	}
	return ms
}

func servers(ms []Machine) []Machine {
	var s []Machine
	for _, m := range ms {
		if m.Role == RoleServer {
			s = append(s, m)
		}
	}
	return s
}

func TestDeniedFingerprinters(t *testing.T) {
	for provider, want := range map[string]string{
		"local": "env_aws,env_azure,env_digitalocean,env_gce",
		"netns": "env_aws,env_azure,env_digitalocean,env_gce",
		"aws":   "env_azure,env_digitalocean,env_gce",
		"gcp":   "env_aws,env_azure,env_digitalocean",
	} {
		if got := strings.Join(DeniedFingerprinters(provider), ","); got != want {
			t.Errorf("provider %s: denied %s, want %s", provider, got, want)
		}
	}
}

func TestPlanRoles(t *testing.T) {
	spec, err := ParseSpec([]byte(`
pool "web" {
  count = 2
  node_class = "web"
  meta = { rack = "r{{1}}" }
}
pool "batch" {}
`), "c.hcl")
	if err != nil {
		t.Fatal(err)
	}
	ms := testMachines(spec)
	plans, err := Plan(spec, servers(ms))
	if err != nil {
		t.Fatal(err)
	}
	var roles []string
	for _, p := range plans {
		roles = append(roles, p.Role)
	}
	// Every daemon has a memory limit: the role's defaults here.
	for _, p := range plans {
		for _, sv := range p.Services {
			want := map[string]int64{"server/consul": DefaultServerConsulMemory, "server/nomad": DefaultServerNomadMemory, "server/coredns": DefaultCoreDNSMemory, "server/vault": DefaultServerVaultMemory}[p.Role+"/"+sv.Name]
			if p.Role != "server" {
				want = map[string]int64{"consul": DefaultClientConsulMemory, "nomad": DefaultClientNomadMemory, "coredns": DefaultCoreDNSMemory}[sv.Name]
			}
			if sv.MemoryMax != want || want == 0 {
				t.Errorf("%s/%s: memory limit %d, want %d", p.Role, sv.Name, sv.MemoryMax, want)
			}
		}
	}
	if strings.Join(roles, ",") != "server,client-web,client-batch" {
		t.Fatalf("roles %v", roles)
	}

	srv := renderAll(t, plans[0], ms[0])
	var consul, nomad map[string]any
	if err := json.Unmarshal(srv["consul.json"], &consul); err != nil {
		t.Fatalf("server consul.json: %v\n%s", err, srv["consul.json"])
	}
	if err := json.Unmarshal(srv["nomad.json"], &nomad); err != nil {
		t.Fatalf("server nomad.json: %v\n%s", err, srv["nomad.json"])
	}
	if consul["bootstrap_expect"] != 3.0 || consul["server"] != true || consul["bind_addr"] != "127.0.0.11" || consul["node_name"] != "steppe-server-1" {
		t.Fatalf("server consul config: %v", consul)
	}
	if fmt.Sprint(consul["retry_join"]) != "[127.0.0.11 127.0.0.12 127.0.0.13]" {
		t.Fatalf("retry_join %v", consul["retry_join"])
	}
	acl := consul["acl"].(map[string]any)
	if acl["enabled"] != true || acl["default_policy"] != "deny" || consul["disable_update_check"] != true {
		t.Fatalf("consul acl %v", acl)
	}
	tlsd := consul["tls"].(map[string]any)["defaults"].(map[string]any)
	if tlsd["verify_incoming"] != true || tlsd["verify_outgoing"] != true {
		t.Fatalf("consul tls %v", tlsd)
	}
	if https := consul["tls"].(map[string]any)["https"].(map[string]any); https["verify_incoming"] != false {
		t.Fatalf("consul HTTPS demands client certificates: %v", https)
	}
	if consul["ports"].(map[string]any)["http"] != -1.0 {
		t.Fatal("consul plaintext HTTP is not disabled")
	}
	ns := nomad["server"].(map[string]any)
	if ns["bootstrap_expect"] != 3.0 || nomad["disable_update_check"] != true || nomad["tls"].(map[string]any)["verify_server_hostname"] != true {
		t.Fatalf("nomad server config %v", nomad)
	}

	// Day one: the UIs, Prometheus metrics, and a dead server that stays a
	// voter.
	if fmt.Sprint(consul["ui_config"]) != "map[enabled:true]" || consul["telemetry"].(map[string]any)["prometheus_retention_time"] == nil {
		t.Fatalf("consul ui/telemetry: %v %v", consul["ui_config"], consul["telemetry"])
	}
	if consul["autopilot"].(map[string]any)["min_quorum"] != 3.0 || nomad["autopilot"].(map[string]any)["min_quorum"] != 3.0 {
		t.Fatalf("autopilot min_quorum: consul %v nomad %v", consul["autopilot"], nomad["autopilot"])
	}
	if tel := nomad["telemetry"].(map[string]any); tel["prometheus_metrics"] != true || tel["publish_allocation_metrics"] != true || tel["publish_node_metrics"] != true {
		t.Fatalf("nomad telemetry %v", tel)
	}
	if nomad["tls"].(map[string]any)["verify_https_client"] != false {
		t.Fatalf("nomad HTTPS demands client certificates: %v", nomad["tls"])
	}

	nc := nomad["consul"].(map[string]any)
	if nc["ssl"] != true || nc["verify_ssl"] != true || nc["service_identity"] == nil || nc["task_identity"] == nil {
		t.Fatalf("nomad server consul block %v", nc)
	}

	web := renderAll(t, plans[1], ms[3])
	nomad = nil
	if err := json.Unmarshal(web["nomad.json"], &nomad); err != nil {
		t.Fatal(err)
	}
	cl := nomad["client"].(map[string]any)
	if cl["node_class"] != "web" || cl["node_pool"] != "web" || cl["meta"].(map[string]any)["rack"] != "r{{1}}" {
		t.Fatalf("client config %v (meta must survive rendering verbatim)", cl)
	}
	if fmt.Sprint(cl["server_join"].(map[string]any)["retry_join"]) != "[127.0.0.11:4647 127.0.0.12:4647 127.0.0.13:4647]" {
		t.Fatalf("client servers %v", cl["server_join"])
	}
	if _, ok := nomad["server"]; ok {
		t.Fatal("a client has a server block")
	}
	if fmt.Sprint(nomad["plugin"]) != "map[raw_exec:map[config:map[enabled:true]]]" {
		t.Fatalf("client plugins %v", nomad["plugin"])
	}
	// Nothing leaves the machine: every cloud's metadata fingerprinter is
	// denied on the local provider, and no daemon calls home.
	if deny := cl["options"].(map[string]any)["fingerprint.denylist"]; deny != "env_aws,env_azure,env_digitalocean,env_gce" {
		t.Fatalf("client fingerprint.denylist = %v, want every cloud fingerprinter", deny)
	}
	if nomad["disable_anonymous_signature"] != true || nomad["disable_update_check"] != true {
		t.Fatalf("client nomad calls home: %v", nomad)
	}
	if consul["disable_anonymous_signature"] != true {
		t.Fatalf("consul calls home: %v", consul)
	}

	for _, p := range plans {
		byName := map[string]ServiceDef{}
		for _, s := range p.Services {
			byName[s.Name] = s
		}
		c, n := byName["consul"], byName["nomad"]
		if c.Ready == nil || !c.Ready.Notify || n.Ready == nil || !n.Ready.Notify {
			t.Fatalf("%s: readiness consul %+v nomad %+v", p.Role, c.Ready, n.Ready)
		}
		if len(n.After) != 1 || n.After[0] != "consul" {
			t.Fatalf("%s: nomad after %v", p.Role, n.After)
		}
		wantMode := StopCgroup
		if p.Role != "server" {
			wantMode = StopMain
		}
		if n.StopMode != wantMode || c.StopMode != StopCgroup {
			t.Fatalf("%s: stop modes consul %q nomad %q", p.Role, c.StopMode, n.StopMode)
		}
		want := []ArtifactRef{{"consul", "1.14.11"}, {"nomad", "1.10.5"}, {"coredns", "1.12.4"}}
		if p.Role == "server" {
			// Vault runs on the servers by default.
			want = slices.Insert(want, 2, ArtifactRef{"vault", DefaultVaultVersion})
		}
		if !slices.Equal(p.Artifacts, want) {
			t.Fatalf("%s: artifacts %v", p.Role, p.Artifacts)
		}
	}
}

func TestPlanNeedsServerAddresses(t *testing.T) {
	spec := DefaultSpec()
	ms := spec.MachineList()
	if _, err := Plan(spec, servers(ms)); err == nil || !strings.Contains(err.Error(), "has no address") {
		t.Fatalf("plan without addresses: %v", err)
	}
	if _, err := Plan(spec, servers(testMachines(spec))[:2]); err == nil {
		t.Fatal("plan with 2 of 3 servers succeeded")
	}
}

// TestNoSecretInBundles plans every role, renders it for every machine and
// scans every byte that goes into a bundle for every secret the state
// directory and the machines' secrets hold.
func TestNoSecretInBundles(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	spec := DefaultSpec()
	ms := testMachines(spec)
	plans, err := Plan(spec, servers(ms))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ConsulACL(spec, st, ms); err != nil {
		t.Fatal(err)
	}
	secretDirs := map[string]map[string][]byte{}
	for _, m := range ms {
		sec, err := MachineSecrets(spec, st, m, "/var/lib/steppe/secrets")
		if err != nil {
			t.Fatal(err)
		}
		secretDirs[m.Name] = sec
	}
	if _, err := st.Token(TokenConsulBootstrap); err != nil {
		t.Fatal(err)
	}
	if _, err := st.OperatorCert(); err != nil {
		t.Fatal(err)
	}

	// Every secret: tokens, gossip keys, and the body of every private key
	// in the state directory.
	var secrets []string
	for _, n := range st.TokenNames() {
		s, _ := st.LookupToken(n)
		secrets = append(secrets, s.Reveal())
	}
	secrets = append(secrets, st.ConsulGossipKey().Reveal(), st.NomadGossipKey().Reveal())
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte("PRIVATE KEY")) {
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			secrets = append(secrets, lines[1:len(lines)-1]...)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(secrets) < 3*len(ms) {
		t.Fatalf("only %d secrets collected", len(secrets))
	}

	var bundle bytes.Buffer
	for _, p := range plans {
		for _, m := range ms {
			if RoleName(m) != p.Role {
				continue
			}
			for _, b := range renderAll(t, p, m) {
				bundle.Write(b)
			}
		}
		for _, b := range p.Files {
			bundle.Write(b)
		}
		j, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		bundle.Write(j)
	}
	for _, s := range secrets {
		if len(s) < 16 {
			t.Fatalf("short secret line %q", s)
		}
		if bytes.Contains(bundle.Bytes(), []byte(s)) {
			t.Fatalf("a secret appears in a bundle: %.6s…", s)
		}
	}

	// The machines' secrets are where they belong: each has its own
	// agent token and key, and servers alone carry the Nomad gossip key.
	for _, m := range ms {
		sec := secretDirs[m.Name]
		tok, _ := st.LookupToken(TokenConsulAgent(m.Name))
		if !bytes.Contains(sec[SecretConsulConfig], []byte(tok.Reveal())) {
			t.Fatalf("%s: agent token not in its consul.json", m.Name)
		}
		hasNomadKey := bytes.Contains(sec[SecretNomadConfig], []byte(st.NomadGossipKey().Reveal()))
		if hasNomadKey != (m.Role == RoleServer) {
			t.Fatalf("%s (%s): nomad gossip key present = %v", m.Name, m.Role, hasNomadKey)
		}
		for _, o := range ms {
			if o.Name == m.Name {
				continue
			}
			if bytes.Equal(secretDirs[o.Name][SecretKeyFile], sec[SecretKeyFile]) {
				t.Fatalf("%s and %s share a key", m.Name, o.Name)
			}
		}
	}
}
