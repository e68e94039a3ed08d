package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

// upCluster is one cluster made by the real `steppe up` in a test.
type upCluster struct {
	t        testing.TB
	bin      string
	dir      string
	spec     string
	state    string
	addrs    []string
	consul   string // binaries of the real CLIs
	nomad    string
	downDone bool
	// onUpgradeLine, if set, sees each line runUpgrade's steppe prints,
	// as it prints it.
	onUpgradeLine func(string)
}

// daemonBinaries finds the default versions in the artifact cache: a
// skip with the reason outside CI, a failure in CI.
func daemonBinaries(t testing.TB) (consul, nomad string) {
	t.Helper()
	bins := cachedBinaries(t, "the default daemon versions are not built (make artifacts)",
		"consul@"+cluster.DefaultConsulVersion, "nomad@"+cluster.DefaultNomadVersion)
	return bins[0], bins[1]
}

// cachedBinaries finds PRODUCT@VERSION binaries in the artifact cache, in
// order. The tests need root (agents use cgroups) and the binaries: a
// skip with the reason outside CI, a failure in CI.
func cachedBinaries(t testing.TB, missing string, want ...string) []string {
	t.Helper()
	testenv.NeedRoot(t, "steppe up (its agents' cgroups)")
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	var errs []error
	for _, pv := range want {
		product, version, _ := strings.Cut(pv, "@")
		p, err := artifact.BinaryPath(cache, product, version)
		errs = append(errs, err)
		paths = append(paths, p)
	}
	if err := errors.Join(errs...); err != nil {
		testenv.Lacks(t, "%s: %v", missing, err)
	}
	return paths
}

// newUpCluster writes a spec for a cluster of 3 servers and 2 clients on
// the loopback addresses 127.0.1.first..first+4 (127.0.0.x are taken by
// other packages' tests that may run at the same time), with its state in a temp dir.
func newUpCluster(t testing.TB, name string, first int) *upCluster {
	t.Helper()
	consul, nomad := daemonBinaries(t)
	return newSpecCluster(t, consul, nomad, fmt.Sprintf("name = %q\n", name), "127.0.1", first, 5)
}

// newSpecCluster is a cluster of the spec body (without its provider
// block) on n addresses from prefix.first; steppe down removes it at the
// end of the test.
func newSpecCluster(t testing.TB, consul, nomad, body, prefix string, first, n int) *upCluster {
	t.Helper()
	c := &upCluster{t: t, bin: steppeBinary(t), dir: t.TempDir(), consul: consul, nomad: nomad}
	c.spec = filepath.Join(c.dir, "cluster.hcl")
	c.state = filepath.Join(c.dir, "state")
	for i := range n {
		c.addrs = append(c.addrs, fmt.Sprintf("%s.%d", prefix, first+i))
	}
	spec := fmt.Sprintf("%s\nprovider \"local\" {\n  first_address = %q\n}\n", body, c.addrs[0])
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
	return c
}

// steppe runs the real binary with a clean environment.
func (c *upCluster) steppe(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = c.baseEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *upCluster) baseEnv() []string {
	// No nomad or consul on PATH: `steppe env` must bring the cluster's own.
	env := []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + c.dir}
	if v := os.Getenv("STEPPE_CACHE"); v != "" {
		env = append(env, "STEPPE_CACHE="+v)
	} else if home, err := os.UserHomeDir(); err == nil {
		env = append(env, "STEPPE_CACHE="+filepath.Join(home, ".cache", "steppe"))
	}
	return env
}

func (c *upCluster) up() (string, time.Duration) {
	c.t.Helper()
	start := time.Now()
	out, err := c.steppe(15*time.Minute, "up", "-spec", c.spec, "-state", c.state)
	took := time.Since(start)
	if err != nil {
		c.t.Fatalf("steppe up: %v\n%s", err, out)
	}
	return out, took
}

// sh runs a shell script whose only configuration of the real CLIs is
// `eval "$(steppe env)"`.
func (c *upCluster) sh(script string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	full := fmt.Sprintf("set -e\neval \"$(%s env -state %s)\"\n%s", c.bin, c.state, script)
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", full)
	cmd.Env = c.baseEnv()
	cmd.Dir = c.dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// envMap is what `steppe env` exports.
func (c *upCluster) envMap() map[string]string {
	c.t.Helper()
	out, err := c.sh(`env | grep -E '^(NOMAD|CONSUL|VAULT)_'`)
	if err != nil {
		c.t.Fatalf("steppe env: %v\n%s", err, out)
	}
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, _ := strings.Cut(l, "=")
		m[k] = v
	}
	return m
}

// runStatus runs `steppe status -json`: the status, the command's exit
// error (it fails when the cluster is not healthy), its stderr, and an
// error when its output is not a status.
func (c *upCluster) runStatus() (deploy.Status, error, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, "status", "-json", "-state", c.state)
	cmd.Env = c.baseEnv()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var st deploy.Status
	if jerr := json.Unmarshal(out, &st); jerr != nil {
		return st, err, stderr.String(), fmt.Errorf("steppe status -json: %v %v\n%s%s", err, jerr, out, stderr.String())
	}
	return st, err, stderr.String(), nil
}

func (c *upCluster) status() deploy.Status {
	c.t.Helper()
	st, err, stderr, jerr := c.runStatus()
	if jerr != nil {
		c.t.Fatal(jerr)
	}
	if (err != nil) == st.Healthy {
		c.t.Errorf("steppe status: exit %v with healthy=%v: %s", err, st.Healthy, stderr)
	}
	if !st.Healthy {
		c.t.Logf("status problems: %q", st.Problems)
	}
	return st
}

// TestUpStatusEnvDown is one cluster, for several checks (the CI budget
// has room for one): up; the real CLIs through steppe env; a raw_exec
// HTTP job registered in Consul; what must be refused; a second up that
// changes nothing; status; no secret outside where it belongs; down that
// leaves nothing behind.
func TestUpStatusEnvDown(t *testing.T) {
	c := newUpCluster(t, "e2eup", 11)
	metadata := startMetadataTrap(t)
	out, took := c.up()
	t.Logf("steppe up took %v:\n%s", took.Round(time.Millisecond), out)
	for _, want := range []string{"==> agents healthy", "==> consul ACLs", "==> nomad ACLs", "==> workload identity", "is up in", `eval "$(steppe env`, "/ui/\n", "trust the cluster CA"} {
		if !strings.Contains(out, want) {
			t.Errorf("up output lacks %q", want)
		}
	}

	// The real CLIs, configured only by steppe env.
	cli, err := c.sh("consul members; echo ---; nomad server members; echo ---; nomad node status")
	if err != nil {
		t.Fatalf("CLIs through steppe env: %v\n%s", err, cli)
	}
	parts := strings.Split(cli, "---")
	if len(parts) != 3 {
		t.Fatalf("CLI output:\n%s", cli)
	}
	if n := strings.Count(parts[0], " alive "); n != 5 {
		t.Errorf("consul members: %d alive, want 5:\n%s", n, parts[0])
	}
	if a, l := strings.Count(parts[1], " alive "), strings.Count(parts[1], " true "); a != 3 || l != 1 {
		t.Errorf("nomad server members: %d alive, %d leaders; want 3 and 1:\n%s", a, l, parts[1])
	}
	if n := strings.Count(parts[2], " ready"); n != 2 {
		t.Errorf("nomad node status: %d ready, want 2:\n%s", n, parts[2])
	}

	env := c.envMap()
	c.checkRefusals(env)
	allocs := c.runWebJob(env)
	c.checkUIs(env)
	c.checkDNS()
	c.checkKeyRotation()

	// status: 3 servers, one leader, 2 clients, every agent on release 1.
	st := c.status()
	if !st.Healthy || len(st.Servers) != 3 || st.Raft == nil || st.Raft.Leader == "" || len(st.Clients) != 2 || len(st.Agents) != 5 || len(st.Consul) != 5 {
		t.Errorf("status: %+v", st)
	}
	pids := map[string]int{}
	for _, a := range st.Agents {
		// Every machine runs Consul, Nomad and its resolver; servers Vault.
		want := []string{"consul", "coredns", "nomad"}
		if strings.Contains(a.Machine, "-server-") {
			want = append(want, "vault")
		}
		var have []string
		for _, s := range a.Services {
			have = append(have, s.Name)
		}
		slices.Sort(have)
		if a.Release != 1 || !a.Running || !slices.Equal(have, want) {
			t.Errorf("agent %+v: services %v, want %v", a, have, want)
		}
		pids[a.Machine] = a.PID
		for _, s := range a.Services {
			pids[a.Machine+"/"+s.Name] = s.PID
		}
	}
	text, err := c.steppe(time.Minute, "status", "-state", c.state)
	if err != nil || !strings.Contains(text, "healthy") || !strings.Contains(text, "leader") {
		t.Errorf("steppe status: %v\n%s", err, text)
	}
	t.Logf("steppe status:\n%s", text)

	// A second up changes nothing: same agents, same daemons, no bundle.
	out2, took2 := c.up()
	if strings.Contains(out2, "(started)") || strings.Contains(out2, "published (signed)") || !strings.Contains(out2, "version 1 unchanged") {
		t.Errorf("second up started or published something:\n%s", out2)
	}
	for _, a := range c.status().Agents {
		if pids[a.Machine] != a.PID {
			t.Errorf("second up: agent of %s pid %d -> %d", a.Machine, pids[a.Machine], a.PID)
		}
		for _, s := range a.Services {
			if pids[a.Machine+"/"+s.Name] != s.PID {
				t.Errorf("second up: %s/%s pid %d -> %d", a.Machine, s.Name, pids[a.Machine+"/"+s.Name], s.PID)
			}
		}
	}
	t.Logf("second up (nothing to do) took %v", took2.Round(time.Millisecond))

	// An agent killed outright: its daemons run on in their cgroups; up
	// starts the agent again, which adopts them (same daemon pids).
	victim := "e2eup-default-1"
	if err := syscall.Kill(pids[victim], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the killed agent to be gone", 30*time.Second, func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pids[victim]))
		return err != nil || strings.Contains(string(b), ") Z ")
	})
	out3, _ := c.up()
	if !strings.Contains(out3, "(started)") || strings.Count(out3, "(started)") != 1 {
		t.Errorf("up after an agent died should start exactly that agent:\n%s", out3)
	}
	st3 := c.status()
	if !st3.Healthy {
		t.Errorf("status after the agent restart: %q", st3.Problems)
	}
	for _, a := range st3.Agents {
		if a.Machine == victim && a.PID == pids[victim] {
			t.Errorf("%s: agent pid unchanged after it was killed", victim)
		}
		for _, s := range a.Services {
			if pids[a.Machine+"/"+s.Name] != s.PID {
				t.Errorf("after the agent restart: %s/%s pid %d -> %d (not adopted)", a.Machine, s.Name, pids[a.Machine+"/"+s.Name], s.PID)
			}
		}
	}

	c.scanSecrets()
	c.checkNoCallsOut()
	if n := metadata.Load(); n != 0 {
		t.Errorf("the cluster's daemons sent %d requests to the cloud metadata address", n)
	} else {
		t.Logf("no daemon asked the metadata address 169.254.169.254 for anything")
	}

	// down: no process, cgroup, mount, socket or file of the cluster left.
	outDown, err := c.steppe(5*time.Minute, "down", "-state", c.state)
	if err != nil {
		t.Fatalf("steppe down: %v\n%s", err, outDown)
	}
	c.downDone = true
	t.Logf("steppe down:\n%s", outDown)
	c.checkNothingLeft(allocs)
	if out, err := c.steppe(time.Minute, "down", "-state", c.state); err != nil || !strings.Contains(out, "nothing to do") {
		t.Errorf("a second down: %v\n%s", err, out)
	}
}

// A machine that does not become healthy in time fails up with the
// machine's name, the failing check and its last log lines.
func TestUpMachineTimeout(t *testing.T) {
	c := newUpCluster(t, "e2eslow", 31)
	out, err := c.steppe(5*time.Minute, "up", "-spec", c.spec, "-state", c.state, "-machine-timeout", "300ms")
	if err == nil {
		t.Fatalf("up succeeded with a 300ms machine timeout:\n%s", out)
	}
	for _, want := range []string{"agents healthy: machine e2eslow-", "did not become healthy", "agent log", "last lines"} {
		if !strings.Contains(out, want) {
			t.Errorf("the error lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "not ready") && !strings.Contains(out, "runs release 0") {
		t.Errorf("the error does not name the failing check:\n%s", out)
	}
	if i := strings.Index(out, "steppe: agents healthy"); i >= 0 {
		out = out[i:]
	}
	t.Logf("refused:\n%.3000s", out)
}

// checkRefusals: no token, plaintext HTTP, and a client certificate from
// another CA are all refused.
func (c *upCluster) checkRefusals(env map[string]string) {
	t := c.t
	out, err := c.sh("unset NOMAD_TOKEN; nomad node status")
	if err == nil || !strings.Contains(out, "403") {
		t.Errorf("nomad without a token: %v, want 403:\n%s", err, out)
	}
	// Consul filters what a request without a token may not see, and
	// refuses writes.
	out, err = c.sh("unset CONSUL_HTTP_TOKEN; consul kv put steppe-e2e x")
	if err == nil || !strings.Contains(out, "403") {
		t.Errorf("consul write without a token: %v, want 403:\n%s", err, out)
	}
	// The anonymous token reads the catalog (Consul 1.14's DNS answers
	// through it) and nothing else: no KV, no ACLs, no agent endpoints.
	out, err = c.sh("unset CONSUL_HTTP_TOKEN; consul catalog nodes")
	if err != nil || !strings.Contains(out, "e2eup-server-1") {
		t.Errorf("consul without a token cannot read the catalog that DNS answers from: %v\n%s", err, out)
	}
	if out, err := c.sh("consul kv put steppe-e2e/secret s3cr3t-value"); err != nil {
		t.Fatalf("consul kv put with the management token: %v\n%s", err, out)
	}
	for _, cmd := range []string{"consul kv get steppe-e2e/secret", "consul acl token list"} {
		if out, err := c.sh("unset CONSUL_HTTP_TOKEN; " + cmd); err == nil || strings.Contains(out, "s3cr3t-value") {
			t.Errorf("%s without a token: %v, want a refusal:\n%s", cmd, err, out)
		}
	}
	hc := &http.Client{Timeout: 5 * time.Second}
	for _, u := range []string{"http://" + c.addrs[0] + ":4646/v1/agent/self", "http://" + c.addrs[0] + ":8500/v1/agent/self", "http://" + c.addrs[0] + ":8501/v1/agent/self"} {
		resp, err := hc.Get(u)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Errorf("plaintext %s answered 200", u)
			}
		}
	}
	other, err := cluster.OpenState(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	oc, err := other.OperatorCert()
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := tls.LoadX509KeyPair(oc.CertFile, oc.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(env["NOMAD_CACERT"])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	// The HTTPS APIs ask for no client certificate (a browser opens the
	// UIs; a token authorises); RPC keeps mutual TLS: a certificate of
	// another CA is refused there. The first byte asks for TLS (Consul's
	// pool.RPCTLS, Nomad's pool.RpcTLS).
	for port, rpcTLS := range map[int]byte{cluster.ConsulRPCPort: 0x03, cluster.NomadRPCPort: 0x04} {
		addr := net.JoinHostPort(c.addrs[0], strconv.Itoa(port))
		raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		raw.Write([]byte{rpcTLS})
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		conn := tls.Client(raw, &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{foreign}, ServerName: c.addrs[0]})
		if err = conn.Handshake(); err == nil {
			// TLS 1.3 reports a refused client certificate on the first read.
			_, err = conn.Read(make([]byte, 16))
		}
		raw.Close()
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s accepted a client certificate from another CA (%v)", addr, err)
		}
	}
}

const webJob = `job "web" {
  datacenters = ["dc1"]
  type        = "service"
  group "web" {
    count = 2
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }
    network {
      port "http" {}
    }
    service {
      name     = "web"
      port     = "http"
      provider = "consul"
    }
    task "serve" {
      driver = "raw_exec"
      config {
        command = %q
        args    = ["artifact", "serve", "${NOMAD_TASK_DIR}", "-addr", "${NOMAD_ADDR_http}"]
      }
      resources {
        cpu    = 50
        memory = 64
      }
    }
  }
}
`

// runWebJob runs a raw_exec HTTP service with 2 allocations, one per
// client, through the real nomad CLI and checks they run, answer on their
// own clients' addresses and are registered in Consul. It returns the allocation ids.
func (c *upCluster) runWebJob(env map[string]string) []string {
	t := c.t
	job := filepath.Join(c.dir, "web.nomad.hcl")
	if err := os.WriteFile(job, []byte(fmt.Sprintf(webJob, c.bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := c.sh("nomad job run -detach " + job)
	if err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
	cfg := nomadapi.DefaultConfig()
	cfg.Address, cfg.SecretID = env["NOMAD_ADDR"], env["NOMAD_TOKEN"]
	cfg.TLSConfig = &nomadapi.TLSConfig{CACert: env["NOMAD_CACERT"], ClientCert: env["NOMAD_CLIENT_CERT"], ClientKey: env["NOMAD_CLIENT_KEY"]}
	nc, err := nomadapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var ids, addrs []string
	waitUntil(t, "2 running web allocations", 3*time.Minute, func() bool {
		allocs, _, err := nc.Jobs().Allocations("web", false, nil)
		if err != nil {
			return false
		}
		ids, addrs = nil, nil
		for _, a := range allocs {
			if a.ClientStatus != "running" {
				continue
			}
			full, _, err := nc.Allocations().Info(a.ID, nil)
			if err != nil || full.AllocatedResources == nil {
				return false
			}
			node, _, err := nc.Nodes().Info(full.NodeID, nil)
			if err != nil {
				return false
			}
			nodeIP, _, _ := net.SplitHostPort(node.HTTPAddr)
			for _, p := range full.AllocatedResources.Shared.Ports {
				if p.Label != "http" {
					continue
				}
				// Each allocation answers on its own client's address,
				// not on the 127.0.0.1 every local machine shares.
				if p.HostIP != nodeIP {
					t.Fatalf("allocation %s on %s listens on %s, not on its client's address %s", a.ID, node.Name, p.HostIP, nodeIP)
				}
				addrs = append(addrs, net.JoinHostPort(p.HostIP, strconv.Itoa(p.Value)))
			}
			ids = append(ids, a.ID)
		}
		return len(ids) == 2 && len(addrs) == 2
	})
	if h0, _, _ := net.SplitHostPort(addrs[0]); strings.HasPrefix(addrs[1], h0+":") {
		t.Fatalf("both allocations listen on %s", h0)
	}
	hc := &http.Client{Timeout: 5 * time.Second}
	for _, a := range addrs {
		waitUntil(t, "allocation at "+a+" to answer", time.Minute, func() bool {
			resp, err := hc.Get("http://" + a + "/")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode < 500
		})
	}
	var svc string
	waitUntil(t, "2 web instances in Consul", 2*time.Minute, func() bool {
		out, err := c.sh("consul catalog nodes -service web")
		svc = out
		return err == nil && strings.Count(out, "\n") == 3 // header + 2 nodes
	})
	t.Logf("web allocations %v at %v; in Consul:\n%s", ids, addrs, svc)
	return ids
}

// scanSecrets checks where every secret is: the operator's state files,
// each machine's secrets directory, and the daemons' own data (Consul's
// and Nomad's keyrings and raft logs hold them by design). Bundles (in the
// store and unpacked on machines), rendered configs, agent configs,
// plans and logs must hold none.
func (c *upCluster) scanSecrets() {
	t := c.t
	st, err := cluster.OpenState(c.state)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{
		"consul gossip key": st.ConsulGossipKey().Reveal(),
		"nomad gossip key":  st.NomadGossipKey().Reveal(),
	}
	for _, n := range st.TokenNames() {
		s, _ := st.LookupToken(n)
		secrets["token "+n] = s.Reveal()
	}
	if v, err := st.VaultInit(); err != nil {
		t.Fatal(err)
	} else if v != nil {
		secrets["vault root token"] = v.RootToken.Reveal()
		for i, k := range v.Keys {
			secrets[fmt.Sprintf("vault key share %d", i)] = k.Reveal()
		}
	}
	if len(secrets) < 12 {
		t.Fatalf("only %d secrets to look for", len(secrets))
	}
	allowed := func(rel string) bool {
		switch {
		case slices.Contains([]string{"ca-key.pem", "consul-gossip.key", "nomad-gossip.key", "tokens.json", "bundle-signing.key", "operator/key.pem", "vault/init.json"}, rel):
			return true
		case strings.HasPrefix(rel, "nodes/") && strings.HasSuffix(rel, "/key.pem"):
			return true
		}
		parts := strings.Split(rel, "/")
		// machines/<name>/state/secrets/* and machines/<name>/state/data/**
		return len(parts) >= 5 && parts[0] == "machines" && parts[2] == "state" && (parts[3] == "secrets" || parts[3] == "data")
	}
	check := func(where string, b []byte) {
		if bytes.Contains(b, []byte("PRIVATE KEY")) {
			t.Errorf("%s holds a private key", where)
		}
		for what, s := range secrets {
			if bytes.Contains(b, []byte(s)) {
				t.Errorf("%s holds the %s", where, what)
			}
		}
	}
	self, err := os.ReadFile(c.bin)
	if err != nil {
		t.Fatal(err)
	}
	scanned, bundles := 0, 0
	err = filepath.WalkDir(c.state, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(c.state, p)
		if d.IsDir() {
			if rel == "artifacts" {
				return filepath.SkipDir // verified binaries, by digest
			}
			parts := strings.Split(rel, "/")
			if len(parts) == 4 && parts[0] == "machines" && parts[3] == "secrets" {
				fi, _ := d.Info()
				if fi.Mode().Perm() != 0o700 {
					t.Errorf("%s has mode %04o, want 0700", rel, fi.Mode().Perm())
				}
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, _ := d.Info()
		if allowed(rel) {
			if fi.Mode().Perm()&0o077 != 0 && !strings.Contains(rel, "/data/") {
				t.Errorf("secret file %s has mode %04o", rel, fi.Mode().Perm())
			}
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if parts := strings.Split(rel, "/"); len(parts) == 3 && parts[0] == "machines" && parts[2] == "steppe" {
			// The machine's own copy of steppe (its agent's binary): the
			// operator's binary, byte for byte; its crypto code names
			// PEM headers.
			if !bytes.Equal(b, self) {
				t.Errorf("%s is not a copy of the steppe binary %s", rel, c.bin)
			}
			return nil
		}
		scanned++
		check(rel, b)
		if strings.HasSuffix(p, ".tar.gz") {
			bundles++
			zr, err := gzip.NewReader(bytes.NewReader(b))
			if err != nil {
				t.Errorf("%s: %v", rel, err)
				return nil
			}
			tr := tar.NewReader(zr)
			for {
				h, err := tr.Next()
				if err != nil {
					break
				}
				body, _ := io.ReadAll(tr)
				check(rel+":"+h.Name, body)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if bundles < 2 {
		t.Errorf("scanned %d bundles, want at least the 2 roles'", bundles)
	}
	if fi, err := os.Stat(c.state); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v %v, want mode 0700", fi.Mode(), err)
	}
	t.Logf("secret scan: %d files (%d bundles) clean of %d secrets and any private key", scanned, bundles, len(secrets))
}

// checkUIs loads both web UIs as a browser that trusts the cluster's CA
// and has no client certificate would: both answer 200 with their pages.
func (c *upCluster) checkUIs(env map[string]string) {
	t := c.t
	ca, err := os.ReadFile(env["NOMAD_CACERT"])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	for _, u := range []string{fmt.Sprintf("https://%s:%d/ui/", c.addrs[0], cluster.NomadHTTPPort), fmt.Sprintf("https://%s:%d/ui/", c.addrs[0], cluster.ConsulHTTPSPort)} {
		resp, err := hc.Get(u)
		if err != nil {
			t.Errorf("UI %s without a client certificate: %v", u, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(strings.ToLower(string(body)), "<html") {
			t.Errorf("UI %s: %d, %.200q", u, resp.StatusCode, body)
		}
	}
}

// checkDNS asks every machine's Consul DNS, with the real dig, for the web
// job's 2 passing instances (A and SRV) and for a service that does not
// exist (NXDOMAIN). With ACLs default-deny, Consul 1.14 answers NXDOMAIN
// for everything unless the anonymous token may read services and nodes.
func (c *upCluster) checkDNS() {
	t := c.t
	dig, err := exec.LookPath("dig")
	if err != nil {
		testenv.Lacks(t, "dig is not installed (apt-get install dnsutils)")
	}
	for _, addr := range c.addrs {
		q := func(args ...string) string {
			out, err := exec.Command(dig, append([]string{"@" + addr, "-p", strconv.Itoa(cluster.ConsulDNSPort), "+time=2", "+tries=2"}, args...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("dig %v at %s: %v\n%s", args, addr, err, out)
			}
			return string(out)
		}
		var a, srv []string
		waitUntil(t, "2 web instances in DNS at "+addr, time.Minute, func() bool {
			a = strings.Fields(q("+short", "web.service.consul", "A"))
			srv = strings.Split(strings.TrimSpace(q("+short", "web.service.consul", "SRV")), "\n")
			return len(a) == 2 && len(srv) == 2
		})
		if a[0] == a[1] {
			t.Errorf("DNS at %s: both instances at %s", addr, a[0])
		}
		for _, line := range srv {
			if f := strings.Fields(line); len(f) != 4 || f[2] == "0" {
				t.Errorf("DNS at %s: SRV record %q has no port", addr, line)
			}
		}
		if out := q("nosuch.service.consul", "A"); !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("DNS at %s: a service that does not exist:\n%s", addr, out)
		}
	}
	t.Logf("DNS: every machine answers web.service.consul with 2 A and 2 SRV records, NXDOMAIN for others")
}

// rotJob is a job registered in Consul after Nomad rotated its keys.
const rotJob = `job "rot" {
  datacenters = ["dc1"]
  group "g" {
    service {
      name     = "rot"
      provider = "consul"
    }
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

// checkKeyRotation rotates Nomad's root key at once, as after a leak: a
// new allocation's workload identity is signed with a key Consul has never
// fetched. After the `up` that follows such a rotation (which points
// Consul's auth method at the new key set) a new allocation gets its Consul
// token. A scheduled rotation needs no `up`: Nomad publishes the next key
// in its JWKS before it signs with it, within Consul's cache time.
func (c *upCluster) checkKeyRotation() {
	t := c.t
	if out, err := c.sh("nomad operator root keyring rotate -now"); err != nil {
		t.Fatalf("nomad operator root keyring rotate: %v\n%s", err, out)
	}
	if out, _ := c.up(); !strings.Contains(out, "==> workload identity") {
		t.Fatalf("up after the rotation:\n%s", out)
	}
	job := filepath.Join(c.dir, "rot.nomad.hcl")
	if err := os.WriteFile(job, []byte(rotJob), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.sh("nomad job run -detach " + job); err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := c.sh("consul catalog services")
		if err == nil && strings.Contains(out, "rot\n") {
			break
		}
		if time.Now().After(deadline) {
			status, _ := c.sh("nomad job status -evals rot; nomad alloc status $(nomad job allocs -t '{{(index . 0).ID}}' rot)")
			t.Fatalf("after a Nomad key rotation, the rot service is not in Consul:\n%s\n%s", out, status)
		}
		time.Sleep(time.Second)
	}
	if out, err := c.sh("nomad job stop -purge rot"); err != nil {
		t.Errorf("nomad job stop: %v\n%s", err, out)
	}
	t.Logf("after nomad operator root keyring rotate, a new allocation registered in Consul")
}

// startMetadataTrap answers on the cloud metadata address,
// 169.254.169.254:80, and counts the requests: a Nomad client whose cloud
// fingerprinters are not denied asks it at every start. The address is put
// on an interface of the test's own network namespace, so it needs
// the isolation of scripts/offline (only loopback): on a machine's real
// network that address belongs to its cloud.
func startMetadataTrap(t *testing.T) *atomic.Int64 {
	t.Helper()
	// The test's namespace must not be the machine's own: other packages'
	// tests, run in the same scripts/offline namespace, add bridges and
	// taps of their own to it, so its interfaces say nothing.
	// (PID 1's namespace may be unreadable, in a container: then the
	// missing default route alone says it.)
	own, _ := os.Readlink("/proc/self/ns/net")
	if host, err := os.Readlink("/proc/1/ns/net"); err == nil && own == host {
		testenv.Lacks(t, "the metadata trap needs a network namespace of its own (run the tests through scripts/offline, as make test does); this is the machine's")
	}
	if routes, err := exec.Command("ip", "route", "show", "default").Output(); err != nil || strings.TrimSpace(string(routes)) != "" {
		testenv.Lacks(t, "the metadata trap needs a namespace with no default route; this one has %q (%v)", routes, err)
	}
	const link = "steppe-md0"
	// A veth pair: this kernel has no dummy interfaces.
	if out, err := exec.Command("ip", "link", "add", link, "type", "veth", "peer", "name", link+"p").CombinedOutput(); err != nil {
		t.Fatalf("ip link add: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", link).Run() })
	for _, args := range [][]string{{"addr", "add", "169.254.169.254/32", "dev", link}, {"link", "set", link + "p", "up"}, {"link", "set", link, "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	ln, err := net.Listen("tcp", "169.254.169.254:80")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		t.Logf("metadata trap: %s %s from %s", r.Method, r.URL, r.RemoteAddr)
		http.Error(w, "steppe test: not a cloud", http.StatusForbidden)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return &n
}

// checkNoCallsOut reads every daemon's and agent's log of the cluster: none
// may mention a cloud metadata service or HashiCorp's checkpoint service
// (DESIGN: decision 11). Nomad's env_aws fingerprinter, for one, logs
// "falling back to IMDSv1" or "EC2 IMDS" when it is not denied.
func (c *upCluster) checkNoCallsOut() {
	t := c.t
	marks := []string{"imds", "metadata service", "metadata.google", "169.254.169.254", "checkpoint", "env_aws", "env_gce", "env_azure", "env_digitalocean"}
	logs := 0
	err := filepath.WalkDir(c.state, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		base := d.Name()
		if base != "log" && !strings.HasPrefix(base, "log.") && !strings.HasSuffix(base, ".log") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		logs++
		rel, _ := filepath.Rel(c.state, p)
		for line := range strings.Lines(string(b)) {
			low := strings.ToLower(line)
			for _, m := range marks {
				if strings.Contains(low, m) {
					t.Errorf("%s mentions %q: %s", rel, m, strings.TrimSpace(line))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if logs < 10 { // 5 agents, 5 Consuls, 5 Nomads
		t.Errorf("read only %d logs", logs)
	}
	t.Logf("call-out scan: %d logs mention no metadata or checkpoint service", logs)
}

// checkNothingLeft after down: no process naming the state dir, no cgroup
// of the cluster or of its allocations, no socket on its addresses, no
// mount under it, no file.
func (c *upCluster) checkNothingLeft(allocs []string) {
	t := c.t
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(c.state)) {
			t.Errorf("process %s left: %q", filepath.Dir(p), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	cgroups, _ := filepath.Glob("/sys/fs/cgroup/*/steppe-e2eup")
	if more, _ := filepath.Glob("/sys/fs/cgroup/steppe-e2eup"); len(more) > 0 {
		cgroups = append(cgroups, more...)
	}
	// The agents' v1 memory cgroups are below the one `up` ran in, which
	// is this test's.
	if mem, err := supervise.MemoryV1Cgroup(os.Getpid()); err == nil && mem != "" {
		if _, err := os.Stat(filepath.Join(mem, "steppe-e2eup")); err == nil {
			cgroups = append(cgroups, filepath.Join(mem, "steppe-e2eup"))
		}
	}
	if len(cgroups) > 0 {
		t.Errorf("cgroups left: %v", cgroups)
	}
	for _, id := range allocs {
		if left, _ := filepath.Glob("/sys/fs/cgroup/*/nomad/" + id + "*"); len(left) > 0 {
			t.Errorf("allocation cgroups left: %v", left)
		}
		if left, _ := filepath.Glob("/sys/fs/cgroup/*/nomad/*/" + id + "*"); len(left) > 0 {
			t.Errorf("allocation cgroups left: %v", left)
		}
	}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/udp"} {
		b, _ := os.ReadFile(f)
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) < 4 {
				continue
			}
			ip := hexIP(strings.Split(fields[1], ":")[0])
			// tcp state 0A is LISTEN; every udp socket is bound.
			if slices.Contains(c.addrs, ip) && (f == "/proc/net/udp" || fields[3] == "0A") {
				t.Errorf("socket left on %s: %s", ip, line)
			}
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if bytes.Contains(mounts, []byte(c.state)) {
		t.Errorf("mounts left under %s", c.state)
	}
	if _, err := os.Stat(c.state); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("state dir still there: %v", err)
	}
}

// hexIP reads an address of /proc/net/tcp (little-endian hex).
func hexIP(h string) string {
	v, err := strconv.ParseUint(h, 16, 32)
	if err != nil {
		return ""
	}
	return net.IPv4(byte(v), byte(v>>8), byte(v>>16), byte(v>>24)).String()
}

// An address already in use stops up before any machine starts, naming
// the address and what to do.
func TestUpRefusesPortInUse(t *testing.T) {
	c := newUpCluster(t, "e2eport", 21)
	ln, err := net.Listen("tcp", c.addrs[2]+":4647")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	out, err := c.steppe(5*time.Minute, "up", "-spec", c.spec, "-state", c.state)
	if err == nil {
		t.Fatalf("up succeeded with %s:4647 taken:\n%s", c.addrs[2], out)
	}
	if !strings.Contains(out, c.addrs[2]+":4647") || !strings.Contains(out, "in use") || !strings.Contains(out, "first_address") {
		t.Errorf("the error does not name the address and the way out:\n%s", out)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(c.state)) {
			t.Errorf("a process started although up failed: %q", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	t.Logf("refused: %s", out[strings.LastIndex(out, "steppe: "):])
}

// BenchmarkUp measures `steppe up` from nothing to healthy (leaders
// elected, ACLs bootstrapped, workload identity set, clients ready) with
// the binaries cached, 3 servers and 2 clients; down is not timed. The
// phase times of each run are logged.
//
//	go test ./e2e -run '^$' -bench BenchmarkUp -benchtime 3x
func BenchmarkUp(b *testing.B) {
	consul, nomad := daemonBinaries(b)
	bin := steppeBinary(b)
	var total time.Duration
	for i := range b.N {
		b.StopTimer()
		c := &upCluster{bin: bin, dir: b.TempDir(), consul: consul, nomad: nomad}
		c.spec = filepath.Join(c.dir, "cluster.hcl")
		c.state = filepath.Join(c.dir, "state")
		if err := os.WriteFile(c.spec, []byte("name = \"bench\"\nprovider \"local\" {\n  first_address = \"127.0.1.41\"\n}\n"), 0o644); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		start := time.Now()
		out, err := c.steppe(15*time.Minute, "up", "-spec", c.spec, "-state", c.state)
		took := time.Since(start)
		b.StopTimer()
		if err != nil {
			c.steppe(5*time.Minute, "down", "-state", c.state)
			b.Fatalf("up: %v\n%s", err, out)
		}
		total += took
		phases := ""
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "phases: ") {
				phases = l
			}
		}
		b.Logf("run %d: up to healthy in %v; %s", i+1, took.Round(10*time.Millisecond), phases)
		if out, err := c.steppe(5*time.Minute, "down", "-state", c.state); err != nil {
			b.Fatalf("down: %v\n%s", err, out)
		}
		b.StartTimer()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/up")
}
