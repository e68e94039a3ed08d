package hashi_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

func serversOnly(addrs ...string) (*cluster.Spec, []string) {
	spec := cluster.DefaultSpec()
	spec.Pools = nil
	return spec, addrs
}

// TestOpsConsulNomadServers runs 3 Consul and 3 Nomad servers (the
// upgrade pair's older versions) under real supervisors and exercises the
// operations an upgrade relies on: autopilot health with raft indexes,
// member versions, snapshots saved and verified, Nomad leadership transfer.
func TestOpsConsulNomadServers(t *testing.T) {
	consulBin := hashitest.Binary(t, "consul", "1.14.8")
	nomadBin := hashitest.Binary(t, "nomad", "1.9.3")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	spec, addrs := serversOnly(hashitest.Addrs(3)...)
	c := hashitest.New(t, spec, addrs)
	consulMgmt, err := c.StartConsul(ctx, consulBin, nil)
	if err != nil {
		t.Fatal(err)
	}
	nomadMgmt, err := c.StartNomad(ctx, nomadBin, c.ServerMachines())
	if err != nil {
		t.Fatal(err)
	}
	consul := c.ConsulClient(c.Machines[1], consulMgmt)
	nomad := c.NomadClient(c.Machines[2], nomadMgmt)

	// Autopilot: 3 healthy voters, one leader, indexes.
	h, err := hashi.ConsulAutopilotHealth(ctx, consul)
	if err != nil {
		t.Fatal(err)
	}
	if p := h.Problems(3); len(p) != 0 {
		t.Fatalf("consul health problems: %v", p)
	}
	l, _ := h.Leader()
	for _, s := range h.Servers {
		if s.LastIndex == 0 || s.Version != "1.14.8" {
			t.Errorf("consul server %+v", s)
		}
		if _, ok := h.ByHost(s.Host()); !ok || !slices.Contains(addrs, s.Host()) {
			t.Errorf("server %s at unknown host %s", s.Name, s.Host())
		}
	}
	t.Logf("consul leader %s at index %d", l.Name, l.LastIndex)
	if p := h.Problems(4); len(p) == 0 {
		t.Error("a 3-server cluster passes as 4 servers")
	}
	nh, err := hashi.NomadAutopilotHealth(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	if p := nh.Problems(3); len(p) != 0 {
		t.Fatalf("nomad health problems: %v", p)
	}
	for _, s := range nh.Servers {
		if s.LastIndex == 0 || s.Version != "1.9.3" {
			t.Errorf("nomad server %+v", s)
		}
	}

	// Versions per member.
	ms, err := hashi.ConsulMemberVersions(ctx, consul)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 3 {
		t.Fatalf("consul members %+v", ms)
	}
	for _, m := range ms {
		if !m.Alive || !m.Server || m.Version != "1.14.8" || m.Status != "alive" {
			t.Errorf("consul member %+v", m)
		}
	}
	nms, err := hashi.NomadServerVersions(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	if len(nms) != 3 {
		t.Fatalf("nomad members %+v", nms)
	}
	for _, m := range nms {
		if !m.Alive || m.Version != "1.9.3" {
			t.Errorf("nomad member %+v", m)
		}
	}

	// Snapshots: saved, checked entry by entry, and a damaged one refused.
	dir := t.TempDir()
	for name, save := range map[string]func() (hashi.SnapshotInfo, error){
		"consul": func() (hashi.SnapshotInfo, error) {
			return hashi.SaveConsulSnapshot(ctx, consul, filepath.Join(dir, "consul.snap"))
		},
		"nomad": func() (hashi.SnapshotInfo, error) {
			return hashi.SaveNomadSnapshot(ctx, nomad, filepath.Join(dir, "nomad.snap"))
		},
	} {
		info, err := save()
		if err != nil {
			t.Fatalf("%s snapshot: %v", name, err)
		}
		if info.Bytes == 0 || !slices.Contains(info.Files, "state.bin") || !slices.Contains(info.Files, "meta.json") {
			t.Fatalf("%s snapshot %+v", name, info)
		}
		t.Logf("%s snapshot: %d bytes, %v", name, info.Bytes, info.Files)
		b, err := os.ReadFile(info.Path)
		if err != nil {
			t.Fatal(err)
		}
		bad := filepath.Join(dir, name+".bad")
		if err := os.WriteFile(bad, b[:len(b)/2], 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := hashi.CheckSnapshot(bad); err == nil {
			t.Errorf("%s: a truncated snapshot passes the check", name)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 4 {
		t.Errorf("snapshot dir holds %d entries (temporary files left?)", len(ents))
	}

	// Nomad hands leadership to another server on request.
	nl, _ := nh.Leader()
	var to hashi.ServerHealth
	for _, s := range nh.Servers {
		if !s.Leader {
			to = s
			break
		}
	}
	if err := hashi.NomadTransferLeadership(ctx, nomad, to.ID); err != nil {
		t.Fatal(err)
	}
	nh, err = hashi.NomadAutopilotHealth(ctx, nomad)
	if err != nil {
		t.Fatal(err)
	}
	if l, _ := nh.Leader(); l.ID != to.ID || l.ID == nl.ID {
		t.Fatalf("leader %s after a transfer from %s to %s", l.Name, nl.Name, to.Name)
	}
	if hashi.ConsulCanTransferLeadership() {
		t.Error("consul 1.14 has no leadership transfer")
	}

	// Consul 1.14 really has no transfer endpoint (it arrived in 1.15).
	_, err = consul.Raw().Write("/v1/operator/raft/transfer-leader", nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "404") && !strings.Contains(err.Error(), "405") {
		t.Errorf("consul 1.14 transfer-leader: %v, want 404/405", err)
	}
}

// Problems names every reason a cluster is not fit to lose a server, with
// the server it is about.
func TestClusterHealthProblems(t *testing.T) {
	srv := func(name string, healthy, voter, leader bool, serf string) hashi.ServerHealth {
		return hashi.ServerHealth{Name: name, Address: name + ":8300", Healthy: healthy, Voter: voter, Leader: leader, SerfStatus: serf}
	}
	fit := hashi.ClusterHealth{Healthy: true, Servers: []hashi.ServerHealth{
		srv("s1", true, true, true, "alive"), srv("s2", true, true, false, "alive"), srv("s3", true, true, false, "alive"),
	}}
	if p := fit.Problems(3); len(p) != 0 {
		t.Errorf("fit cluster: %q", p)
	}
	sick := hashi.ClusterHealth{Healthy: false, Servers: []hashi.ServerHealth{
		srv("s1", true, true, false, "alive"), srv("s2", false, true, false, "alive"), srv("s3", false, true, false, "failed"), srv("s4", true, false, false, "alive"),
	}}
	got := strings.Join(sick.Problems(3), "\n")
	for _, want := range []string{
		"autopilot reports the cluster unhealthy",
		"4 servers in the raft configuration, want 3",
		"server s2 (s2:8300) is unhealthy: its raft contact, term or index lags the leader's (gossip still sees it alive)",
		"server s3 (s3:8300) is unhealthy (serf failed)",
		"server s4 (s4:8300) is not a voter",
		"no leader",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("problems lack %q:\n%s", want, got)
		}
	}
}
