package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	nomadapi "github.com/hashicorp/nomad/api"
	"github.com/vishvananda/netlink"

	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/supervise"
)

// newNetnsCluster is the default 3 servers and 2 clients on the netns
// provider, on subnet; steppe down removes it at the end of the test.
func newNetnsCluster(t *testing.T, name, subnet string) (*upCluster, *provider.Local) {
	t.Helper()
	consul, nomad := daemonBinaries(t)
	c := &upCluster{t: t, bin: steppeBinary(t), dir: t.TempDir(), consul: consul, nomad: nomad}
	c.spec = filepath.Join(c.dir, "cluster.hcl")
	c.state = filepath.Join(c.dir, "state")
	p := netip.MustParsePrefix(subnet)
	a := p.Addr().Next()
	for range 5 {
		a = a.Next()
		c.addrs = append(c.addrs, a.String())
	}
	spec := fmt.Sprintf("name = %q\nprovider \"netns\" {\n  subnet = %q\n}\n", name, subnet)
	if err := os.WriteFile(c.spec, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !c.downDone {
			if out, err := c.steppe(5*time.Minute, "down", "-state", c.state); err != nil {
				t.Errorf("cleanup: steppe down: %v\n%s", err, out)
			}
		}
	})
	// The provider as up makes it: for the names of its bridge, veths and
	// namespaces.
	l, err := provider.NewNetns(provider.NetnsOptions{Local: provider.LocalOptions{Dir: filepath.Join(c.state, "machines"), Cluster: name}, Subnet: subnet})
	if err != nil {
		t.Fatal(err)
	}
	return c, l
}

// TestNetnsUp is one cluster on the netns provider for several checks
// (one cluster's CPU): up to healthy, each machine on its own namespace
// and address; the real CLIs through steppe env from the operator's
// namespace through the bridge; a job; a server partitioned and healed; a
// client lost whole and replaced by up; down leaving nothing.
func TestNetnsUp(t *testing.T) {
	c, l := newNetnsCluster(t, "e2enetns", "10.213.9.0/24")
	out, took := c.up()
	t.Logf("steppe up (netns, 3 servers + 2 clients) took %v:\n%s", took.Round(time.Millisecond), out)

	st := c.status()
	if !st.Healthy || len(st.Agents) != 5 {
		t.Fatalf("status after up: %+v", st)
	}
	ownNet, _ := os.Readlink("/proc/self/ns/net")
	nets := map[string]bool{}
	for _, a := range st.Agents {
		if !slices.Contains(c.addrs, a.Address) {
			t.Errorf("%s: address %s is not one of the subnet's %v", a.Machine, a.Address, c.addrs)
		}
		ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", a.PID))
		if ns == ownNet || nets[ns] {
			t.Errorf("%s: agent in network namespace %s, shared with the operator or another machine", a.Machine, ns)
		}
		nets[ns] = true
		for _, s := range a.Services {
			if sns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", s.PID)); sns != ns {
				t.Errorf("%s/%s runs in %s, not in its machine's %s", a.Machine, s.Name, sns, ns)
			}
		}
		host, err := exec.Command("nsenter", "-t", fmt.Sprint(a.PID), "--uts", "--", "cat", "/proc/sys/kernel/hostname").Output()
		if err != nil || strings.TrimSpace(string(host)) != a.Machine {
			t.Errorf("%s: hostname %q, %v", a.Machine, host, err)
		}
	}

	// The real CLIs, configured only by steppe env, from the operator's
	// namespace: through the bridge.
	cli, err := c.sh("consul members; echo ---; nomad server members; echo ---; nomad node status")
	if err != nil {
		t.Fatalf("CLIs through steppe env: %v\n%s", err, cli)
	}
	if n := strings.Count(cli, " alive "); n != 8 {
		t.Errorf("%d alive members (want 5 in consul, 3 nomad servers):\n%s", n, cli)
	}
	env := c.envMap()
	if !strings.Contains(env["NOMAD_ADDR"], "10.213.9.") || !strings.Contains(env["CONSUL_HTTP_ADDR"], "10.213.9.") {
		t.Errorf("steppe env does not point at the subnet: %v", env)
	}
	allocs := c.runWebJob(env)
	c.checkNetnsDNS(st)

	c.partitionServer(l, st)
	c.loseClient(l, env)

	outDown, err := c.steppe(5*time.Minute, "down", "-state", c.state)
	if err != nil {
		t.Fatalf("steppe down: %v\n%s", err, outDown)
	}
	c.downDone = true
	t.Logf("steppe down:\n%s", outDown)
	c.checkNetnsNothingLeft(l, allocs)
}

// checkNetnsDNS: from inside a client machine (its agent's network and
// mount namespaces), web.service.consul resolves through its switched
// resolv.conf, which names the machine's CoreDNS, to the job's
// allocation addresses. CoreDNS stopped (SIGSTOP, so that the agent sees
// it silent rather than restarting it): resolv.conf is switched back
// after fallback_after and status names the machine; continued, it is
// switched again and the problem goes.
func (c *upCluster) checkNetnsDNS(st deploy.Status) {
	t := c.t
	var a deploy.AgentStatus
	for _, x := range st.Agents {
		if strings.HasPrefix(x.Role, "client") {
			a = x
			break
		}
	}
	coredns := 0
	for _, s := range a.Services {
		if s.Name == "coredns" {
			coredns = s.PID
		}
	}
	if a.PID == 0 || coredns == 0 {
		t.Fatalf("no client machine running coredns in %+v", st.Agents)
	}
	inside := func(args ...string) (string, error) {
		out, err := exec.Command("nsenter", append([]string{"-t", fmt.Sprint(a.PID), "--net", "--mount", "--"}, args...)...).CombinedOutput()
		return string(out), err
	}
	ours := "\nnameserver " + a.Address + "\n"
	resolv := func() string { out, _ := inside("cat", "/etc/resolv.conf"); return out }
	waitUntil(t, a.Machine+"'s resolv.conf switched to its CoreDNS", time.Minute, func() bool { return strings.Contains(resolv(), ours) })
	st = c.status()
	for _, x := range st.Agents {
		if x.Machine == a.Machine && !strings.Contains(x.Resolver, "switched to CoreDNS at "+a.Address) {
			t.Errorf("status of %s's resolver: %q", a.Machine, x.Resolver)
		}
	}
	if !strings.Contains(st.DNS, "consul. only") {
		t.Errorf("status dns: %q", st.DNS)
	}
	catalog, err := c.sh("consul catalog nodes -service web")
	if err != nil {
		t.Fatalf("consul catalog: %v\n%s", err, catalog)
	}
	var want []string
	for _, line := range strings.Split(strings.TrimSpace(catalog), "\n")[1:] {
		if f := strings.Fields(line); len(f) >= 3 {
			want = append(want, f[2])
		}
	}
	slices.Sort(want)
	var got []string
	waitUntil(t, "getent ahostsv4 web.service.consul inside "+a.Machine+" to give "+strings.Join(want, " "), time.Minute, func() bool {
		out, err := inside("getent", "ahostsv4", "web.service.consul")
		if err != nil {
			return false
		}
		got = nil
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[1] == "STREAM" {
				got = append(got, f[0])
			}
		}
		slices.Sort(got)
		return slices.Equal(got, want)
	})
	hosts, err := inside("getent", "hosts", "web.service.consul")
	if f := strings.Fields(hosts); err != nil || len(f) < 2 || !slices.Contains(want, f[0]) {
		t.Errorf("getent hosts web.service.consul inside %s: %v %q, want one of %v", a.Machine, err, hosts, want)
	}
	t.Logf("inside %s, web.service.consul is %v through its resolv.conf:\n%s", a.Machine, got, resolv())

	if err := syscall.Kill(coredns, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	cont := func() { _ = syscall.Kill(coredns, syscall.SIGCONT) }
	defer cont()
	waitUntil(t, a.Machine+"'s resolv.conf switched back", provider.ResolverFallback+15*time.Second, func() bool { return !strings.Contains(resolv(), ours) })
	took := time.Since(stopped)
	if took < provider.ResolverFallback-2*time.Second {
		t.Errorf("resolv.conf switched back %v after CoreDNS stopped, before fallback_after %v", took, provider.ResolverFallback)
	}
	if r := resolv(); strings.Contains(r, "nameserver") {
		t.Errorf("the resolv.conf switched back to names a nameserver; the machine had none:\n%s", r)
	}
	waitUntil(t, "status naming "+a.Machine+"'s resolver", time.Minute, func() bool {
		s, _, _, err := c.runStatus()
		return err == nil && !s.Healthy && slices.ContainsFunc(s.Problems, func(p string) bool {
			return strings.Contains(p, "machine "+a.Machine+": its resolver") && strings.Contains(p, "stopped answering")
		})
	})
	t.Logf("CoreDNS on %s stopped: resolv.conf switched back after %v (fallback_after %v)", a.Machine, took.Round(time.Millisecond), provider.ResolverFallback)
	cont()
	continued := time.Now()
	waitUntil(t, a.Machine+"'s resolv.conf switched again", 30*time.Second, func() bool { return strings.Contains(resolv(), ours) })
	t.Logf("CoreDNS on %s continued: resolv.conf switched again after %v", a.Machine, time.Since(continued).Round(time.Millisecond))
	if out, err := inside("getent", "hosts", "web.service.consul"); err != nil {
		t.Errorf("getent hosts web.service.consul after the switch back: %v %q", err, out)
	}
	waitUntil(t, "status healthy again", time.Minute, func() bool {
		s, _, _, err := c.runStatus()
		return err == nil && s.Healthy
	})
}

// partitionServer cuts one server off the other machines and the operator
// (its veth on the bridge down): the other two keep a leader, the job
// keeps running, status names the server; healed, it rejoins: one
// leader, 3 voters in Nomad and in Consul.
func (c *upCluster) partitionServer(l *provider.Local, st deploy.Status) {
	t := c.t
	victim := ""
	for _, s := range st.Servers {
		if s.Leader {
			victim = strings.TrimSuffix(s.Name, ".global")
		}
	}
	if victim == "" {
		t.Fatalf("no Nomad leader in %+v", st.Servers)
	}
	link, err := netlink.LinkByName(l.VethName(victim))
	if err != nil {
		t.Fatalf("%s's veth: %v", victim, err)
	}
	start := time.Now()
	if err := netlink.LinkSetDown(link); err != nil {
		t.Fatal(err)
	}
	healed := false
	heal := func() {
		if !healed {
			healed = true
			if err := netlink.LinkSetUp(link); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer heal()
	var last deploy.Status
	waitUntil(t, "a new Nomad leader among the other two servers and status naming "+victim, 2*time.Minute, func() bool {
		s, _, _, err := c.runStatus()
		if err != nil {
			return false
		}
		last = s
		// Status names the server as not alive, in Nomad's and in
		// Consul's view.
		named := slices.ContainsFunc(s.Servers, func(ss deploy.ServerStatus) bool { return ss.Name == victim && ss.Status != "alive" }) &&
			slices.ContainsFunc(s.Consul, func(m deploy.ConsulMember) bool { return m.Name == victim && m.Status != "alive" })
		return s.Raft != nil && s.Raft.Leader != "" && s.Raft.Leader != victim && named && !s.Healthy
	})
	t.Logf("partitioned %s: leader %s after %v; problems: %q", victim, last.Raft.Leader, time.Since(start).Round(time.Millisecond), last.Problems)
	out, err := c.sh("nomad job status -short web | grep -E '^(Status|ID)'; nomad job allocs -t '{{range .}}{{.ClientStatus}} {{end}}' web")
	if err != nil || strings.Count(out, "running") < 3 { // the job's status and its two allocations
		t.Errorf("web during the partition: %v\n%s", err, out)
	}
	heal()
	start = time.Now()
	waitUntil(t, "the healed cluster healthy with 3 voters in Nomad and Consul", 3*time.Minute, func() bool {
		s, _, _, err := c.runStatus()
		if err != nil || !s.Healthy || s.Raft == nil || s.Raft.Voters != 3 {
			return false
		}
		last = s
		for _, cmd := range []string{"consul operator raft list-peers", "nomad operator raft list-peers"} {
			out, err := c.sh(cmd)
			if leaders, voters := raftPeers(out); err != nil || leaders != 1 || voters != 3 {
				return false
			}
		}
		return true
	})
	peers, _ := c.sh("consul operator raft list-peers; nomad operator raft list-peers")
	t.Logf("healed in %v, leader %s:\n%s", time.Since(start).Round(time.Millisecond), last.Raft.Leader, peers)
}

// raftPeers counts the leaders and voters of `consul|nomad operator raft
// list-peers` (columns Node ID Address State Voter RaftProtocol).
func raftPeers(out string) (leaders, voters int) {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[0] == "Node" {
			continue
		}
		if f[3] == "leader" {
			leaders++
		}
		if f[4] == "true" {
			voters++
		}
	}
	return leaders, voters
}

// keepJob has two allocations that may share a client: when one client
// is lost, both run on the other.
const keepJob = `job "keep" {
  datacenters = ["dc1"]
  type        = "service"
  group "keep" {
    count = 2
    task "sleep" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }
      resources {
        cpu    = 20
        memory = 16
      }
    }
  }
}
`

// loseClient kills every process of a client machine and removes its
// namespace: Nomad reschedules its allocations on the other client,
// status shows it down, and up makes it again.
func (c *upCluster) loseClient(l *provider.Local, env map[string]string) {
	t := c.t
	job := filepath.Join(c.dir, "keep.nomad.hcl")
	if err := os.WriteFile(job, []byte(keepJob), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.sh("nomad job run " + job); err != nil {
		t.Fatalf("nomad job run keep: %v\n%s", err, out)
	}
	cfg := nomadapi.DefaultConfig()
	cfg.Address, cfg.SecretID = env["NOMAD_ADDR"], env["NOMAD_TOKEN"]
	cfg.TLSConfig = &nomadapi.TLSConfig{CACert: env["NOMAD_CACERT"], ClientCert: env["NOMAD_CLIENT_CERT"], ClientKey: env["NOMAD_CLIENT_KEY"]}
	nc, err := nomadapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	running := func() map[string]int {
		allocs, _, err := nc.Jobs().Allocations("keep", false, nil)
		if err != nil {
			return nil
		}
		out := map[string]int{}
		for _, a := range allocs {
			if a.ClientStatus == "running" {
				out[a.NodeName]++
			}
		}
		return out
	}
	waitUntil(t, "2 running keep allocations", 2*time.Minute, func() bool {
		n := 0
		for _, v := range running() {
			n += v
		}
		return n == 2
	})
	before := running()
	victim := ""
	for node := range before {
		victim = node
	}
	ns := l.NetnsPath(victim)
	pids := netnsPIDs(t, ns)
	if len(pids) < 3 {
		t.Fatalf("%s: %d processes in its namespace %v, want the agent, its daemons and tasks", victim, len(pids), pids)
	}
	start := time.Now()
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	waitUntil(t, victim+"'s processes gone", 30*time.Second, func() bool { return len(netnsPIDs(t, ns)) == 0 })
	if err := syscall.Unmount(ns, syscall.MNT_DETACH); err != nil {
		t.Fatalf("remove %s's namespace: %v", victim, err)
	}
	// The kernel frees a namespace, and the veth with it, in a work
	// queue after its last reference goes: not at once on a loaded host.
	waitUntil(t, victim+"'s veth gone with its namespace", 15*time.Second, func() bool {
		_, err := netlink.LinkByName(l.VethName(victim))
		return err != nil
	})
	waitUntil(t, "Nomad to mark "+victim+" down and run both keep allocations elsewhere", 3*time.Minute, func() bool {
		r := running()
		return r[victim] == 0 && len(r) == 1 && sum(r) == 2
	})
	t.Logf("%s lost: both keep allocations run elsewhere after %v", victim, time.Since(start).Round(time.Millisecond))
	waitUntil(t, "status showing "+victim+" lost", time.Minute, func() bool {
		s, _, _, err := c.runStatus()
		if err != nil || s.Healthy {
			return false
		}
		for _, cl := range s.Clients {
			if cl.Name == victim && cl.Status == "down" {
				return true
			}
		}
		return false
	})
	out, took := c.up()
	if !strings.Contains(out, victim) {
		t.Errorf("up after %s was lost does not name it:\n%s", victim, out)
	}
	t.Logf("up replaced %s in %v", victim, took.Round(time.Millisecond))
	waitUntil(t, "the cluster healthy again with "+victim+" ready", 2*time.Minute, func() bool {
		s, _, _, err := c.runStatus()
		if err != nil || !s.Healthy {
			return false
		}
		return slices.ContainsFunc(s.Clients, func(cl deploy.ClientStatus) bool { return cl.Name == victim && cl.Status == "ready" })
	})
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// netnsPIDs are the live processes in the network namespace pinned at ns.
func netnsPIDs(t testing.TB, ns string) []int {
	t.Helper()
	var want syscall.Stat_t
	if err := syscall.Stat(ns, &want); err != nil {
		return nil
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	var out []int
	for _, p := range procs {
		var st syscall.Stat_t
		if syscall.Stat(p+"/ns/net", &st) != nil || st.Ino != want.Ino || st.Dev != want.Dev {
			continue
		}
		if b, err := os.ReadFile(p + "/stat"); err == nil && bytes.Contains(b, []byte(") Z ")) {
			continue
		}
		var pid int
		fmt.Sscan(filepath.Base(p), &pid)
		out = append(out, pid)
	}
	return out
}

// checkNetnsNothingLeft: no process, interface, namespace, mount, cgroup
// or file of the cluster after down.
func (c *upCluster) checkNetnsNothingLeft(l *provider.Local, allocs []string) {
	t := c.t
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(c.state)) {
			t.Errorf("process %s left: %q", filepath.Dir(p), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	links, _ := netlink.LinkList()
	for _, link := range links {
		if n := link.Attrs().Name; n == l.Bridge() || strings.HasPrefix(n, "stv-") {
			t.Errorf("interface %s left", n)
		}
	}
	if v2 := supervise.CgroupV2Mount(); v2 != "" {
		if left, _ := filepath.Glob(filepath.Join(v2, "steppe-e2enetns-*")); len(left) > 0 {
			t.Errorf("cgroups left: %v", left)
		}
	}
	if mem, err := supervise.MemoryV1Cgroup(os.Getpid()); err == nil && mem != "" {
		if left, _ := filepath.Glob(filepath.Join(mem, "steppe-e2enetns-*")); len(left) > 0 {
			t.Errorf("memory cgroups left: %v", left)
		}
	}
	for _, id := range allocs {
		if left, _ := filepath.Glob("/sys/fs/cgroup/*/nomad/" + id + "*"); len(left) > 0 {
			t.Errorf("allocation cgroups left: %v", left)
		}
	}
	if mounts, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mounts, []byte(c.state)) {
		t.Errorf("mounts left under %s", c.state)
	}
	if _, err := os.Stat(c.state); !os.IsNotExist(err) {
		t.Errorf("state dir still there: %v", err)
	}
	b, _ := json.Marshal(c.addrs)
	t.Logf("nothing of the cluster (%s) left", b)
}
