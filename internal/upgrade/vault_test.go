package upgrade

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// A Vault upgrade plans a snapshot and one step per server that is not
// on the target, after Consul's and Nomad's; clients run no Vault and get
// a step only for what they run. New refuses a Vault upgrade that has no
// way to unseal the servers it restarts.
func TestVaultPlan(t *testing.T) {
	cfg := Config{
		StateDir:  t.TempDir(),
		Target:    map[string]string{Vault: "1.21.0", Nomad: "1.10.5"},
		Servers:   []Server{{Machine: "s1", Address: "127.0.9.1"}, {Machine: "s2", Address: "127.0.9.2"}, {Machine: "s3", Address: "127.0.9.3"}},
		Clients:   []Client{{Machine: "c1", Address: "127.0.9.4", Pool: "default"}, {Machine: "c2", Address: "127.0.9.5", Pool: "default"}},
		APIs:      &testCluster{},
		Machines:  swapMachinesNone{},
		Artifacts: cacheArtifacts{},
	}
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "Unsealer") {
		t.Fatalf("New without an Unsealer for a Vault upgrade: %v", err)
	}
	cfg.Unsealer = noUnseal{}
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pre := &PreflightReport{From: map[string]string{Vault: "1.20.4", Nomad: "1.9.3"}}
	for _, s := range cfg.Servers {
		v := map[string]string{Vault: "1.20.4", Nomad: "1.9.3"}
		if s.Machine == "s2" {
			v[Vault] = "1.21.0" // already moved by an earlier, forced run
		}
		pre.Machines = append(pre.Machines, MachineVersions{Machine: s.Machine, Address: s.Address, Server: true, Versions: v})
	}
	pre.Machines = append(pre.Machines,
		MachineVersions{Machine: "c1", Address: "127.0.9.4", Versions: map[string]string{Nomad: "1.9.3"}},
		MachineVersions{Machine: "c2", Address: "127.0.9.5", Versions: map[string]string{Nomad: "1.10.5"}})
	var ids []string
	for _, s := range u.plan(pre).Steps {
		ids = append(ids, s.ID)
		if s.Kind == KindClient && strings.Contains(s.To, "vault") {
			t.Errorf("client step %s moves vault: %s", s.ID, s.To)
		}
	}
	want := []string{"snapshot/nomad", "snapshot/vault",
		"server/nomad/s1", "server/nomad/s2", "server/nomad/s3",
		"server/vault/s1", "server/vault/s3",
		"client/c1"}
	if !slices.Equal(ids, want) {
		t.Errorf("plan %v\nwant %v", ids, want)
	}
}

// swapMachinesNone and noUnseal are never called: the test only plans.
type swapMachinesNone struct{}

func (swapMachinesNone) Upgrade(context.Context, string, map[string]string) error {
	return errors.New("not in a planning test")
}

type noUnseal struct{}

func (noUnseal) Unseal(context.Context, string, string) error {
	return errors.New("not in a planning test")
}
