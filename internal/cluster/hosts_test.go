package cluster

import (
	"strings"
	"testing"
)

func TestParseSSHHosts(t *testing.T) {
	s, err := ParseSpec([]byte(`
provider "ssh" {
  host {
    address  = "10.214.0.11"
    host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
  }
  host {
    address     = "h2.example"
    port        = 2222
    user        = "admin"
    key         = "/keys/id"
    known_hosts = "/keys/known_hosts"
  }
}
`), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	hs := s.Provider.Hosts
	if s.Provider.Name != "ssh" || len(hs) != 2 {
		t.Fatalf("%+v", s.Provider)
	}
	if hs[0].Address != "10.214.0.11" || hs[0].Port != 22 || hs[0].User != "root" || !strings.HasPrefix(hs[0].HostKey, "ssh-ed25519 ") {
		t.Errorf("host 1: %+v", hs[0])
	}
	if hs[1] != (Host{Address: "h2.example", Port: 2222, User: "admin", Key: "/keys/id", KnownHosts: "/keys/known_hosts"}) {
		t.Errorf("host 2: %+v", hs[1])
	}
}

func TestParseSSHHostsErrors(t *testing.T) {
	for _, c := range []struct{ name, src, want string }{
		{"no hosts", `provider "ssh" {}`, `cluster.hcl:1:1: No hosts: provider "ssh" makes machines of existing hosts`},
		{"host on local", `provider "local" {
  host { address = "10.0.0.1" }
}`, `cluster.hcl:2:3: Unexpected host block: provider "local" makes its own machines`},
		{"no address", `provider "ssh" {
  host { port = 22 }
}`, `Missing required argument`},
		{"bad port", `provider "ssh" {
  host {
    address = "10.0.0.1"
    port    = 70000
  }
}`, `cluster.hcl:4:15: Invalid host port: 70000: want 1 to 65535`},
		{"duplicate", `provider "ssh" {
  host { address = "10.0.0.1" }
  host { address = "10.0.0.1" }
}`, `cluster.hcl:3:20: Duplicate host: 10.0.0.1:22 is listed twice (first at cluster.hcl:2:20)`},
		{"two keys", `provider "ssh" {
  host {
    address     = "10.0.0.1"
    host_key    = "ssh-ed25519 AAAA"
    known_hosts = "/k"
  }
}`, `Two host keys`},
	} {
		_, err := ParseSpec([]byte(c.src), "cluster.hcl")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
		}
	}
}
