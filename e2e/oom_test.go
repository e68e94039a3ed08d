package e2e

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/deploy"
)

// A daemon of a real cluster killed by the kernel's OOM killer, seen
// through steppe status: a 1+1 cluster is up; the server's Consul gets a
// memory limit just above what it uses (the spec's servers memory, a
// second up restarts it under it); KV writes of large values make it
// grow (Consul keeps the last 512 raft entries in memory) until the
// kernel kills it. steppe status lists it as killed by the OOM killer,
// and its agent has started it again.
func TestOOMThroughStatus(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	body := "name = \"e2eoom\"\n\nservers {\n  count = 1\n}\n\npool \"default\" {\n  count = 1\n}\n\nvault {\n  enabled = false\n}\n"
	c := newSpecCluster(t, consul, nomad, body, "127.0.6", 61, 2)
	c.up()
	st, err := c.statusJSON()
	if err != nil {
		t.Fatal(err)
	}
	server, pid := serviceOf(t, st, "server", "consul")
	rss := int64(vmRSS(t, pid))
	limit := (rss + 48<<20) >> 20 // MiB: room to start, not for 512 large raft entries
	t.Logf("server %s: consul (pid %d) uses %d MiB; limit %d MiB", server, pid, rss>>20, limit)
	spec := strings.Replace(body, "  count = 1\n}\n\npool", fmt.Sprintf("  count = 1\n  memory = { consul = \"%dMiB\" }\n}\n\npool", limit), 1)
	spec = fmt.Sprintf("%s\nprovider \"local\" {\n  first_address = %q\n}\n", spec, c.addrs[0])
	if err := os.WriteFile(c.spec, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	c.up()

	env := c.envMap()
	ca, err := os.ReadFile(env["CONSUL_CACERT"])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	value := bytes.Repeat([]byte("x"), 400<<10)
	deadline := time.Now().Add(3 * time.Minute)
	var oom *deploy.ServiceStatus
	for i := 0; time.Now().Before(deadline); i++ {
		req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("%s/v1/kv/hog/%d", env["CONSUL_HTTP_ADDR"], i%2000), bytes.NewReader(value))
		req.Header.Set("X-Consul-Token", env["CONSUL_HTTP_TOKEN"])
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
		}
		if i%20 != 0 {
			continue
		}
		if st, err = c.statusJSON(); err != nil {
			continue
		}
		if s := findService(st, server, "consul"); s != nil && s.OOMKills > 0 {
			oom = s
			t.Logf("after %d writes of 400 KiB: %+v", i+1, *s)
			break
		}
	}
	if oom == nil {
		t.Fatalf("the server's Consul was not killed by the OOM killer within 3 minutes of KV writes; status: %+v", st)
	}
	if oom.LastExit != "oom" {
		t.Errorf("consul's last exit %q, want oom", oom.LastExit)
	}
	// The agent starts it again; status names the kill as a problem.
	deadline = time.Now().Add(2 * time.Minute)
	for {
		st, err = c.statusJSON()
		if err == nil {
			if s := findService(st, server, "consul"); s != nil && s.Ready && s.State == "running" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("consul on %s not running again 2 minutes after its OOM kill: %v %+v", server, err, st)
		}
		time.Sleep(time.Second)
	}
	found := false
	for _, p := range st.Problems {
		if strings.Contains(p, server+"/consul was killed by the OOM killer") {
			found = true
		}
	}
	if !found {
		t.Errorf("steppe status does not list the OOM kill of %s/consul; problems: %q", server, st.Problems)
	}
}

func findService(st *deploy.Status, machine, name string) *deploy.ServiceStatus {
	for _, a := range st.Agents {
		if a.Machine != machine {
			continue
		}
		for i := range a.Services {
			if a.Services[i].Name == name {
				return &a.Services[i]
			}
		}
	}
	return nil
}

// serviceOf is the machine and pid of service on the first machine of role.
func serviceOf(t *testing.T, st *deploy.Status, role, service string) (string, int) {
	t.Helper()
	for _, a := range st.Agents {
		if a.Role != role {
			continue
		}
		if s := findService(st, a.Machine, service); s != nil && s.PID > 0 {
			return a.Machine, s.PID
		}
	}
	t.Fatalf("no %s with a running %s in %+v", role, service, st)
	return "", 0
}
