package hashi_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

// TestNomadClusterSecured starts the default topology (3 servers, 2
// clients) with the real consul and nomad binaries from the plan: Consul
// on every machine, Nomad servers and clients talking to their local
// Consul over mutual TLS with their least-privilege tokens. It bootstraps
// Consul then Nomad ACLs, sets up workload identity, runs a raw_exec job
// with a Consul service, and checks what must be refused.
func TestNomadClusterSecured(t *testing.T) {
	consulBin := hashitest.Binary(t, "consul", cluster.DefaultConsulVersion)
	// STEPPE_TEST_NOMAD_VERSION runs the same test against another
	// built version (1.9.3, the upgrade pair's first).
	nomadVersion := cluster.DefaultNomadVersion
	if v := os.Getenv("STEPPE_TEST_NOMAD_VERSION"); v != "" {
		nomadVersion = v
	}
	nomadBin := hashitest.Binary(t, "nomad", nomadVersion)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	spec := cluster.DefaultSpec()
	c := hashitest.New(t, spec, hashitest.Addrs(len(spec.MachineList())))
	st, servers := c.State, c.Servers
	start := time.Now()
	phase := func(name string) { t.Logf("phase %-32s done at %v", name, time.Since(start).Round(time.Millisecond)) }
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%s\n%s", fmt.Sprintf(format, args...), c.Logs("consul", "nomad"))
	}
	if err := c.StartAll(ctx, c.Machines, map[string]string{cluster.ConsulProduct: consulBin}, "consul"); err != nil {
		fail("%v", err)
	}
	phase("consul: 5 agents joined")

	// Consul first: its ACLs, and the tokens the machines already hold.
	consulAnon := c.ConsulClient(c.Machines[0], "")
	if _, err := hashi.WaitConsulLeader(ctx, consulAnon); err != nil {
		fail("%v", err)
	}
	consulMgmt, err := hashi.BootstrapConsulACL(ctx, consulAnon, st)
	if err != nil {
		fail("%v", err)
	}
	consulAdmin := c.ConsulClient(c.Machines[1], consulMgmt)
	var ms []cluster.Machine
	for _, m := range c.Machines {
		ms = append(ms, m.Machine)
	}
	aclPlan, err := cluster.ConsulACL(spec, st, ms)
	if err != nil {
		t.Fatal(err)
	}
	if err := hashi.ApplyConsulACL(ctx, consulAdmin, aclPlan); err != nil {
		fail("%v", err)
	}
	phase("consul: ACLs bootstrapped")

	// Then Nomad, after its local Consul is ready (ServiceDef.After).
	for _, m := range c.Machines {
		var def cluster.ServiceDef
		for _, s := range m.Plan().Services {
			if s.Name == "nomad" {
				def = s
			}
		}
		if len(def.After) != 1 || def.After[0] != "consul" {
			t.Fatalf("%s: nomad after %v", m.Name, def.After)
		}
	}
	if err := c.StartAll(ctx, c.Machines, map[string]string{cluster.NomadProduct: nomadBin}, "nomad"); err != nil {
		fail("%v", err)
	}
	phase("nomad: 5 agents started")

	nomadAnon := c.NomadClient(c.Machines[0], "")
	if _, err := hashi.WaitNomadLeader(ctx, nomadAnon); err != nil {
		fail("%v", err)
	}
	nomadMgmt, err := hashi.BootstrapNomadACL(ctx, nomadAnon, st)
	if err != nil {
		fail("%v", err)
	}
	if again, err := hashi.BootstrapNomadACL(ctx, nomadAnon, st); err != nil || again != nomadMgmt {
		fail("second Nomad bootstrap: %v", err)
	}
	nomadAdmin := c.NomadClient(c.Machines[2], nomadMgmt)
	if err := hashi.WaitNomadToken(ctx, nomadAdmin); err != nil {
		fail("%v", err)
	}
	if _, err := hashi.WaitNomadHealthy(ctx, nomadAdmin, 3); err != nil {
		fail("%v", err)
	}
	phase("nomad: ACLs, 3 healthy servers")
	peers, err := hashi.NomadServers(ctx, nomadAdmin)
	if err != nil {
		fail("%v", err)
	}
	leaders := 0
	for _, p := range peers {
		if p.Leader {
			leaders++
		}
	}
	if len(peers) != 3 || leaders != 1 {
		fail("nomad raft peers %+v", peers)
	}
	nodes, err := hashi.WaitNomadClients(ctx, nomadAdmin, 2)
	if err != nil {
		fail("%v", err)
	}
	phase("nomad: 2 clients ready")
	for _, n := range nodes {
		var nets []string
		if node, _, err := nomadAdmin.Nodes().Info(n.ID, nil); err == nil && node.NodeResources != nil {
			for _, nw := range node.NodeResources.Networks {
				nets = append(nets, nw.Device+" "+nw.IP)
			}
		}
		// Tasks get the fingerprinted address: with network_interface
		// "lo" it is 127.0.0.1 on every local machine (DESIGN: facts).
		t.Logf("nomad client %s at %s: %s, task networks %v", n.Name, n.Address, n.Status, nets)
	}

	// Nomad's gossip is encrypted with the state directory's key.
	keys, err := nomadAdmin.Agent().ListKeys()
	if err != nil {
		fail("nomad keyring: %v", err)
	}
	if len(keys.Keys) != 1 || keys.Keys[st.NomadGossipKey().Reveal()] != 3 {
		fail("nomad keyring has %d keys, the state's on %d servers", len(keys.Keys), keys.Keys[st.NomadGossipKey().Reveal()])
	}

	// 5 Consul members, and Nomad registered itself in Consul with its
	// token over mutual TLS.
	members, err := hashi.ConsulMembers(consulAdmin)
	if err != nil {
		fail("%v", err)
	}
	alive := 0
	for _, m := range members {
		if m.Alive {
			alive++
		}
	}
	if alive != 5 {
		fail("consul members %+v", members)
	}
	// Every agent registered its node with its own token.
	err = hashi.Poll(ctx, "5 nodes in the Consul catalog", func() (bool, error) {
		nodes, _, err := consulAdmin.Catalog().Nodes(nil)
		if err != nil {
			return false, err
		}
		if len(nodes) != 5 {
			return false, fmt.Errorf("%d nodes", len(nodes))
		}
		return true, nil
	})
	if err != nil {
		fail("%v", err)
	}
	err = hashi.Poll(ctx, "nomad services in Consul", func() (bool, error) {
		svcs, _, err := consulAdmin.Catalog().Services(nil)
		if err != nil {
			return false, err
		}
		_, s := svcs["nomad"]
		_, c := svcs["nomad-client"]
		if !s || !c {
			return false, fmt.Errorf("services %v", svcs)
		}
		return true, nil
	})
	if err != nil {
		fail("%v", err)
	}

	// Refused: no token, plaintext, a certificate from another CA.
	if _, _, err := nomadAnon.Nodes().List(nil); err == nil || !strings.Contains(err.Error(), "403") {
		fail("node list without a token: %v, want 403", err)
	}
	if resp, err := http.Get("http://" + servers[0].Address + ":4646/v1/agent/self"); err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			fail("nomad answered plaintext HTTP: %s", body)
		}
	}
	other, err := cluster.OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	oc, err := other.OperatorCert()
	if err != nil {
		t.Fatal(err)
	}
	// Nomad's HTTPS API asks for no client certificate (a browser opens
	// the UI; the token authorises), Consul's still demands one.
	bare, err := hashi.NomadClient(servers[0].Address+":4646", hashi.TLSFiles{CAFile: st.CAFile()}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := bare.Nodes().List(nil); err == nil || !strings.Contains(err.Error(), "403") {
		fail("nomad node list without a certificate or token: %v, want 403", err)
	}
	bare, err = hashi.NomadClient(servers[0].Address+":4646", hashi.TLSFiles{CAFile: st.CAFile()}, nomadMgmt)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := bare.Nodes().List(nil); err != nil {
		fail("nomad node list with a token and no client certificate: %v", err)
	}
	checkTLSRefused(t, fmt.Sprintf("%s:%d", servers[0].Address, cluster.ConsulRPCPort), consulRPCTLS, st.CACertPEM(), oc.CertFile, oc.KeyFile)
	checkTLSRefused(t, fmt.Sprintf("%s:%d", servers[0].Address, cluster.NomadRPCPort), nomadRPCTLS, st.CACertPEM(), oc.CertFile, oc.KeyFile)

	// Workload identity: Consul trusts Nomad's signing keys; a job's
	// service registers with a token Consul issued through the auth method.
	if err := hashi.SetupConsulWorkloadIdentity(ctx, consulAdmin, nomadAdmin, st.CACertPEM(), []string{"default"}); err != nil {
		fail("%v", err)
	}
	if err := hashi.SetupConsulWorkloadIdentity(ctx, consulAdmin, nomadAdmin, st.CACertPEM(), []string{"default"}); err != nil {
		fail("second workload identity setup: %v", err)
	}
	rules, _, err := consulAdmin.ACL().BindingRuleList(hashi.ConsulAuthMethod, nil)
	if err != nil || len(rules) != 2 {
		fail("binding rules after two setups: %d, %v", len(rules), err)
	}

	job := nomadapi.NewServiceJob("wi-test", "wi-test", spec.Region, 50)
	job.Datacenters = []string{spec.Datacenter}
	tg := nomadapi.NewTaskGroup("g", 2)
	tg.Services = []*nomadapi.Service{{Name: "wi-web", Provider: "consul"}}
	task := nomadapi.NewTask("sleep", "raw_exec")
	task.Config = map[string]any{"command": "/bin/sleep", "args": []string{"3600"}}
	task.Resources = &nomadapi.Resources{CPU: ptr(50), MemoryMB: ptr(32)}
	tg.AddTask(task)
	job.AddTaskGroup(tg)
	if _, _, err := nomadAdmin.Jobs().Register(job, nil); err != nil {
		fail("register job: %v", err)
	}
	t.Cleanup(func() {
		// Stop the tasks through Nomad, so that it unmounts what it
		// mounted, and wait until the clients say they stopped; then purge.
		nomadAdmin.Jobs().Deregister("wi-test", false, nil)
		dctx, dcancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer dcancel()
		err := hashi.Poll(dctx, "job stopped", func() (bool, error) {
			allocs, _, err := nomadAdmin.Jobs().Allocations("wi-test", true, nil)
			if err != nil {
				return false, err
			}
			for _, a := range allocs {
				if a.ClientStatus == "running" || a.ClientStatus == "pending" {
					return false, fmt.Errorf("allocation %s is %s", a.ID, a.ClientStatus)
				}
			}
			return true, nil
		})
		if err != nil {
			t.Logf("%v (the host cleanup kills what is left)", err)
		}
		nomadAdmin.Jobs().Deregister("wi-test", true, nil)
	})
	err = hashi.Poll(ctx, "2 running allocations", func() (bool, error) {
		allocs, _, err := nomadAdmin.Jobs().Allocations("wi-test", false, nil)
		if err != nil {
			return false, err
		}
		running := 0
		var states []string
		for _, a := range allocs {
			states = append(states, a.ClientStatus+" "+a.ClientDescription)
			if a.ClientStatus == "running" {
				running++
			}
			if a.ClientStatus == "failed" {
				return false, hashi.Permanent(fmt.Errorf("allocation %s failed: %s %v", a.ID, a.ClientDescription, a.TaskStates))
			}
		}
		if running != 2 {
			return false, fmt.Errorf("allocations %v", states)
		}
		return true, nil
	})
	if err != nil {
		fail("%v", err)
	}
	err = hashi.Poll(ctx, "wi-web registered in Consul", func() (bool, error) {
		svc, _, err := consulAdmin.Catalog().Service("wi-web", "", nil)
		if err != nil {
			return false, err
		}
		if len(svc) != 2 {
			return false, fmt.Errorf("%d instances", len(svc))
		}
		return true, nil
	})
	if err != nil {
		fail("%v", err)
	}
	phase("job: 2 allocations, services in Consul")
	toks, _, err := consulAdmin.ACL().TokenListFiltered(consulapi.ACLTokenFilterOptions{AuthMethod: hashi.ConsulAuthMethod}, nil)
	if err != nil {
		fail("%v", err)
	}
	if len(toks) == 0 {
		fail("no Consul token was issued through the %s auth method", hashi.ConsulAuthMethod)
	}
	t.Logf("%d Consul tokens issued to workloads through %s", len(toks), hashi.ConsulAuthMethod)

	// The real CLIs, configured only by the environment CLIEnv gives.
	env, err := cluster.CLIEnv(st, servers[0].Address+":8501", servers[1].Address+":4646")
	if err != nil {
		t.Fatal(err)
	}
	home := t.TempDir()
	cli := func(bin string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = append(env, "HOME="+home, "PATH=/usr/bin:/bin")
		out, err := cmd.CombinedOutput()
		if err != nil {
			fail("%s %v: %v\n%s", filepath.Base(bin), args, err, out)
		}
		return string(out)
	}
	if out := cli(consulBin, "members"); strings.Count(out, " alive ") != 5 {
		fail("consul members:\n%s", out)
	}
	if out := cli(nomadBin, "server", "members"); strings.Count(out, " alive ") != 3 || strings.Count(out, " true ") != 1 {
		fail("nomad server members:\n%s", out)
	}
	if out := cli(nomadBin, "node", "status"); strings.Count(out, " ready") != 2 {
		fail("nomad node status:\n%s", out)
	}

	// Nothing secret in any daemon's log.
	for _, m := range c.Machines {
		for _, svc := range []string{"consul", "nomad"} {
			for _, log := range m.LogFiles(svc) {
				checkLogClean(t, m.Name+"/"+svc, log, st)
			}
		}
	}
}

func ptr[T any](v T) *T { return &v }

func checkLogClean(t *testing.T, name, log string, st *cluster.State) {
	t.Helper()
	f, err := os.Open(log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	secrets := []string{st.ConsulGossipKey().Reveal(), st.NomadGossipKey().Reveal()}
	for _, n := range st.TokenNames() {
		s, _ := st.LookupToken(n)
		secrets = append(secrets, s.Reveal())
	}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		for _, s := range secrets {
			if strings.Contains(sc.Text(), s) {
				t.Fatalf("%s's log holds a secret: %.40s…", name, sc.Text())
			}
		}
	}
}
