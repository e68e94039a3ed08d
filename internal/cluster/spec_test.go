package cluster

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestDefaultSpec(t *testing.T) {
	s := DefaultSpec()
	if s.Servers.Count != 3 || len(s.Pools) != 1 || s.Pools[0].Count != 2 {
		t.Fatalf("default topology: %d servers, pools %+v", s.Servers.Count, s.Pools)
	}
	if s.Provider.Name != "local" || s.Versions.Nomad != "1.10.5" || s.Versions.Consul != "1.14.11" || s.Versions.Vault != DefaultVaultVersion || !s.Vault.Enabled {
		t.Fatalf("default provider/versions: %+v %+v", s.Provider, s.Versions)
	}
	if s.Machines() != 5 {
		t.Fatalf("Machines() = %d, want 5", s.Machines())
	}
}

func TestParseEmptySpecIsDefault(t *testing.T) {
	for _, src := range []string{"", "\n# nothing here\n"} {
		s, err := ParseSpec([]byte(src), "cluster.hcl")
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(s, DefaultSpec()) {
			t.Fatalf("empty spec %q = %+v, want the default", src, s)
		}
	}
}

func TestParseFullSpec(t *testing.T) {
	src := `
name       = "prod"
region     = "eu"
datacenter = "fra1"
artifact_store = "http://127.0.0.1:9000/releases"
artifact_keys  = ["keys/mirror.asc"]
bundle_store   = "/srv/bundles"

versions {
  nomad  = "1.9.3"
  consul = "1.14.8"
  vault  = "1.21.0"
}

servers {
  count  = 5
  memory = { consul = "3GiB" }
}

pool "web" {
  count      = 4
  node_class = "web"
  memory     = { nomad = "512MiB", consul = "256MiB" }
  meta = {
    rack = "r1"
    tier = "front"
  }
}

pool "batch" {}

provider "local" {
  first_address = "127.0.0.20"
  detach        = true
  base_port     = 4000
}
`
	s, err := ParseSpec([]byte(src), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	want := &Spec{
		Name: "prod", Region: "eu", Datacenter: "fra1",
		Versions:      Versions{Nomad: "1.9.3", Consul: "1.14.8", Vault: "1.21.0", CoreDNS: DefaultCoreDNSVersion},
		Servers:       Servers{Count: 5, Memory: map[string]int64{"consul": 3 << 30, "nomad": DefaultServerNomadMemory, "vault": DefaultServerVaultMemory}},
		Vault:         VaultSpec{Enabled: true, Shares: DefaultVaultShares, Threshold: DefaultVaultThreshold},
		ArtifactStore: "http://127.0.0.1:9000/releases",
		ArtifactKeys:  []string{"keys/mirror.asc"},
		BundleStore:   "/srv/bundles",
		Pools: []Pool{
			{Name: "web", Count: 4, NodeClass: "web", Meta: map[string]string{"rack": "r1", "tier": "front"}, Memory: map[string]int64{"consul": 256 << 20, "nomad": 512 << 20}},
			{Name: "batch", Count: 1, Meta: map[string]string{}, Memory: defaultClientMemory()},
		},
		Provider: Provider{Name: "local", Options: map[string]string{"first_address": "127.0.0.20", "detach": "true", "base_port": "4000"}},
	}
	if !reflect.DeepEqual(s, want) {
		t.Fatalf("got  %+v\nwant %+v", s, want)
	}
}

func TestParseVaultSpec(t *testing.T) {
	s, err := ParseSpec([]byte(`
vault {
  shares    = 3
  threshold = 2
  seal "transit" {
    address    = "https://10.0.0.9:8200"
    key_name   = "steppe"
    token_file = "transit.token"
  }
}
servers { memory = { vault = "256MiB" } }
`), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	want := VaultSpec{Enabled: true, Shares: 3, Threshold: 2, Transit: &TransitSeal{Address: "https://10.0.0.9:8200", KeyName: "steppe", MountPath: "transit/", TokenFile: "transit.token"}}
	if !reflect.DeepEqual(s.Vault, want) || s.Versions.Vault != DefaultVaultVersion || s.Servers.Memory["vault"] != 256<<20 {
		t.Fatalf("got %+v (version %q, memory %d), want %+v", s.Vault, s.Versions.Vault, s.Servers.Memory["vault"], want)
	}
	off, err := ParseSpec([]byte("vault {\n  enabled = false\n}\n"), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	if off.Vault.Enabled || off.Versions.Vault != "" {
		t.Fatalf("vault { enabled = false }: got %+v, version %q", off.Vault, off.Versions.Vault)
	}
	for src, msg := range map[string]string{
		"vault {\n  threshold = 4\n  shares = 3\n}\n": "cluster.hcl:1:1: Invalid vault split: threshold 4 of 3 shares",
		"vault {\n  seal \"awskms\" {}\n}\n":          `cluster.hcl:2:8: Unsupported seal: "awskms"`,
		"vault {\n  seal \"transit\" {\n    address = \"http://x\"\n    key_name = \"k\"\n    token_file = \"t\"\n  }\n}\n": `cluster.hcl:3:15: Invalid transit address`,
		"pool \"a\" {\n  memory = { vault = \"1GiB\" }\n}\n":                                                                `Invalid memory: "vault": give limits for consul, nomad`,
	} {
		_, err := ParseSpec([]byte(src), "cluster.hcl")
		if err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%q: got %v, want an error containing %q", src, err, msg)
		}
	}
}

func TestSpecErrorsNamePosition(t *testing.T) {
	cases := []struct {
		name, src, want string
	}{
		{"unknown top key", "name = \"a\"\ncolour = \"red\"\n", "cluster.hcl:2:1: Unsupported argument"},
		{"unknown block", "\nfoo {}\n", "cluster.hcl:2:1: Unsupported block type"},
		{"unknown key in pool", "pool \"a\" {\n  size = 3\n}\n", "cluster.hcl:2:3: Unsupported argument"},
		{"bad type", "servers {\n  count = \"many\"\n}\n", "cluster.hcl:2:12: Unsuitable value type"},
		{"count zero", "servers {\n  count = 0\n}\n", "cluster.hcl:2:11: Invalid servers count: 0: must be at least 1"},
		{"pool count negative", "pool \"a\" {\n  count = -2\n}\n", "cluster.hcl:2:11: Invalid pool count"},
		{"duplicate pool", "pool \"a\" {}\npool \"b\" {}\npool \"a\" {}\n", "cluster.hcl:3:6: Duplicate pool name"},
		{"duplicate servers", "servers {}\nservers {}\n", "cluster.hcl:2:1: Duplicate servers block"},
		{"bad version", "versions {\n  nomad = \"latest\"\n}\n", "cluster.hcl:2:11: Invalid nomad version"},
		{"inexact version", "versions {\n  consul = \"1.14\"\n}\n", "cluster.hcl:2:12: Invalid consul version"},
		{"bad name", "name = \"My Cluster\"\n", "cluster.hcl:1:8: Invalid cluster name"},
		{"store without keys", "artifact_store = \"http://127.0.0.1:1/\"\n", "cluster.hcl:1:18: Unverifiable artifact_store"},
		{"store not a URL", "artifact_store = \"releases\"\n", "cluster.hcl:1:18: Invalid artifact_store"},
		{"relative file store", "artifact_store = \"file://store\"\nartifact_keys = [\"k\"]\n", "cluster.hcl:1:18: Invalid artifact_store"},
		{"empty keys", "artifact_store = \"file:///s\"\nartifact_keys = []\n", "cluster.hcl:2:17: Invalid artifact_keys"},
		{"bad pool name", "pool \"Web_1\" {}\n", "cluster.hcl:1:6: Invalid pool name"},
		{"provider option list", "provider \"ssh\" {\n  hosts = [\"a\"]\n}\n", "cluster.hcl:2:11: Invalid provider option hosts"},
		{"provider without label", "provider {}\n", "cluster.hcl:1:10: Missing name for provider"},
		{"syntax", "servers {\n  count = \n}\n", "cluster.hcl:2:"},
		{"empty bundle store", "bundle_store = \"\"\n", "cluster.hcl:1:16: Empty bundle_store"},
		{"memory of an unknown daemon", "servers {\n  memory = { vaultt = \"1GiB\" }\n}\n", "cluster.hcl:2:12: Invalid memory: \"vaultt\""},
		{"memory too small", "pool \"a\" {\n  memory = { nomad = \"16MiB\" }\n}\n", "cluster.hcl:2:12: Invalid memory: nomad = \"16MiB\": below 64MiB"},
		{"memory not a size", "pool \"a\" {\n  memory = { nomad = \"lots\" }\n}\n", "cluster.hcl:2:12: Invalid memory: nomad = \"lots\""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseSpec([]byte(c.src), "cluster.hcl")
			if err == nil {
				t.Fatalf("no error for %q", c.src)
			}
			var se *SpecError
			if !errors.As(err, &se) {
				t.Fatalf("error %T is not a *SpecError", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not contain %q", err, c.want)
			}
		})
	}
}

func TestSpecEvenServersWarns(t *testing.T) {
	s, err := ParseSpec([]byte("servers {\n  count = 4\n}\n"), "c.hcl")
	if err != nil {
		t.Fatal(err)
	}
	if s.Servers.Count != 4 || len(s.Warnings) != 1 || !strings.HasPrefix(s.Warnings[0], "c.hcl:2:11: Even number of servers") {
		t.Fatalf("count %d warnings %q", s.Servers.Count, s.Warnings)
	}
}

func TestLoadSpec(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "cluster.hcl")
	if err := os.WriteFile(p, []byte("pool \"gpu\" {\n  count = 3\n  nope = 1\n}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadSpec(p)
	if err == nil || !strings.Contains(err.Error(), p+":3:3: Unsupported argument") {
		t.Fatalf("LoadSpec error = %v", err)
	}
	if _, err := LoadSpec(filepath.Join(dir, "absent.hcl")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}

func TestValidName(t *testing.T) {
	for s, want := range map[string]bool{
		"a": true, "dc1": true, "web-01": true, strings.Repeat("a", 63): true,
		"": false, "-a": false, "a-": false, "A": false, "a_b": false, "a.b": false, strings.Repeat("a", 64): false, "é": false,
	} {
		if got := validName(s); got != want {
			t.Errorf("validName(%q) = %v, want %v", s, got, want)
		}
	}
}
