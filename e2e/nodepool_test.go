package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/deploy"
)

// poolJob is a raw_exec job of count allocations in a node pool.
const poolJob = `job %q {
  datacenters = ["dc1"]
  node_pool   = %q
  group "g" {
    count = %d
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

// TestNodePools: steppe's pools are Nomad node pools. A spec of two
// client pools, web (1 machine) and batch (2), makes both pools in Nomad
// before the clients join; each client is in its pool (Nomad and steppe
// status say so); a job with node_pool = "batch" runs on batch clients
// only, one with node_pool = "web" on the web client only; a job for a
// pool that does not exist is refused by Nomad, naming the pool.
func TestNodePools(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	c := newSpecCluster(t, consul, nomad, `name = "e2epool"

servers {
  count = 1
}

pool "web" {
  count = 1
}

pool "batch" {
  count = 2
}
`, "127.0.3", 31, 4)
	_, took := c.up()
	t.Logf("steppe up (1 server, pools web 1 and batch 2) took %v", took.Round(time.Millisecond))
	st := c.waitHealthy("3 ready clients", 3*time.Minute, func(st *deploy.Status) bool { return readyClients(st) == 3 })
	want := map[string]string{"e2epool-web-1": "web", "e2epool-batch-1": "batch", "e2epool-batch-2": "batch"}
	for _, cl := range st.Clients {
		if want[cl.Name] != cl.Pool {
			t.Errorf("steppe status: client %s in node pool %q, want %q", cl.Name, cl.Pool, want[cl.Name])
		}
	}
	if len(st.Clients) != len(want) {
		t.Errorf("steppe status: %d clients, want %d: %+v", len(st.Clients), len(want), st.Clients)
	}

	out, err := c.sh("nomad node pool list; echo ---; nomad node status -verbose")
	if err != nil {
		t.Fatalf("nomad node pool list: %v\n%s", err, out)
	}
	pools, nodes, _ := strings.Cut(out, "---")
	for _, p := range []string{"web", "batch"} {
		if !slices.ContainsFunc(strings.Split(pools, "\n"), func(l string) bool { return strings.HasPrefix(l, p+" ") }) {
			t.Errorf("nomad node pool list lacks %s:\n%s", p, pools)
		}
	}
	t.Logf("nomad node pool list:\n%s\nnomad node status:\n%s", pools, nodes)
	env := c.envMap()
	nc := c.nomadClient(env)
	ns, _, err := nc.Nodes().List(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if want[n.Name] != n.NodePool {
			t.Errorf("nomad: node %s in pool %q, want %q", n.Name, n.NodePool, want[n.Name])
		}
	}
	for _, p := range []string{"web", "batch"} {
		np, _, err := nc.NodePools().Info(p, nil)
		if err != nil {
			t.Errorf("nomad node pool %s: %v", p, err)
			continue
		}
		t.Logf("node pool %s: %q", np.Name, np.Description)
	}

	run := func(name, pool string, count int) (string, error) {
		job := filepath.Join(c.dir, name+".nomad.hcl")
		if err := os.WriteFile(job, []byte(fmt.Sprintf(poolJob, name, pool, count)), 0o644); err != nil {
			t.Fatal(err)
		}
		return c.sh("nomad job run -detach " + job)
	}
	placed := func(job string, count int) map[string]int {
		t.Helper()
		var on map[string]int
		waitUntil(t, fmt.Sprintf("%d running allocations of %s", count, job), 2*time.Minute, func() bool {
			time.Sleep(500 * time.Millisecond)
			allocs, _, err := nc.Jobs().Allocations(job, false, nil)
			if err != nil {
				return false
			}
			on = map[string]int{}
			n := 0
			for _, a := range allocs {
				on[a.NodeName]++
				if a.ClientStatus == "running" {
					n++
				}
			}
			return n == count
		})
		return on
	}
	for _, j := range []struct {
		name, pool string
		count      int
		on         []string
	}{
		{"batchjob", "batch", 4, []string{"e2epool-batch-1", "e2epool-batch-2"}},
		{"webjob", "web", 2, []string{"e2epool-web-1"}},
	} {
		if out, err := run(j.name, j.pool, j.count); err != nil {
			t.Fatalf("nomad job run %s: %v\n%s", j.name, err, out)
		}
		on := placed(j.name, j.count)
		for node := range on {
			if !slices.Contains(j.on, node) {
				t.Errorf("job %s (node_pool %q) has allocations on %s: %v", j.name, j.pool, node, on)
			}
		}
		t.Logf("job %s (node_pool %q): allocations by node %v", j.name, j.pool, on)
	}

	out, err = run("nopool", "nosuch", 1)
	if err == nil || !strings.Contains(out, `nonexistent node pool "nosuch"`) {
		t.Errorf("a job for node pool nosuch: %v, want Nomad to refuse it naming the pool:\n%s", err, out)
	}
	t.Logf("a job for node pool nosuch, refused: %s", strings.TrimSpace(out))
}
