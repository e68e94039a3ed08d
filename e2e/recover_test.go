package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/agent"
)

// recoverSpec is 1 server and 2 clients (the web job wants 2 distinct
// hosts), without Vault: recovery is the clients' business.
const recoverSpec = "name = \"e2erec\"\n\nservers {\n  count = 1\n}\n\npool \"default\" {\n  count = 2\n}\n\nvault {\n  enabled = false\n}\n"

// A Nomad client whose client/state.db is corrupt recovers by itself:
// with the web job running, the test stops the client's Nomad through its
// agent, overwrites pages of the state database and starts it. Nomad
// panics on it (bbolt's page assertion); the agent recognises that, moves
// client/ and alloc/ aside and starts it again with its node identity.
// Within 30 s the client is ready again as the same node, the event is in
// the agent's status, log and metrics, the old state is kept aside, and
// the job is back to its 2 running allocations.
func TestRecoverCorruptClient(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	c := newSpecCluster(t, consul, nomad, recoverSpec, "127.0.7", 71, 3)
	c.up()
	env := c.envMap()
	c.runWebJob(env)
	took := c.corruptAndRecover(env, "e2erec-default-1")
	t.Logf("corrupt state -> client ready again: %v", took)
	if took > 30*time.Second {
		t.Errorf("the client took %v to be ready again after its state was corrupted, want at most 30s", took)
	}
}

// BenchmarkRecover measures the time from a corrupt state to the client
// ready again (its agent says Nomad is ready and its servers
// that the same node is ready), once per cluster: a second recovery of the
// same client within 2 minutes is refused by design. (A short name: the
// temp dir holding the machines' notify sockets is named after it.)
//
//	cd e2e && flock -o /tmp/steppe-e2e.lock ../scripts/offline go test -run '^$' -bench BenchmarkRecover -benchtime 1x .
func BenchmarkRecover(b *testing.B) {
	consul, nomad := daemonBinaries(b)
	c := newSpecCluster(b, consul, nomad, recoverSpec, "127.0.7", 71, 3)
	c.up()
	env := c.envMap()
	var total time.Duration
	for range b.N {
		total += c.corruptAndRecover(env, "e2erec-default-1")
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/recovery")
	b.ReportMetric(0, "ns/op")
}

func (c *upCluster) agentStatus(machine string) (agent.StatusReport, error) {
	var st agent.StatusReport
	out, err := c.steppe(time.Minute, "agent", "status", "-json", "-socket", c.machineSocket(machine))
	if err != nil {
		return st, fmt.Errorf("steppe agent status: %v\n%s", err, out)
	}
	return st, json.Unmarshal([]byte(out), &st)
}

// corruptAndRecover corrupts machine's client state and waits for its
// recovery; it returns the time from the corrupt start to the client
// ready again. With the web job running (c.runWebJob) it checks the job is
// back to its count.
func (c *upCluster) corruptAndRecover(env map[string]string, machine string) time.Duration {
	t := c.t
	t.Helper()
	nc := c.nomadClient(env)
	dataDir := filepath.Join(c.state, "machines", machine, "state", "data", "nomad")
	nodeID, err := os.ReadFile(filepath.Join(dataDir, "client", "client-id"))
	if err != nil {
		t.Fatal(err)
	}
	web := false
	if allocs, _, err := nc.Jobs().Allocations("web", false, nil); err == nil && len(allocs) > 0 {
		web = true
	}
	before, err := c.agentStatus(machine)
	if err != nil {
		t.Fatal(err)
	}

	if out, err := c.steppe(time.Minute, "agent", "stop", "nomad", "-socket", c.machineSocket(machine)); err != nil {
		t.Fatalf("steppe agent stop nomad: %v\n%s", err, out)
	}
	db := filepath.Join(dataDir, "client", "state.db")
	f, err := os.OpenFile(db, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Pages 2 and 3 (bbolt's first freelist and data pages), garbage.
	if _, err := f.WriteAt([]byte(strings.Repeat("\xde\xad\xbe\xef", 2048)), 2*4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	start := time.Now()
	if out, err := c.steppe(time.Minute, "agent", "start", "nomad", "-socket", c.machineSocket(machine)); err != nil {
		t.Fatalf("steppe agent start nomad: %v\n%s", err, out)
	}

	var rec agent.Recovery
	deadline := start.Add(2 * time.Minute)
	for {
		st, err := c.agentStatus(machine)
		if err == nil && len(st.Recoveries) > len(before.Recoveries) {
			rec = st.Recoveries[len(st.Recoveries)-1]
			ready := false
			for _, s := range st.Services {
				if s.Name == "nomad" && s.Ready {
					ready = true
				}
			}
			if ready {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no recovery of its Nomad client 2 minutes after its state was corrupted: %v %+v\n%s", machine, err, st, c.machineLogs(machine))
		}
		time.Sleep(100 * time.Millisecond)
	}
	agentReady := time.Since(start)
	// The same node, ready in the servers' eyes.
	id := strings.TrimSpace(string(nodeID))
	waitUntil(t, "node "+id+" ready again", time.Minute, func() bool {
		n, _, err := nc.Nodes().Info(id, nil)
		return err == nil && n.Status == "ready"
	})
	took := time.Since(start)
	t.Logf("recovery: %+v; agent ready after %v, node %s ready after %v", rec, agentReady, id, took)

	if rec.Error != "" || rec.Service != "nomad" || !rec.KeptIdentity {
		t.Errorf("recovery %+v: want nomad, no error, node identity kept", rec)
	}
	// Which bbolt panic depends on the pages overwritten ("assertion
	// failed: Page expected", "invalid freelist page", ...).
	if !strings.HasPrefix(rec.Reason, "panic: ") {
		t.Errorf("recovery reason %q: want Nomad's bbolt panic", rec.Reason)
	}
	// The old state is kept aside, as it was.
	if want := dataDir + ".recovered/"; !strings.HasPrefix(rec.MovedTo, want) {
		t.Errorf("moved to %q, want under %s", rec.MovedTo, want)
	}
	if b, err := os.ReadFile(filepath.Join(rec.MovedTo, "client", "state.db")); err != nil || !strings.Contains(string(b), "\xde\xad\xbe\xef") {
		t.Errorf("the corrupt state.db is not kept in %s: %v", rec.MovedTo, err)
	}
	if _, err := os.Stat(filepath.Join(rec.MovedTo, "alloc")); err != nil {
		t.Errorf("alloc/ not kept aside: %v", err)
	}
	log, err := os.ReadFile(filepath.Join(c.state, "machines", machine, "agent.log"))
	if err != nil || !strings.Contains(string(log), "nomad client state recovered: moved to "+rec.MovedTo) {
		t.Errorf("the agent log of %s does not say the state was recovered (%v)", machine, err)
	}
	out, err := c.steppe(time.Minute, "agent", "status", "-socket", c.machineSocket(machine))
	if err != nil || !strings.Contains(out, "nomad client state recovered") {
		t.Errorf("steppe agent status does not show the recovery: %v\n%s", err, out)
	}
	if web {
		waitUntil(t, "2 running web allocations again", 2*time.Minute, func() bool {
			allocs, _, err := nc.Jobs().Allocations("web", false, nil)
			if err != nil {
				return false
			}
			n := 0
			for _, a := range allocs {
				if a.ClientStatus == "running" && a.DesiredStatus == "run" {
					n++
				}
			}
			return n == 2
		})
		t.Logf("web back to 2 running allocations %v after the corrupt start", time.Since(start))
	}
	return took
}
