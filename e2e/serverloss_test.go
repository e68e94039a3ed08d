package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/supervise"
)

// lossJob gives `nomad job status` something to list.
const lossJob = `job "lossjob" {
  datacenters = ["dc1"]
  group "g" {
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

// autopilotWait is how long after a server is seen failed the test waits
// for autopilot to have reaped it, had it been going to: Consul 1.14 and
// Nomad 1.10 (raft-autopilot 0.1.6) prune failed voters on each
// reconcile, every AutopilotInterval (10 s in both), once Serf calls the
// member failed; min_quorum is what stops them. Three intervals and more.
const autopilotWait = 40 * time.Second

// TestServerLoss kills the first server machine whole (its agent and
// every process in its cgroup, as a machine that loses power), the one
// `steppe env` used to point at. A fresh `steppe env` then gives CLIs
// that work; both rafts keep 3 voters, one failing, long after
// autopilot's dead-server cleanup would have removed it (min_quorum = the
// server count); `steppe status` names the dead machine; `steppe up`
// brings it back and all three are healthy voters again.
func TestServerLoss(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	c := newSpecCluster(t, consul, nomad, `name = "e2eloss"

servers {
  count = 3
}

pool "default" {
  count = 1
}
`, "127.0.3", 21, 4)
	_, took := c.up()
	t.Logf("steppe up (3 servers, 1 client) took %v", took.Round(time.Millisecond))
	st := c.waitHealthy("3 servers and 1 ready client", 3*time.Minute, func(st *deploy.Status) bool {
		return len(st.Servers) == 3 && readyClients(st) == 1 && st.Raft.Voters == 3
	})
	const victim = "e2eloss-server-1"
	var va *deploy.AgentStatus
	for i := range st.Agents {
		if st.Agents[i].Machine == victim {
			va = &st.Agents[i]
		}
	}
	if va == nil || va.Role != "server" {
		t.Fatalf("no server machine %s in status: %+v", victim, st.Agents)
	}
	env := c.envMap()
	if u, _ := url.Parse(env["NOMAD_ADDR"]); u == nil || u.Hostname() != va.Address {
		t.Logf("note: with every server up, steppe env points Nomad at %s, not the first server %s", env["NOMAD_ADDR"], va.Address)
	}
	job := filepath.Join(c.dir, "loss.nomad.hcl")
	if err := os.WriteFile(job, []byte(lossJob), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.sh("nomad job run " + job); err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}

	killMachine(t, *va)
	killedAt := time.Now()

	// A fresh steppe env points at servers that answer.
	env = c.envMap()
	for _, k := range []string{"NOMAD_ADDR", "CONSUL_HTTP_ADDR"} {
		if u, err := url.Parse(env[k]); err != nil || u.Hostname() == va.Address {
			t.Errorf("after %s died, steppe env says %s=%s (%v)", victim, k, env[k], err)
		}
	}
	nc := c.nomadClient(env)
	cc := consulClient(t, env)
	r := rafts{cc: cc, nc: nc, token: env["NOMAD_TOKEN"]}
	// Serf calls it failed, not left (what autopilot's removal makes of
	// it): from then on autopilot may prune it. Both rafts keep 3
	// voters meanwhile.
	var members string
	waitUntil(t, victim+" failed in Consul's and Nomad's membership", 2*time.Minute, func() bool {
		time.Sleep(500 * time.Millisecond)
		members = memberStatus(cc, nc, victim)
		if strings.Contains(members, "left") {
			t.Fatalf("%s is gone from the cluster (consul/nomad membership %s) %v after the kill: autopilot removed it; raft now %s",
				victim, members, time.Since(killedAt).Round(100*time.Millisecond), raftVoters(r))
		}
		return members == "failed/failed"
	})
	failedAt := time.Now()
	t.Logf("%s seen failed by Consul and Nomad %v after the kill", victim, failedAt.Sub(killedAt).Round(100*time.Millisecond))

	cli, err := c.sh("nomad server members; echo ---; nomad job status; echo ---; consul members; echo ---; consul operator raft list-peers; echo ---; nomad operator raft list-peers")
	if err != nil {
		t.Fatalf("CLIs through a fresh steppe env with %s dead: %v\n%s", victim, err, cli)
	}
	parts := strings.Split(cli, "---")
	if len(parts) != 5 {
		t.Fatalf("CLI output:\n%s", cli)
	}
	if a, f := strings.Count(parts[0], " alive "), strings.Count(parts[0], " failed "); a != 2 || f != 1 {
		t.Errorf("nomad server members: %d alive, %d failed; want 2 and 1:\n%s", a, f, parts[0])
	}
	if !strings.Contains(parts[1], "lossjob") {
		t.Errorf("nomad job status lacks lossjob:\n%s", parts[1])
	}
	if a, f := strings.Count(parts[2], " alive "), strings.Count(parts[2], " failed "); a != 3 || f != 1 {
		t.Errorf("consul members: %d alive, %d failed; want 3 and 1:\n%s", a, f, parts[2])
	}
	for i, what := range map[int]string{3: "consul", 4: "nomad"} {
		if n := strings.Count(parts[i], victim); n != 1 {
			t.Errorf("%s operator raft list-peers does not list %s once:\n%s", what, victim, parts[i])
		}
	}
	t.Logf("CLIs through a fresh steppe env (%s, %s):\n%s", env["NOMAD_ADDR"], env["CONSUL_HTTP_ADDR"], cli)

	// status names the dead machine, and does not hang on it.
	stDead, exitErr, _, jerr := c.runStatus()
	if jerr != nil {
		t.Fatal(jerr)
	}
	if exitErr == nil || stDead.Healthy || !slices.ContainsFunc(stDead.Problems, func(p string) bool { return strings.Contains(p, victim) }) {
		t.Errorf("steppe status with %s dead: exit %v, healthy %v, problems %q", victim, exitErr, stDead.Healthy, stDead.Problems)
	}
	t.Logf("steppe status with %s dead (%v): %q", victim, stDead.Took.Round(time.Millisecond), stDead.Problems)

	// A new leader's autopilot may still call the dead server healthy for
	// a moment after its own serf marks it failed (its first stats of a
	// server come after election); CI saw one such reading. Then, through
	// autopilot's cleanup window and past it, every 2 s: 3 raft voters in
	// both, the dead one failing.
	waitUntil(t, "both autopilots to call "+victim+" unhealthy", 30*time.Second, func() bool {
		time.Sleep(500 * time.Millisecond)
		return autopilotCalls(r, victim, false) == nil
	})
	for time.Since(failedAt) < autopilotWait {
		checkRaft(t, r, victim, false)
		time.Sleep(2 * time.Second)
	}
	checkRaft(t, r, victim, false)
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%v after %s failed: Consul and Nomad keep 3 voters, %s failing", time.Since(failedAt).Round(time.Second), victim, victim)

	// up brings the machine back: three healthy voters in both.
	out, took := c.up()
	if !strings.Contains(out, "(started)") {
		t.Errorf("up after %s died started no agent:\n%s", victim, out)
	}
	t.Logf("steppe up after the loss took %v", took.Round(time.Millisecond))
	c.waitHealthy("3 alive servers, 3 voters", 3*time.Minute, func(st *deploy.Status) bool {
		alive := 0
		for _, s := range st.Servers {
			if s.Status == "alive" {
				alive++
			}
		}
		return alive == 3 && st.Raft.Voters == 3 && readyClients(st) == 1
	})
	waitUntil(t, "3 healthy voters in Consul's and Nomad's autopilot", 2*time.Minute, func() bool {
		time.Sleep(time.Second)
		return raftHealthy(r) == nil
	})
	checkRaft(t, r, victim, true)
	if st := c.status(); !st.Healthy {
		t.Errorf("steppe status after up brought %s back: %q", victim, st.Problems)
	}
	t.Logf("after up: %s back, Consul and Nomad have 3 healthy voters, steppe status is clean", victim)
}

// killMachine kills a local machine as a power loss would: SIGKILL to its
// agent first (so that it restarts nothing), then cgroup.kill of the
// machine's cgroup, which holds every service it started, and waits
// until all are gone.
func killMachine(t *testing.T, a deploy.AgentStatus) {
	t.Helper()
	if len(a.Services) == 0 {
		t.Fatalf("machine %s: no services in status", a.Machine)
	}
	// The machine's cgroup is the parent of its services' ones.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", a.Services[0].PID))
	if err != nil {
		t.Fatal(err)
	}
	var svc string
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			svc = rest
		}
	}
	v2 := supervise.CgroupV2Mount()
	if svc == "" || v2 == "" {
		t.Fatalf("machine %s: no v2 cgroup of %s (pid %d) in:\n%s", a.Machine, a.Services[0].Name, a.Services[0].PID, b)
	}
	machine := filepath.Join(v2, filepath.Dir(svc))
	if filepath.Base(machine) != a.Machine {
		t.Fatalf("machine %s: %s's cgroup %s is not below one of the machine's name", a.Machine, a.Services[0].Name, svc)
	}
	if err := syscall.Kill(a.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill the agent of %s: %v", a.Machine, err)
	}
	waitUntil(t, "the killed agent of "+a.Machine+" to be gone", 30*time.Second, func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", a.PID))
		return err != nil || strings.Contains(string(b), ") Z ")
	})
	if err := os.WriteFile(filepath.Join(machine, "cgroup.kill"), []byte("1"), 0o644); err != nil {
		t.Fatalf("kill machine %s: %v", a.Machine, err)
	}
	var left []string
	waitUntil(t, "every process of "+a.Machine+" gone", 30*time.Second, func() bool {
		left = nil
		filepath.WalkDir(machine, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Name() == "cgroup.procs" {
				if b, _ := os.ReadFile(p); len(strings.TrimSpace(string(b))) > 0 {
					left = append(left, p)
				}
			}
			return nil
		})
		return len(left) == 0
	})
	var pids []int
	for _, s := range a.Services {
		pids = append(pids, s.PID)
	}
	t.Logf("killed machine %s: agent %d and every process in %s (services %v)", a.Machine, a.PID, machine, pids)
}

func consulClient(t *testing.T, env map[string]string) *consulapi.Client {
	t.Helper()
	u, err := url.Parse(env["CONSUL_HTTP_ADDR"])
	if err != nil {
		t.Fatalf("CONSUL_HTTP_ADDR %q: %v", env["CONSUL_HTTP_ADDR"], err)
	}
	cfg := consulapi.DefaultConfig()
	cfg.Address, cfg.Scheme, cfg.Token = u.Host, u.Scheme, env["CONSUL_HTTP_TOKEN"]
	cfg.TLSConfig = consulapi.TLSConfig{CAFile: env["CONSUL_CACERT"], CertFile: env["CONSUL_CLIENT_CERT"], KeyFile: env["CONSUL_CLIENT_KEY"]}
	cc, err := consulapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cc
}

// memberStatus is "consul/nomad" membership of a server machine
// ("failed/failed" once both Serfs called it failed).
func memberStatus(cc *consulapi.Client, nc *nomadapi.Client, name string) string {
	cs, ns := "?", "?"
	if ms, err := cc.Agent().Members(false); err == nil {
		for _, m := range ms {
			if m.Name == name {
				cs = map[int]string{1: "alive", 2: "leaving", 3: "left", 4: "failed"}[m.Status]
			}
		}
	}
	if ms, err := nc.Agent().Members(); err == nil {
		for _, m := range ms.Members {
			if strings.HasPrefix(m.Name, name+".") {
				ns = m.Status
			}
		}
	}
	return cs + "/" + ns
}

// rafts reaches both clusters' servers as the operator.
type rafts struct {
	cc    *consulapi.Client
	nc    *nomadapi.Client
	token string // Nomad's
}

// raftVoters says who votes in both rafts, for a failure message.
func raftVoters(r rafts) string {
	var b strings.Builder
	if cr, err := r.cc.Operator().RaftGetConfiguration(nil); err != nil {
		fmt.Fprintf(&b, "consul: %v", err)
	} else {
		b.WriteString("consul voters:")
		for _, s := range cr.Servers {
			if s.Voter {
				b.WriteString(" " + s.Node)
			}
		}
	}
	if nr, err := r.nc.Operator().RaftGetConfiguration(nil); err != nil {
		fmt.Fprintf(&b, "; nomad: %v", err)
	} else {
		b.WriteString("; nomad voters:")
		for _, s := range nr.Servers {
			if s.Voter {
				b.WriteString(" " + s.Node)
			}
		}
	}
	return b.String()
}

// checkRaft checks that both rafts have exactly 3 voters, the machine
// victim among them, and that autopilot calls victim healthy or not as
// it should.
func checkRaft(t *testing.T, r rafts, victim string, healthy bool) {
	t.Helper()
	cc, nc := r.cc, r.nc
	cr, err := cc.Operator().RaftGetConfiguration(nil)
	if err != nil {
		t.Errorf("consul raft configuration: %v", err)
	} else {
		var voters []string
		for _, s := range cr.Servers {
			if s.Voter {
				voters = append(voters, s.Node)
			}
		}
		if len(voters) != 3 || len(cr.Servers) != 3 || !slices.Contains(voters, victim) {
			t.Errorf("consul raft: voters %v of %d servers; want 3, %s among them", voters, len(cr.Servers), victim)
		}
	}
	nr, err := nc.Operator().RaftGetConfiguration(nil)
	if err != nil {
		t.Errorf("nomad raft configuration: %v", err)
	} else {
		var voters []string
		for _, s := range nr.Servers {
			if s.Voter {
				voters = append(voters, strings.Split(s.Node, ".")[0])
			}
		}
		if len(voters) != 3 || len(nr.Servers) != 3 || !slices.Contains(voters, victim) {
			t.Errorf("nomad raft: voters %v of %d servers; want 3, %s among them", voters, len(nr.Servers), victim)
		}
	}
	ch, err := cc.Operator().AutopilotServerHealth(nil)
	if err != nil {
		t.Errorf("consul autopilot health: %v", err)
	} else {
		for _, s := range ch.Servers {
			if s.Name == victim && s.Healthy != healthy {
				t.Errorf("consul autopilot: %s healthy=%v, want %v", victim, s.Healthy, healthy)
			}
		}
		if len(ch.Servers) != 3 {
			t.Errorf("consul autopilot knows %d servers, want 3", len(ch.Servers))
		}
	}
	nh, err := nomadAutopilotHealth(r.nc, r.token)
	if err != nil {
		t.Errorf("nomad autopilot health: %v", err)
	} else {
		for _, s := range nh.Servers {
			if strings.Split(s.Name, ".")[0] == victim && s.Healthy != healthy {
				t.Errorf("nomad autopilot: %s healthy=%v, want %v", victim, s.Healthy, healthy)
			}
		}
		if len(nh.Servers) != 3 {
			t.Errorf("nomad autopilot knows %d servers, want 3", len(nh.Servers))
		}
	}
}

// autopilotCalls is nil when both autopilots call victim healthy (or not)
// as wanted.
func autopilotCalls(r rafts, victim string, healthy bool) error {
	ch, err := r.cc.Operator().AutopilotServerHealth(nil)
	if err != nil {
		return err
	}
	nh, err := nomadAutopilotHealth(r.nc, r.token)
	if err != nil {
		return err
	}
	for _, s := range ch.Servers {
		if s.Name == victim && s.Healthy != healthy {
			return fmt.Errorf("consul autopilot: %s healthy=%v", victim, s.Healthy)
		}
	}
	for _, s := range nh.Servers {
		if strings.Split(s.Name, ".")[0] == victim && s.Healthy != healthy {
			return fmt.Errorf("nomad autopilot: %s healthy=%v", victim, s.Healthy)
		}
	}
	return nil
}

// raftHealthy is nil when both autopilots call 3 voters healthy.
func raftHealthy(r rafts) error {
	cc := r.cc
	ch, err := cc.Operator().AutopilotServerHealth(nil)
	if err != nil {
		return err
	}
	nh, err := nomadAutopilotHealth(r.nc, r.token)
	if err != nil {
		return err
	}
	n := 0
	for _, s := range ch.Servers {
		if s.Healthy && s.Voter {
			n++
		}
	}
	for _, s := range nh.Servers {
		if s.Healthy && s.Voter {
			n++
		}
	}
	if n != 6 || !ch.Healthy || !nh.Healthy {
		return fmt.Errorf("healthy voters: %d of 6 (consul %v, nomad %v)", n, ch.Healthy, nh.Healthy)
	}
	return nil
}

// nomadAutopilotHealth is Nomad's autopilot health, which it sends with
// status 429 while a server is unhealthy (the API client calls that an
// error and drops the reply).
func nomadAutopilotHealth(nc *nomadapi.Client, token string) (*nomadapi.OperatorHealthReply, error) {
	req, err := http.NewRequest(http.MethodGet, nc.Address()+"/v1/operator/autopilot/health", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-Nomad-Token", token)
	resp, err := nc.Raw().Do(req)
	if err != nil {
		return nil, fmt.Errorf("nomad autopilot health: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusTooManyRequests {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("nomad autopilot health: %s: %s", resp.Status, b)
	}
	var out nomadapi.OperatorHealthReply
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("nomad autopilot health: %w", err)
	}
	return &out, nil
}
