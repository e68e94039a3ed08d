package e2e

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/hashi"
)

// rotateValidity is the validity of the certificates the rotate tests'
// up issues: under 30 days, so status flags them.
const rotateValidity = "480h"

// newRotateCluster is a 3+2 cluster brought up with certificates of 20
// days and the web job deployed.
func newRotateCluster(t testing.TB, name string, first int) *upCluster {
	t.Helper()
	consul, nomad := daemonBinaries(t)
	c := newSpecCluster(t, consul, nomad, fmt.Sprintf("name = %q\n", name), "127.0.4", first, 5)
	out, err := c.steppeEnv(15*time.Minute, []string{cluster.CertValidityEnv + "=" + rotateValidity}, "up", "-spec", c.spec, "-state", c.state)
	if err != nil {
		t.Fatalf("steppe up: %v\n%s", err, out)
	}
	return c
}

// steppeEnv runs the real binary with extra environment variables.
func (c *upCluster) steppeEnv(timeout time.Duration, extra []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = append(c.baseEnv(), extra...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// servedCerts are the certificates every TLS port of every machine
// serves: machine/port → certificate.
func servedCerts(t testing.TB, st *deploy.Status, files hashi.TLSFiles) map[string]*x509.Certificate {
	t.Helper()
	out := map[string]*x509.Certificate{}
	for _, a := range st.Agents {
		ports := []struct {
			port  int
			first byte
		}{{cluster.ConsulHTTPSPort, 0}, {cluster.NomadHTTPPort, 0}}
		if a.Role == "server" {
			ports = append(ports, struct {
				port  int
				first byte
			}{cluster.ConsulRPCPort, 3}, struct {
				port  int
				first byte
			}{cluster.NomadRPCPort, 4})
		}
		for _, p := range ports {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			cert, err := deploy.ServedCert(ctx, a.Address, p.port, p.first, files)
			cancel()
			if err != nil {
				t.Fatalf("%s port %d: %v", a.Machine, p.port, err)
			}
			out[fmt.Sprintf("%s/%d", a.Machine, p.port)] = cert
		}
	}
	return out
}

// daemonPIDs are machine/service → "pid restarts".
func daemonPIDs(st *deploy.Status) map[string]string {
	out := map[string]string{}
	for _, a := range st.Agents {
		for _, s := range a.Services {
			out[a.Machine+"/"+s.Name] = fmt.Sprintf("pid %d, %d restarts", s.PID, s.Restarts)
		}
	}
	return out
}

func expiryProblems(st *deploy.Status) []string {
	var out []string
	for _, p := range st.Problems {
		if strings.Contains(p, "steppe rotate certs") {
			out = append(out, p)
		}
	}
	return out
}

// checkUnchanged fails for each daemon whose pid or restart count moved,
// but those of skip.
func checkUnchanged(t *testing.T, when string, before, after map[string]string, skip string) {
	t.Helper()
	for k, v := range before {
		if skip != "" && strings.HasSuffix(k, "/"+skip) {
			continue
		}
		if after[k] != v {
			t.Errorf("%s: %s was %s, now %s: it restarted", when, k, v, after[k])
		}
	}
}

func (c *upCluster) readTokens() map[string]string {
	c.t.Helper()
	b, err := os.ReadFile(filepath.Join(c.state, "tokens.json"))
	if err != nil {
		c.t.Fatal(err)
	}
	m := map[string]string{}
	if err := json.Unmarshal(b, &m); err != nil {
		c.t.Fatal(err)
	}
	return m
}

func (c *upCluster) gossipKey(file string) string {
	c.t.Helper()
	b, err := os.ReadFile(filepath.Join(c.state, file))
	if err != nil {
		c.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestRotate: a cluster whose certificates expire in 20 days (status
// says so) has its certificates, then its gossip keys, then its
// per-machine tokens rotated while a probe asks the web job through
// Consul's catalog: no request fails; certificates and gossip keys are
// loaded with no daemon restarting, and every TLS port serves the new
// certificate; the keyrings hold only the new keys; the old tokens are
// refused and the new work (only Nomad restarts, behind the gates, to
// read its new Consul token).
func TestRotate(t *testing.T) {
	c := newRotateCluster(t, "e2erot", 11)
	env := c.envMap()
	files := hashi.TLSFiles{CAFile: env["CONSUL_CACERT"], CertFile: env["CONSUL_CLIENT_CERT"], KeyFile: env["CONSUL_CLIENT_KEY"]}

	st0, err := c.statusJSON()
	if err != nil {
		t.Fatal(err)
	}
	exp := expiryProblems(st0)
	if len(exp) != 6 { // 5 machines and the operator
		t.Fatalf("status lists %d expiring certificates, want 6 (5 machines, the operator): %q", len(exp), st0.Problems)
	}
	for _, want := range []string{"machine e2erot-server-1 expires in 19 days", "the operator's certificate expires in 19 days"} {
		if !strings.Contains(strings.Join(exp, "\n"), want) {
			t.Errorf("status problems %q lack %q", exp, want)
		}
	}
	before := servedCerts(t, st0, files)

	var servers []string
	for _, a := range st0.Agents {
		if a.Role == "server" {
			servers = append(servers, a.Address)
		}
	}
	nc := c.nomadClient(env)
	pr := newProbe(t, env, servers)
	c.runUpgradeWebJob(nc, pr, false)
	pr.start()
	defer pr.stop()
	pids := daemonPIDs(st0)

	// Certificates.
	start := time.Now()
	out, err := c.steppe(10*time.Minute, "rotate", "certs", "-state", c.state)
	if err != nil {
		t.Fatalf("steppe rotate certs: %v\n%s", err, out)
	}
	t.Logf("rotate certs took %v, probe %s\n%s", time.Since(start), pr.counts(), out)
	st1 := c.waitHealthy("healthy after rotate certs", time.Minute, nil)
	if exp := expiryProblems(st1); len(exp) > 0 {
		t.Errorf("after rotate certs status still lists %q", exp)
	}
	checkUnchanged(t, "rotate certs", pids, daemonPIDs(st1), "")
	after := servedCerts(t, st1, files)
	for k, old := range before {
		nw := after[k]
		if nw.SerialNumber.Cmp(old.SerialNumber) == 0 {
			t.Errorf("%s still serves serial %x", k, old.SerialNumber)
		}
		if time.Until(nw.NotAfter) < 300*24*time.Hour {
			t.Errorf("%s serves a certificate valid until %v, not a year", k, nw.NotAfter)
		}
	}

	// Gossip keys.
	oldConsul, oldNomad := c.gossipKey("consul-gossip.key"), c.gossipKey("nomad-gossip.key")
	out, err = c.steppe(10*time.Minute, "rotate", "gossip", "-state", c.state)
	if err != nil {
		t.Fatalf("steppe rotate gossip: %v\n%s", err, out)
	}
	t.Logf("rotate gossip: probe %s\n%s", pr.counts(), out)
	newConsul, newNomad := c.gossipKey("consul-gossip.key"), c.gossipKey("nomad-gossip.key")
	if newConsul == oldConsul || newNomad == oldNomad {
		t.Fatal("the state directory keeps the old gossip keys")
	}
	kl, err := c.sh("consul keyring -list; nomad operator gossip keyring list")
	if err != nil {
		t.Fatalf("keyring list: %v\n%s", err, kl)
	}
	if strings.Contains(kl, oldConsul) || strings.Contains(kl, oldNomad) || !strings.Contains(kl, newConsul) || !strings.Contains(kl, newNomad) {
		t.Errorf("keyrings hold an old key or lack a new one:\n%s", kl)
	}
	for _, a := range st0.Agents {
		b, err := os.ReadFile(filepath.Join(c.state, "machines", a.Machine, "state", "secrets", cluster.SecretConsulConfig))
		if err != nil || !strings.Contains(string(b), newConsul) {
			t.Errorf("%s's consul secrets lack the new gossip key (%v)", a.Machine, err)
		}
	}
	st2 := c.waitHealthy("healthy after rotate gossip", time.Minute, nil)
	checkUnchanged(t, "rotate gossip", pids, daemonPIDs(st2), "")

	// Tokens.
	oldTokens := c.readTokens()
	out, err = c.steppe(15*time.Minute, "rotate", "tokens", "-state", c.state)
	if err != nil {
		t.Fatalf("steppe rotate tokens: %v\n%s", err, out)
	}
	t.Logf("rotate tokens: probe %s\n%s", pr.counts(), out)
	st3 := c.waitHealthy("healthy after rotate tokens", 2*time.Minute, func(s *deploy.Status) bool { return readyClients(s) == 2 })
	checkUnchanged(t, "rotate tokens", pids, daemonPIDs(st3), "nomad")
	newTokens := c.readTokens()
	cc, err := hashi.ConsulClient(servers[0]+":8501", files, "")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for name, old := range oldTokens {
		if !strings.HasPrefix(name, "consul/agent/") && !strings.HasPrefix(name, "consul/nomad/") {
			continue
		}
		n++
		if newTokens[name] == old || newTokens[name] == "" {
			t.Errorf("token %s was not replaced", name)
			continue
		}
		if _, ok := newTokens[cluster.PreviousTokenName(name)]; ok {
			t.Errorf("token %s: the previous secret is still kept", name)
		}
		_, _, err := cc.ACL().TokenReadSelf(&consulapi.QueryOptions{Token: old})
		if err == nil || !strings.Contains(err.Error(), "403") {
			t.Errorf("old token %s: want 403 (deleted), got %v", name, err)
		}
		if _, _, err := cc.ACL().TokenReadSelf(&consulapi.QueryOptions{Token: newTokens[name]}); err != nil {
			t.Errorf("new token %s: %v", name, err)
		}
	}
	if n != 10 {
		t.Errorf("%d per-machine tokens checked, want 10", n)
	}
	// The daemons work with the new tokens: every Consul agent is in
	// sync (anti-entropy with its agent token) and the Nomad agents still
	// register in Consul (the nomad and nomad-client services).
	waitUntil(t, "every Nomad agent registered in Consul with its new token", time.Minute, func() bool {
		defer time.Sleep(time.Second)
		svcs, _, err := consulMgmt(t, servers[0], files).Catalog().Services(nil)
		return err == nil && svcs["nomad"] != nil && svcs["nomad-client"] != nil
	})
	for _, a := range st3.Agents {
		sc := consulMgmt(t, a.Address, files)
		self, err := sc.Agent().Self()
		if err != nil {
			t.Errorf("%s: agent self: %v", a.Machine, err)
			continue
		}
		if _, ok := self["Member"]; !ok {
			t.Errorf("%s: agent self lacks Member", a.Machine)
		}
	}

	pr.stop()
	counts := pr.counts()
	t.Logf("probe over the three rotations: %s", counts)
	if counts.failed > 0 {
		t.Errorf("%d requests failed during the rotations:\n%s", counts.failed, counts.failureLines())
	}
	if counts.ok < 100 {
		t.Errorf("only %d requests succeeded: the probe did not run", counts.ok)
	}
}

func consulMgmt(t testing.TB, addr string, files hashi.TLSFiles) *consulapi.Client {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(files.CertFile)), "tokens.json"))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	c, err := hashi.ConsulClient(addr+":8501", files, cluster.Secret(m[cluster.TokenConsulBootstrap]))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// BenchmarkRotateCerts: steppe rotate certs of a 3+2 cluster while the
// probe runs; reports the wall time and the requests that failed.
func BenchmarkRotateCerts(b *testing.B) {
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		c := newRotateCluster(b, fmt.Sprintf("e2erotb%d", i), 31)
		env := c.envMap()
		st, err := c.statusJSON()
		if err != nil {
			b.Fatal(err)
		}
		var servers []string
		for _, a := range st.Agents {
			if a.Role == "server" {
				servers = append(servers, a.Address)
			}
		}
		pr := newProbe(b, env, servers)
		c.runUpgradeWebJob(c.nomadClient(env), pr, false)
		pr.start()
		b.StartTimer()
		start := time.Now()
		out, err := c.steppe(10*time.Minute, "rotate", "certs", "-state", c.state)
		took := time.Since(start)
		b.StopTimer()
		pr.stop()
		if err != nil {
			b.Fatalf("steppe rotate certs: %v\n%s", err, out)
		}
		counts := pr.counts()
		b.ReportMetric(took.Seconds(), "s/rotate")
		b.ReportMetric(float64(counts.failed), "failed-requests")
		b.Logf("rotate certs: %v, probe %s", took, counts)
	}
}
