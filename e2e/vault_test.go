package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/deploy"
)

// TestVault is one cluster with Vault, for several checks: an up killed
// right after Vault's initialisation, and one killed after the unseal,
// are each resumed by the next up (never initialised twice); then 3
// Vault servers unsealed, one active, 3 raft voters; the vault CLI
// through steppe env writes and reads a secret; the root token no
// longer works; a Nomad job's template reads its secret through its
// workload identity, and another job, or the same job in another
// namespace, cannot; no share or token outside the state directory; the
// active Vault SIGKILLed comes back sealed, status says so, a standby
// took over and the secret stayed readable, steppe vault unseal unseals.
func TestVault(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	cachedBinaries(t, "Vault is not built (make artifacts)", "vault@"+cluster.DefaultVaultVersion)
	c := newSpecCluster(t, consul, nomad, "name = \"e2evault\"\nvault {}\npool \"default\" {\n  count = 1\n}\n", "127.0.6", 11, 4)

	c.upKilledAt("vault initialised on ")
	init := c.vaultInit()
	if init == nil || len(init.Keys) != cluster.DefaultVaultShares || init.RootRevoked {
		t.Fatalf("after an up killed after Vault's init: kept %+v, want %d shares and the root token not yet revoked", init, cluster.DefaultVaultShares)
	}
	c.upKilledAt("vault leader ")
	if again := c.vaultInit(); again.RootToken != init.RootToken || again.Keys[0] != init.Keys[0] {
		t.Fatal("the second up initialised Vault again")
	}
	out, took := c.up()
	if strings.Contains(out, "vault initialised") || !strings.Contains(out, "root token revoked") {
		t.Fatalf("the resumed up initialised again or did not revoke the root token:\n%s", out)
	}
	t.Logf("resumed up in %v", took.Round(time.Millisecond))

	st := c.status()
	if !st.Healthy {
		t.Fatalf("not healthy after up: %q", st.Problems)
	}
	active := checkVaultServers(t, st, 3)
	t.Logf("vault: leader %s, %d voters, active %s", st.Vault.Leader, st.Vault.Voters, active)

	// The vault CLI through steppe env, with the operator token.
	if out, err := c.sh(`vault kv put secret/default/vaultweb/db password=s3cr3t-e2e >/dev/null
vault kv get -field=password secret/default/vaultweb/db
test -n "$VAULT_TOKEN"
vault token lookup -format=json | grep -q '"steppe-operator"'`); err != nil || strings.TrimSpace(out) != "s3cr3t-e2e" {
		t.Fatalf("vault CLI through steppe env: %v\n%s", err, out)
	}
	if out, err := c.sh(fmt.Sprintf("VAULT_TOKEN=%s vault token lookup 2>&1", cluster.Secret(c.vaultInit().RootToken).Reveal())); err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("the root token still works after up (err %v):\n%s", err, out)
	}

	// A job reads its own secret through its workload identity; another
	// job, or the same job in another namespace, is refused.
	if out, err := c.sh("nomad namespace apply -description e2e other"); err != nil {
		t.Fatalf("nomad namespace apply: %v\n%s", err, out)
	}
	if got := c.runSecretJob("vaultweb", "default"); got != "pw=s3cr3t-e2e" {
		t.Errorf("job vaultweb's template rendered %q, want pw=s3cr3t-e2e", got)
	}
	for _, j := range []struct{ job, ns string }{{"thief", "default"}, {"vaultweb", "other"}} {
		if got := c.runSecretJob(j.job, j.ns); got != "" {
			t.Errorf("job %s in namespace %s read the secret of default/vaultweb: %q", j.job, j.ns, got)
		}
	}
	// Nomad's own check of the Vault integration (jobs, nodes, legacy
	// tokens) holds.
	if out, err := c.sh("nomad setup vault -check"); err != nil || !strings.Contains(out, "Nomad cluster is ready to use workload identities with Vault.") {
		t.Errorf("nomad setup vault -check: %v\n%s", err, out)
	}
	c.scanSecrets()
	c.scanProcesses()

	// The active Vault killed: the agent restarts it sealed, a standby
	// is active meanwhile and serves the secret, status names the
	// problem and the command, steppe vault unseal fixes it.
	pid := servicePID(t, st, active, "vault")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	sealed := c.waitStatus("the killed Vault back, sealed", 90*time.Second, func(s *deploy.Status) bool {
		if s.Vault == nil {
			return false
		}
		n, actives := 0, 0
		for _, v := range s.Vault.Servers {
			if v.Name == active && v.State == "sealed" {
				n++
			}
			if v.State == "active" {
				actives++
			}
		}
		return n == 1 && actives == 1
	})
	if !slicesContainsSub(sealed.Problems, "vault on "+active+" is sealed: run steppe vault unseal") {
		t.Errorf("status problems %q do not name the sealed Vault and the command", sealed.Problems)
	}
	if out, err := c.sh("vault kv get -field=password secret/default/vaultweb/db"); err != nil || strings.TrimSpace(out) != "s3cr3t-e2e" {
		t.Errorf("the secret through a standby that took over: %v\n%s", err, out)
	}
	if out, err := c.steppe(3*time.Minute, "vault", "unseal", "-state", c.state); err != nil || !strings.Contains(out, "1 of 3 running servers were sealed") {
		t.Fatalf("steppe vault unseal: %v\n%s", err, out)
	}
	st = *c.waitStatus("healthy after steppe vault unseal", time.Minute, func(s *deploy.Status) bool { return s.Healthy })
	checkVaultServers(t, st, 3)
}

// upKilledAt runs steppe up and SIGKILLs it as soon as it prints a line
// containing marker.
func (c *upCluster) upKilledAt(marker string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, "up", "-spec", c.spec, "-state", c.state)
	cmd.Env = c.baseEnv()
	pr, err := cmd.StdoutPipe()
	if err != nil {
		c.t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	var seen bytes.Buffer
	killed := false
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		seen.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), marker) {
			cmd.Process.Kill()
			killed = true
			break
		}
	}
	cmd.Wait()
	if !killed {
		c.t.Fatalf("steppe up ended without printing %q:\n%s", marker, seen.String())
	}
	c.t.Logf("steppe up killed at %q", marker)
}

func (c *upCluster) vaultInit() *cluster.VaultInit {
	c.t.Helper()
	st, err := cluster.OpenState(c.state)
	if err != nil {
		c.t.Fatal(err)
	}
	v, err := st.VaultInit()
	if err != nil {
		c.t.Fatal(err)
	}
	return v
}

// checkVaultServers checks n Vault servers unsealed, one active, n raft
// voters, and returns the active one's machine name.
func checkVaultServers(t *testing.T, st deploy.Status, n int) string {
	t.Helper()
	if st.Vault == nil || len(st.Vault.Servers) != n || st.Vault.Voters != n {
		t.Fatalf("vault status %+v, want %d servers and %d voters", st.Vault, n, n)
	}
	active := ""
	for _, v := range st.Vault.Servers {
		switch {
		case v.State == "active" && active == "":
			active = v.Name
		case v.State != "standby":
			t.Errorf("vault on %s is %s, want one active and the others standby", v.Name, v.State)
		}
		if !v.Voter || v.Version != cluster.DefaultVaultVersion {
			t.Errorf("vault on %s: voter %v, version %s", v.Name, v.Voter, v.Version)
		}
	}
	if active == "" {
		t.Fatalf("no active Vault: %+v", st.Vault.Servers)
	}
	return active
}

func servicePID(t *testing.T, st deploy.Status, machine, service string) int {
	t.Helper()
	for _, a := range st.Agents {
		if a.Machine != machine {
			continue
		}
		for _, s := range a.Services {
			if s.Name == service && s.PID > 0 {
				return s.PID
			}
		}
	}
	t.Fatalf("no running %s on %s", service, machine)
	return 0
}

// waitStatus polls steppe status until ok holds.
func (c *upCluster) waitStatus(what string, timeout time.Duration, ok func(*deploy.Status) bool) *deploy.Status {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	var last deploy.Status
	for time.Now().Before(deadline) {
		st, _, _, jerr := c.runStatus()
		if jerr == nil {
			last = st
			if ok(&st) {
				return &st
			}
		}
		time.Sleep(time.Second)
	}
	for _, a := range last.Agents {
		if strings.Contains(a.Machine, "server") {
			out, _ := c.steppe(time.Minute, "agent", "logs", "vault", "-n", "25", "-socket", filepath.Join(c.state, "machines", a.Machine, "agent.sock"))
			c.t.Logf("%s: vault log:\n%s", a.Machine, out)
		}
	}
	c.t.Fatalf("%s: not within %v; last status problems %q, vault %+v", what, timeout, last.Problems, last.Vault)
	return nil
}

func slicesContainsSub(list []string, sub string) bool {
	for _, s := range list {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// runSecretJob runs a batch job named job in namespace ns whose template
// reads secret/default/vaultweb/db through the task's workload identity,
// and returns what it rendered ("" when Vault refused and nothing was
// rendered within 25 s).
func (c *upCluster) runSecretJob(job, ns string) string {
	c.t.Helper()
	spec := fmt.Sprintf(`job %q {
  namespace = %q
  type      = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      vault {}
      template {
        data        = "pw={{ with secret \"secret/data/default/vaultweb/db\" }}{{ .Data.data.password }}{{ end }}"
        destination = "local/out.txt"
      }
      config {
        command = "/bin/cat"
        args    = ["local/out.txt"]
      }
    }
  }
}
`, job, ns)
	file := filepath.Join(c.dir, fmt.Sprintf("job-%s-%s.hcl", job, ns))
	if err := os.WriteFile(file, []byte(spec), 0o644); err != nil {
		c.t.Fatal(err)
	}
	out, err := c.sh(fmt.Sprintf(`nomad job run -detach -namespace %[2]s %[1]s >/dev/null
for i in $(seq 50); do
  a=$(nomad job allocs -namespace %[2]s -t '{{range .}}{{if eq .ClientStatus "complete"}}{{.ID}}{{end}}{{end}}' %[3]s)
  if [ -n "$a" ]; then nomad alloc logs -namespace %[2]s "$a" t; exit 0; fi
  sleep 0.5
done
a=$(nomad job allocs -namespace %[2]s -t '{{range .}}{{.ID}}{{end}}' %[3]s)
nomad alloc status -namespace %[2]s "$a" >&2
nomad job stop -namespace %[2]s -purge %[3]s >/dev/null`, file, ns, job))
	if err != nil {
		c.t.Fatalf("job %s/%s: %v\n%s", ns, job, err, out)
	}
	if strings.Contains(out, "pw=") {
		return strings.TrimSpace(out[strings.Index(out, "pw="):])
	}
	if !strings.Contains(out, "Template") && !strings.Contains(out, "permission denied") && !strings.Contains(out, "Missing: vault.read") {
		c.t.Errorf("job %s/%s neither rendered nor shows a refused template:\n%s", ns, job, out)
	}
	return ""
}

// scanProcesses checks that no process on the machine carries a Vault
// share, the root token or any kept token in its arguments or
// environment.
func (c *upCluster) scanProcesses() {
	c.t.Helper()
	st, err := cluster.OpenState(c.state)
	if err != nil {
		c.t.Fatal(err)
	}
	secrets := map[string]string{}
	if v, _ := st.VaultInit(); v != nil {
		secrets["vault root token"] = v.RootToken.Reveal()
		for i, k := range v.Keys {
			secrets[fmt.Sprintf("vault key share %d", i)] = k.Reveal()
		}
	}
	for _, n := range st.TokenNames() {
		s, _ := st.LookupToken(n)
		secrets["token "+n] = s.Reveal()
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	scanned := 0
	for _, p := range procs {
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join(p, f))
			if err != nil {
				continue
			}
			scanned++
			for what, s := range secrets {
				if bytes.Contains(b, []byte(s)) {
					cmd, _ := os.ReadFile(filepath.Join(p, "cmdline"))
					c.t.Errorf("process %s (%s) has the %s in its %s", filepath.Base(p), bytes.ReplaceAll(cmd, []byte{0}, []byte(" ")), what, f)
				}
			}
		}
	}
	c.t.Logf("process scan: %d argument lists and environments clean of %d secrets", scanned, len(secrets))
}

// TestVaultTransit is a cluster whose Vaults unseal themselves through a
// transit key in another Vault (a single dev-mode Vault with TLS that the
// test starts): up initialises with recovery shares and no unseal by
// steppe, and a Vault SIGKILLed comes back unsealed with no steppe
// command.
func TestVaultTransit(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	vaultBin := cachedBinaries(t, "Vault is not built (make artifacts)", "vault@"+cluster.DefaultVaultVersion)[0]
	dir := t.TempDir()
	const transitAddr = "127.0.6.40:8200"
	transit := exec.Command(vaultBin, "server", "-dev", "-dev-tls", "-dev-tls-cert-dir="+dir,
		"-dev-listen-address="+transitAddr, "-dev-root-token-id=e2e-transit-root", "-dev-no-store-token")
	transit.Env = []string{"HOME=" + dir, "PATH=/usr/bin:/bin"}
	tlog, err := os.Create(filepath.Join(dir, "transit.log"))
	if err != nil {
		t.Fatal(err)
	}
	transit.Stdout, transit.Stderr = tlog, tlog
	if err := transit.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		transit.Process.Kill()
		transit.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(tlog.Name())
			t.Logf("transit vault log:\n%s", b)
		}
	})
	vcli := func(script string) string {
		t.Helper()
		cmd := exec.Command("/bin/sh", "-c", "set -e\n"+script)
		cmd.Env = []string{"PATH=" + filepath.Dir(vaultBin) + ":/usr/bin:/bin", "HOME=" + dir, "VAULT_ADDR=https://" + transitAddr,
			"VAULT_CACERT=" + filepath.Join(dir, "vault-ca.pem"), "VAULT_TOKEN=e2e-transit-root"}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("transit vault: %v\n%s", err, out)
		}
		return string(out)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		cmd := exec.Command(vaultBin, "status")
		cmd.Env = []string{"HOME=" + dir, "VAULT_ADDR=https://" + transitAddr, "VAULT_CACERT=" + filepath.Join(dir, "vault-ca.pem")}
		out, err := cmd.CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the transit vault did not come up within 30 s: vault status: %v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	tok := vcli(`vault secrets enable transit >/dev/null
vault write -f transit/keys/steppe >/dev/null
printf 'path "transit/encrypt/steppe" { capabilities = ["update"] }\npath "transit/decrypt/steppe" { capabilities = ["update"] }\n' | vault policy write steppe-unseal - >/dev/null
vault token create -policy=steppe-unseal -period=24h -orphan -field=token`)
	if err := os.WriteFile(filepath.Join(dir, "transit.token"), []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}

	body := fmt.Sprintf(`name = "e2etransit"
vault {
  seal "transit" {
    address    = "https://%s"
    key_name   = "steppe"
    ca_file    = %q
    token_file = %q
  }
}
pool "default" {
  count = 1
}
`, transitAddr, filepath.Join(dir, "vault-ca.pem"), filepath.Join(dir, "transit.token"))
	c := newSpecCluster(t, consul, nomad, body, "127.0.6", 21, 4)
	out, took := c.up()
	if !strings.Contains(out, "recovery key shares") || strings.Contains(out, "vault unsealed on") || !strings.Contains(out, "unsealed themselves") {
		t.Errorf("up of a transit-sealed Vault: want recovery shares and no unseal by steppe:\n%s", out)
	}
	t.Logf("up with a transit seal in %v", took.Round(time.Millisecond))
	st := *c.waitStatus("healthy after up", time.Minute, func(s *deploy.Status) bool { return s.Healthy })
	active := checkVaultServers(t, st, 3)
	if init := c.vaultInit(); init == nil || !init.Recovery {
		t.Fatalf("kept init %+v, want recovery keys", init)
	}
	if out, err := c.sh("vault status -format=json"); err != nil || !strings.Contains(out, `"type": "transit"`) {
		t.Errorf("vault status: want seal type transit: %v\n%s", err, out)
	}
	// A Vault that restarts unseals itself.
	if err := syscall.Kill(servicePID(t, st, active, "vault"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	back := c.waitStatus("the killed Vault back and unsealed by itself", 90*time.Second, func(s *deploy.Status) bool {
		if s.Vault == nil {
			return false
		}
		for _, a := range s.Agents {
			for _, sv := range a.Services {
				if a.Machine == active && sv.Name == "vault" && sv.Restarts == 0 {
					return false
				}
			}
		}
		for _, v := range s.Vault.Servers {
			if v.State != "active" && v.State != "standby" {
				return false
			}
		}
		return s.Healthy && s.Vault.Voters == 3
	})
	checkVaultServers(t, *back, 3)
	c.scanSecrets()
}
