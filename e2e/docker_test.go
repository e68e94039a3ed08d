package e2e

import (
	"archive/tar"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

// dockerJob is a 2-instance docker job of an image imported onto the
// clients (no registry): busybox's httpd on the client's own address
// (host networking on the local provider), registered in Consul with an
// HTTP check.
const dockerJob = `job "dweb" {
  datacenters = ["dc1"]
  group "dweb" {
    count = 2
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }
    network {
      port "http" {}
    }
    service {
      name     = "dweb"
      port     = "http"
      provider = "consul"
      check {
        type     = "http"
        path     = "/"
        interval = "1s"
        timeout  = "1s"
      }
    }
    task "httpd" {
      driver = "docker"
      config {
        image        = "steppe/busybox:1"
        network_mode = "host"
        command      = "/bin/busybox"
        args         = ["sh", "-c", "/bin/busybox mkdir -p /www && echo dweb > /www/index.html && exec /bin/busybox httpd -f -p ${NOMAD_ADDR_http} -h /www"]
      }
      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
`

// busyboxImage is a rootfs tarball of the machine's static busybox, for
// docker import.
func busyboxImage(t *testing.T) []byte {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Lacks(t, "no /bin/busybox (apt-get install busybox-static): %v", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range []string{"bin/", "tmp/", "www/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755}); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.WriteHeader(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bb))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(bb); err != nil {
		t.Fatal(err)
	}
	if err := tw.WriteHeader(&tar.Header{Name: "bin/sh", Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// docker runs the machine's docker CLI against a client's dockerd.
func (c *upCluster) docker(machine string, stdin io.Reader, args ...string) (string, error) {
	sock := cluster.DockerSocketPath(filepath.Join(c.state, "machines", machine, "state", "data"))
	cmd := exec.Command(cluster.DockerCLIPath, append([]string{"--host=unix://" + sock}, args...)...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Docker on the clients of the local provider: dockerd runs under each
// client's agent before Nomad, with its own data root, exec root and
// socket; an image imported onto each (no registry) runs as a 2-instance
// job on host networking, each instance answering on its client's address
// and passing its Consul HTTP check. The Nomad client under one instance
// is SIGKILLed: the container goes on running and answering, the agent
// starts the client again and it re-attaches (same allocation, same
// container, no new allocation).
func TestDocker(t *testing.T) {
	if _, err := os.Stat(cluster.DockerdPath); err != nil {
		testenv.Lacks(t, "no dockerd (apt-get install docker.io): %v", err)
	}
	image := busyboxImage(t)
	consul, nomad := daemonBinaries(t)
	body := "name = \"e2edkr\"\n\nservers {\n  count = 1\n}\n\npool \"default\" {\n  count = 2\n  drivers = [\"raw_exec\", \"docker\"]\n}\n\nvault {\n  enabled = false\n}\n"
	c := newSpecCluster(t, consul, nomad, body, "127.0.7", 81, 3)
	c.up()
	clients := []string{"e2edkr-default-1", "e2edkr-default-2"}
	for _, m := range clients {
		st, err := c.agentStatus(m)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range st.Services {
			if s.Name == "dockerd" {
				t.Logf("%s: dockerd %s since %v, ready %v", m, s.State, s.Since, s.Ready)
			}
		}
		start := time.Now()
		if out, err := c.docker(m, bytes.NewReader(image), "import", "-", "steppe/busybox:1"); err != nil {
			t.Fatalf("%s: docker import: %v\n%s", m, err, out)
		}
		t.Logf("%s: image imported in %v", m, time.Since(start))
	}

	env := c.envMap()
	nc := c.nomadClient(env)
	jobFile := filepath.Join(c.dir, "dweb.nomad.hcl")
	if err := os.WriteFile(jobFile, []byte(dockerJob), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.sh("nomad job run -detach " + jobFile); err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
	byNode := map[string]string{} // node name -> alloc id
	addrs := map[string]string{}  // alloc id -> address
	waitUntil(t, "2 running dweb allocations", 3*time.Minute, func() bool {
		allocs, _, err := nc.Jobs().Allocations("dweb", false, nil)
		if err != nil {
			return false
		}
		clear(byNode)
		clear(addrs)
		for _, a := range allocs {
			if a.ClientStatus != "running" {
				continue
			}
			full, _, err := nc.Allocations().Info(a.ID, nil)
			if err != nil || full.AllocatedResources == nil {
				return false
			}
			for _, p := range full.AllocatedResources.Shared.Ports {
				if p.Label == "http" {
					addrs[a.ID] = net.JoinHostPort(p.HostIP, strconv.Itoa(p.Value))
				}
			}
			byNode[a.NodeName] = a.ID
		}
		return len(byNode) == 2 && len(addrs) == 2
	})
	hc := &http.Client{Timeout: 3 * time.Second}
	get := func(addr string) error {
		resp, err := hc.Get("http://" + addr + "/")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != "dweb" {
			return fmt.Errorf("%s: %s %q", addr, resp.Status, b)
		}
		return nil
	}
	for _, m := range clients {
		id := byNode[m]
		if id == "" {
			t.Fatalf("no dweb allocation on %s: %v", m, byNode)
		}
		host, _, _ := net.SplitHostPort(addrs[id])
		if !slices.Contains(c.addrs, host) || host == c.addrs[0] {
			t.Errorf("allocation %s on %s listens on %s, not on a client's address", id, m, addrs[id])
		}
		waitUntil(t, "dweb at "+addrs[id]+" to answer", time.Minute, func() bool { return get(addrs[id]) == nil })
	}
	c.waitConsulPassing(env, "dweb", 2)

	// SIGKILL the Nomad client under one instance.
	victim := clients[0]
	alloc := byNode[victim]
	before, err := c.docker(victim, nil, "ps", "-q", "--no-trunc")
	if err != nil || strings.TrimSpace(before) == "" {
		t.Fatalf("%s: docker ps: %v %q", victim, err, before)
	}
	st, err := c.agentStatus(victim)
	if err != nil {
		t.Fatal(err)
	}
	pid, restarts := 0, 0
	for _, s := range st.Services {
		if s.Name == "nomad" {
			pid, restarts = s.PID, s.Restarts
		}
	}
	if pid == 0 {
		t.Fatalf("%s: no nomad pid in %+v", victim, st.Services)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	// The container does not notice.
	if err := get(addrs[alloc]); err != nil {
		t.Errorf("the container stopped answering once its Nomad client was killed: %v", err)
	}
	waitUntil(t, "the killed Nomad client running again", time.Minute, func() bool {
		st, err := c.agentStatus(victim)
		if err != nil {
			return false
		}
		for _, s := range st.Services {
			if s.Name == "nomad" {
				return s.Ready && s.PID != pid && s.Restarts > restarts
			}
		}
		return false
	})
	t.Logf("%s: Nomad client running again %v after its SIGKILL", victim, time.Since(killed))
	// Re-attached: the same allocation runs, on the same container, and
	// no allocation was added.
	waitUntil(t, "the node ready again", time.Minute, func() bool {
		nodes, _, err := nc.Nodes().List(nil)
		if err != nil {
			return false
		}
		for _, n := range nodes {
			if n.Name == victim {
				return n.Status == "ready"
			}
		}
		return false
	})
	time.Sleep(3 * time.Second) // time for a client that lost its tasks to say so
	allocs, _, err := nc.Jobs().Allocations("dweb", true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(allocs) != 2 {
		t.Errorf("%d dweb allocations after the client's SIGKILL, want the same 2: %+v", len(allocs), allocList(allocs))
	}
	for _, a := range allocs {
		if a.ID == alloc && a.ClientStatus != "running" {
			t.Errorf("allocation %s is %s after its client's restart", a.ID, a.ClientStatus)
		}
	}
	after, err := c.docker(victim, nil, "ps", "-q", "--no-trunc")
	if err != nil || strings.TrimSpace(after) != strings.TrimSpace(before) {
		t.Errorf("%s: containers before the kill %q, after %q (%v)", victim, before, after, err)
	}
	if err := get(addrs[alloc]); err != nil {
		t.Errorf("after the client's restart: %v", err)
	}
	c.waitConsulPassing(env, "dweb", 2)

	// down leaves nothing of Docker: no process (containers, shims,
	// dockerd), no mount (dockerd's nsfs and data root), no exec root.
	if out, err := c.steppe(5*time.Minute, "down", "-state", c.state); err != nil {
		t.Fatalf("steppe down: %v\n%s", err, out)
	}
	c.downDone = true
	ms, err := supervise.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if strings.HasPrefix(m.Point, c.dir+"/") || strings.HasPrefix(m.Point, cluster.DockerExecRoot+"/e2edkr-") {
			t.Errorf("left mounted after down: %s (%s)", m.Point, m.FSType)
		}
	}
	for _, m := range clients {
		if _, err := os.Stat(filepath.Join(cluster.DockerExecRoot, m)); err == nil {
			t.Errorf("%s: dockerd's exec root is left after down", m)
		}
		if left := c.leftovers(m); len(left) > 0 {
			t.Errorf("%s: left after down: %q", m, left)
		}
	}
	if out, _ := exec.Command("pgrep", "-f", "steppe/busybox|httpd -f -p 127.0.7.8").CombinedOutput(); strings.TrimSpace(string(out)) != "" {
		t.Errorf("container processes left after down: %s", out)
	}
}

func allocList(as []*nomadapi.AllocationListStub) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.ID[:8]+"@"+a.NodeName+":"+a.ClientStatus)
	}
	return out
}

// waitConsulPassing waits for n passing instances of service in Consul.
func (c *upCluster) waitConsulPassing(env map[string]string, service string, n int) {
	c.t.Helper()
	ca, err := os.ReadFile(env["CONSUL_CACERT"])
	if err != nil {
		c.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	waitUntil(c.t, fmt.Sprintf("%d passing %s instances in Consul", n, service), 2*time.Minute, func() bool {
		req, _ := http.NewRequest(http.MethodGet, env["CONSUL_HTTP_ADDR"]+"/v1/health/service/"+service+"?passing=true", nil)
		req.Header.Set("X-Consul-Token", env["CONSUL_HTTP_TOKEN"])
		resp, err := hc.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var entries []json.RawMessage
		if json.NewDecoder(resp.Body).Decode(&entries) != nil {
			return false
		}
		return len(entries) == n
	})
}
