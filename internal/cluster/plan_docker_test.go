package cluster

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// A pool that asks for docker gets dockerd before Nomad and Nomad's docker
// plugin; one that does not has raw_exec only; bad drivers are refused
// with where and why.
func TestPlanDockerDrivers(t *testing.T) {
	spec, err := ParseSpec([]byte(`pool "web" {
  count   = 1
  drivers = ["raw_exec", "docker"]
}
pool "batch" {
  count = 1
}
pool "box" {
  count   = 1
  drivers = ["docker"]
}
`), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.MachineList()
	for i := range ms {
		ms[i].Address = fmt.Sprintf("127.0.0.%d", 20+i)
	}
	plans, err := Plan(spec, servers(ms))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range plans {
		var names []string
		var nomad ServiceDef
		for _, s := range p.Services {
			names = append(names, s.Name)
			if s.Name == serviceNomad {
				nomad = s
			}
		}
		var cfg struct {
			Plugin map[string]json.RawMessage `json:"plugin"`
		}
		if err := json.Unmarshal(p.Files[RoleNomadConfig], &cfg); err != nil {
			t.Fatalf("%s: %v", p.Role, err)
		}
		_, docker := cfg.Plugin[DriverDocker]
		_, raw := cfg.Plugin[DriverRawExec]
		wantDocker := p.Role == "client-web" || p.Role == "client-box"
		if slices.Contains(names, serviceDockerd) != wantDocker || docker != wantDocker || slices.Contains(nomad.After, serviceDockerd) != wantDocker {
			t.Errorf("%s: services %v, nomad after %v, docker plugin %v; want docker %v", p.Role, names, nomad.After, docker, wantDocker)
		}
		if raw != (p.Role == "client-web" || p.Role == "client-batch") {
			t.Errorf("%s: raw_exec plugin %v", p.Role, raw)
		}
		if !wantDocker {
			continue
		}
		if i, j := slices.Index(names, serviceDockerd), slices.Index(names, serviceNomad); i > j {
			t.Errorf("%s: dockerd after nomad: %v", p.Role, names)
		}
		d := p.Services[slices.Index(names, serviceDockerd)]
		args := strings.Join(d.Args, " ")
		for _, want := range []string{"--bridge=none", "--iptables=false", "native.cgroupdriver=cgroupfs", "--exec-root=" + DockerExecRoot + "/" + factName} {
			if !strings.Contains(args, want) {
				t.Errorf("%s: dockerd args %q lack %q", p.Role, args, want)
			}
		}
		if d.Command != DockerdPath || d.Artifact != "" || d.Ready == nil || len(d.Ready.Command) == 0 {
			t.Errorf("%s: dockerd %+v", p.Role, d)
		}
		plug := string(cfg.Plugin[DriverDocker])
		for _, want := range []string{`"allow_privileged": false`, `"image": false`, `"endpoint": "unix://` + factDataDir + `/docker.sock"`} {
			if !strings.Contains(plug, want) {
				t.Errorf("%s: docker plugin %s lacks %s", p.Role, plug, want)
			}
		}
	}
	for _, bad := range []string{`["lxc"]`, `["docker", "docker"]`, `"docker"`} {
		_, err := ParseSpec([]byte("pool \"web\" {\n  drivers = "+bad+"\n}\n"), "cluster.hcl")
		if err == nil || !strings.Contains(err.Error(), "cluster.hcl:2") {
			t.Errorf("drivers = %s: %v, want an error at cluster.hcl:2", bad, err)
		}
	}
}
