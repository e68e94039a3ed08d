package provider

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/cluster"
)

func newTestLocal(t *testing.T, first string) *Local {
	t.Helper()
	l, err := NewLocal(LocalOptions{Dir: t.TempDir(), Cluster: "c1", FirstAddress: first, Binary: "/bin/true"})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestAssignIsStableAndSkipsExisting(t *testing.T) {
	l := newTestLocal(t, "127.0.0.201")
	spec := cluster.DefaultSpec()
	ms, err := l.Assign(context.Background(), spec.MachineList())
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range ms {
		if want := "127.0.0." + strconv.Itoa(201+i); m.Address != want {
			t.Errorf("%s got %s, want %s (servers first, in order)", m.Name, m.Address, want)
		}
	}
	// A machine that exists keeps its address; the next new one takes
	// the lowest free.
	if _, err := l.prepare(CreateRequest{Machine: cluster.Machine{Name: "steppe-server-2", Role: cluster.RoleServer, Address: "127.0.0.209"}}); err != nil {
		t.Fatal(err)
	}
	ms, err = l.Assign(context.Background(), spec.MachineList())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, m := range ms {
		got[m.Name] = m.Address
	}
	if got["steppe-server-2"] != "127.0.0.209" || got["steppe-server-1"] != "127.0.0.201" || got["steppe-server-3"] != "127.0.0.202" {
		t.Errorf("addresses %v", got)
	}
	if _, err := l.prepare(CreateRequest{Machine: cluster.Machine{Name: "steppe-server-2", Role: cluster.RoleClient, Pool: "x"}}); err == nil || !strings.Contains(err.Error(), "exists as server") {
		t.Errorf("a machine re-created with another role: %v", err)
	}
}

func TestNewLocalRefusesNonLoopback(t *testing.T) {
	_, err := NewLocal(LocalOptions{Dir: t.TempDir(), Cluster: "c1", FirstAddress: "10.0.0.1"})
	if err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Fatalf("err %v", err)
	}
}

func TestPortsFreeNamesTheAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.211:8501")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = portsFree("127.0.0.211")
	if err == nil || !strings.Contains(err.Error(), "127.0.0.211:8501") {
		t.Fatalf("err %v", err)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.212:8301")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := portsFree("127.0.0.212"); err == nil || !strings.Contains(err.Error(), "127.0.0.212:8301 (udp)") {
		t.Fatalf("udp: %v", err)
	}
	if err := portsFree("127.0.0.213"); err != nil {
		t.Fatal(err)
	}
}

func TestDeliverWritesPrivateFilesAndReportsChange(t *testing.T) {
	l := newTestLocal(t, "")
	m := Machine{Name: "m1"}
	files := map[string][]byte{"key.pem": []byte("k1"), "consul.json": []byte("{}")}
	changed, err := l.Deliver(context.Background(), m, files)
	if err != nil || !changed {
		t.Fatalf("first delivery: %v %v", changed, err)
	}
	dir := l.SecretsDir("m1")
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("secrets dir: %v %v", fi.Mode(), err)
	}
	for n := range files {
		if fi, err := os.Stat(filepath.Join(dir, n)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v", n, fi.Mode(), err)
		}
	}
	if changed, err := l.Deliver(context.Background(), m, files); err != nil || changed {
		t.Errorf("same secrets again: changed %v, %v", changed, err)
	}
	files["key.pem"] = []byte("k2")
	if changed, err := l.Deliver(context.Background(), m, files); err != nil || !changed {
		t.Errorf("new key: changed %v, %v", changed, err)
	}
	if _, err := l.Deliver(context.Background(), m, map[string][]byte{"../x": nil}); err == nil {
		t.Error("a secret file name with a slash was accepted")
	}
}

// The generated agent config is valid for the real agent's parser, and a
// hostile value stays a literal string.
func TestAgentConfigParses(t *testing.T) {
	l := newTestLocal(t, "")
	keys := filepath.Join(t.TempDir(), "k.pub")
	if err := os.WriteFile(keys, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	m := Machine{Name: "m1", Address: "127.0.0.5", Pool: "p${x}", Dir: filepath.Join(t.TempDir(), "m1"), Socket: "/tmp/s.sock"}
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	err := l.writeAgentConfig(m, AgentConfig{Cluster: "c1", Region: "global", Datacenter: "dc1", BundleRole: "server",
		BundleStore: "/srv/bundles", BundleKeys: []string{keys}, MinBundleVersion: 4})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := agent.LoadConfig(filepath.Join(m.Dir, agentConfig))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Machine.Pool != "p${x}" || cfg.Machine.Address != "127.0.0.5" || cfg.Bundle.Role != "server" || cfg.Bundle.MinVersion != 4 || cfg.Cgroup != "/"+l.CgroupParent()+"/m1" {
		t.Errorf("config %+v %+v", cfg.Machine, cfg.Bundle)
	}
}

// A pidfile whose pid now belongs to another program is not the agent.
func TestAgentPIDChecksTheCommandLine(t *testing.T) {
	l := newTestLocal(t, "")
	m := Machine{Name: "m1", Dir: filepath.Join(t.TempDir(), "m1")}
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	os.WriteFile(filepath.Join(m.Dir, agentPIDFile), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
	if pid, running := l.agentPID(m); running {
		t.Errorf("sleep (pid %d) taken for the agent", pid)
	}
}

// Two clusters of one name in different state directories get different
// cgroup parents: a `down` of one never reaches the other's processes.
func TestCgroupParentPerStateDir(t *testing.T) {
	a, err := NewLocal(LocalOptions{Dir: t.TempDir(), Cluster: "steppe"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewLocal(LocalOptions{Dir: t.TempDir(), Cluster: "steppe"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := NewLocal(LocalOptions{Dir: a.opts.Dir, Cluster: "steppe"})
	if err != nil {
		t.Fatal(err)
	}
	if a.CgroupParent() == b.CgroupParent() {
		t.Fatalf("two state directories share cgroup %s", a.CgroupParent())
	}
	if a.CgroupParent() != again.CgroupParent() {
		t.Fatalf("one state directory gives cgroups %s and %s", a.CgroupParent(), again.CgroupParent())
	}
	if !strings.HasPrefix(a.CgroupParent(), "steppe-steppe-") {
		t.Fatalf("cgroup %s does not name its cluster", a.CgroupParent())
	}
}
