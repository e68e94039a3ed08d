package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/upgrade"
)

// upgVaultFrom is the Vault an upgrade test starts on: a 1.20 that
// builds here (1.20.4 does not: its source needs an sdk newer than the
// v0.18.0 its go.mod requires); it moves to cluster.DefaultVaultVersion.
const upgVaultFrom = "1.20.0"

// TestVaultUpgrade upgrades a cluster's Vault servers (1.20.0 → 1.21.0)
// with `steppe upgrade -vault` while two probes run: the web job's probe
// of TestUpgradeScale, and a client reading a KV secret through Vault
// every 100 ms. Neither may fail. The upgrade snapshots Vault first,
// moves the standbys one at a time (each unsealed by steppe and gated on
// autopilot), steps the active node down and moves it last; afterwards
// every server runs the new version, unsealed, 3 voters, the old active
// no longer active.
func TestVaultUpgrade(t *testing.T) {
	consul, nomad := daemonBinaries(t)
	cachedBinaries(t, "Vault's upgrade pair is not built (make artifacts)", "vault@"+upgVaultFrom, "vault@"+cluster.DefaultVaultVersion)
	body := fmt.Sprintf("name = \"e2evupg\"\nversions {\n  vault = %q\n}\npool \"default\" {\n  count = 1\n}\n", upgVaultFrom)
	c := newSpecCluster(t, consul, nomad, body, "127.0.7", 11, 4)
	// up with live progress (as on a terminal: TestPTY proves auto picks
	// it there): a line per machine and per phase, redrawn in place.
	start := time.Now()
	out, err := c.steppe(15*time.Minute, "up", "-spec", c.spec, "-state", c.state, "-progress=tty")
	took := time.Since(start)
	if err != nil {
		t.Fatalf("steppe up: %v\n%s", err, out)
	}
	t.Logf("up on vault %s with live progress: %v", upgVaultFrom, took.Round(time.Millisecond))
	checkLive(t, "up", out, `steppe up +\d+s  vault`, `e2evupg-server-1 +\d+s  \S`)
	st := c.status()
	if !st.Healthy {
		t.Fatalf("not healthy after up: %q\n%s", st.Problems, out)
	}
	activeBefore := checkVaultVersions(t, st, upgVaultFrom)
	if out, err := c.sh("vault kv put secret/default/web/db password=upgrade-e2e >/dev/null"); err != nil {
		t.Fatalf("vault kv put: %v\n%s", err, out)
	}

	env := c.envMap()
	nc := c.nomadClient(env)
	var servers []string
	for _, s := range st.Servers {
		servers = append(servers, s.Address)
	}
	web := newProbe(t, env, servers)
	c.runUpgradeWebJob(nc, web, false)
	vp := newVaultProbe(t, env, servers)
	web.start()
	vp.start()
	time.Sleep(2 * time.Second)

	r := c.runUpgrade(15*time.Minute, false, "-vault", cluster.DefaultVaultVersion)
	time.Sleep(2 * time.Second)
	web.stop()
	vp.stop()
	if r.err != nil {
		t.Fatalf("steppe upgrade -vault: %v\n%s", r.err, r.out.String())
	}
	t.Logf("steppe upgrade -vault %s: %v\n%s", cluster.DefaultVaultVersion, r.took.Round(100*time.Millisecond), r.out.String())

	wc := web.counts()
	t.Logf("web probe: %s", wc)
	if wc.failed > 0 || wc.ok == 0 {
		t.Errorf("the web probe failed %d times during the Vault upgrade:\n%s", wc.failed, wc.failureLines())
	}
	ok, failed, retried, slowest, fails := vp.counts()
	t.Logf("vault probe: %d reads ok, %d failed, %d needed another server, slowest %v", ok, failed, retried, slowest.Round(time.Millisecond))
	if failed > 0 || ok == 0 {
		t.Errorf("the vault probe failed %d of %d reads during the upgrade:\n%s", failed, ok+failed, strings.Join(fails, "\n"))
	}

	// The plan as run: a snapshot, then the standbys, the active last
	// after a step-down.
	ust := c.upgradeState()
	if ust == nil || !ust.Done {
		t.Fatalf("upgrade state %+v, want done", ust)
	}
	var order []string
	for _, s := range ust.Steps {
		order = append(order, s.ID)
		if s.Kind == upgrade.KindServer && !stepHasPhase(s, "unseal") {
			t.Errorf("step %s has no unseal phase: %+v", s.ID, s.Phases)
		}
	}
	if len(order) != 4 || order[0] != "snapshot/vault" {
		t.Fatalf("upgrade steps %v, want snapshot/vault and 3 server steps", order)
	}
	last := ust.Steps[3]
	if last.Machine != activeBefore || !stepHasPhase(last, "transfer") || !strings.Contains(last.Note, "leadership transferred to") {
		t.Errorf("the last step %s (note %q, phases %+v): want the active before the upgrade, %s, stepped down first", last.ID, last.Note, last.Phases, activeBefore)
	}
	if ust.Steps[0].Snapshot == "" || !strings.Contains(ust.Steps[0].Note, "state.bin") {
		t.Errorf("vault snapshot step %+v", ust.Steps[0])
	}

	st = *c.waitStatus("healthy on the new Vault", time.Minute, func(s *deploy.Status) bool { return s.Healthy })
	checkVaultVersions(t, st, cluster.DefaultVaultVersion)
	if out, err := c.sh("vault kv get -field=password secret/default/web/db"); err != nil || strings.TrimSpace(out) != "upgrade-e2e" {
		t.Errorf("the secret after the upgrade: %v\n%s", err, out)
	}

	// Nothing left to do: the same upgrade again changes nothing.
	again := c.runUpgrade(5*time.Minute, false, "-vault", cluster.DefaultVaultVersion)
	if again.err != nil || strings.Contains(again.out.String(), "server/vault/") {
		t.Errorf("upgrade -vault again: %v\n%s", again.err, again.out.String())
	}

	// down with live progress: a line per machine while it is removed.
	out, err = c.steppe(5*time.Minute, "down", "-state", c.state, "-progress=tty")
	if err != nil {
		t.Fatalf("steppe down: %v\n%s", err, out)
	}
	c.downDone = true
	checkLive(t, "down", out, `e2evupg-client-1 +\d+s  stopping its agent`)
	if !strings.Contains(out, "cluster e2evupg removed in") {
		t.Errorf("steppe down's output lacks its last line:\n%q", out)
	}
}

// checkLive checks that a command's output (with -progress=tty) redrew
// lines in place and showed each live line matching one of lines.
func checkLive(t *testing.T, what, out string, lines ...string) {
	t.Helper()
	if !strings.Contains(out, "\x1b[1A") || !strings.Contains(out, "\r\x1b[J") {
		t.Errorf("steppe %s -progress=tty redrew nothing in place:\n%q", what, out)
	}
	for _, l := range lines {
		if !regexp.MustCompile(`  ` + l).MatchString(out) {
			t.Errorf("steppe %s -progress=tty showed no live line %q:\n%q", what, l, out)
		}
	}
}

func stepHasPhase(s upgrade.Step, name string) bool {
	for _, p := range s.Phases {
		if p.Name == name {
			return true
		}
	}
	return false
}

// checkVaultVersions checks 3 Vault servers on version, unsealed, one
// active, 3 voters, and returns the active one's machine.
func checkVaultVersions(t *testing.T, st deploy.Status, version string) string {
	t.Helper()
	if st.Vault == nil || len(st.Vault.Servers) != 3 || st.Vault.Voters != 3 {
		t.Fatalf("vault status %+v, want 3 servers and 3 voters", st.Vault)
	}
	active := ""
	for _, v := range st.Vault.Servers {
		if v.State == "active" {
			active = v.Name
		} else if v.State != "standby" {
			t.Errorf("vault on %s is %s", v.Name, v.State)
		}
		if !v.Voter || v.Version != version {
			t.Errorf("vault on %s: voter %v, version %s, want %s", v.Name, v.Voter, v.Version, version)
		}
	}
	if active == "" {
		t.Fatalf("no active Vault: %+v", st.Vault.Servers)
	}
	return active
}

// vaultProbe reads a KV secret every 100 ms as an HA client would: the
// Vault API client (its own retries of 5xx included) of the server that
// answered last, the next server when that one refuses or is sealed. A
// read fails when no server gives the secret.
type vaultProbe struct {
	clients []*vaultapi.Client
	cancel  context.CancelFunc
	done    chan struct{}

	mu                  sync.Mutex
	ok, failed, retried int
	slowest             time.Duration
	failures            []string
}

func newVaultProbe(t *testing.T, env map[string]string, servers []string) *vaultProbe {
	t.Helper()
	p := &vaultProbe{}
	for _, s := range servers {
		cfg := vaultapi.DefaultConfig()
		cfg.Address = "https://" + net.JoinHostPort(s, fmt.Sprint(cluster.VaultAPIPort))
		cfg.Timeout = 10 * time.Second
		if err := cfg.ConfigureTLS(&vaultapi.TLSConfig{CACert: env["VAULT_CACERT"]}); err != nil {
			t.Fatal(err)
		}
		c, err := vaultapi.NewClient(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(env["VAULT_TOKEN"])
		p.clients = append(p.clients, c)
	}
	return p
}

func (p *vaultProbe) start() {
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan struct{})
	go func() {
		defer close(p.done)
		cur := 0
		for ctx.Err() == nil {
			start := time.Now()
			var errs []error
			got := false
			for k := range p.clients {
				i := (cur + k) % len(p.clients)
				s, err := p.clients[i].KVv2("secret").Get(ctx, "default/web/db")
				if err == nil && s.Data["password"] == "upgrade-e2e" {
					got = k > 0
					cur = i
					errs = nil
					break
				}
				if err == nil {
					err = fmt.Errorf("secret %v", s.Data)
				}
				errs = append(errs, fmt.Errorf("%s: %w", p.clients[i].Address(), err))
			}
			d := time.Since(start)
			p.mu.Lock()
			switch {
			case ctx.Err() != nil:
			case len(errs) > 0:
				p.failed++
				p.failures = append(p.failures, fmt.Sprintf("%s: %v", start.Format("15:04:05.000"), errors.Join(errs...)))
			default:
				p.ok++
				if got {
					p.retried++
				}
				p.slowest = max(p.slowest, d)
			}
			p.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
}

func (p *vaultProbe) stop() {
	p.cancel()
	<-p.done
}

func (p *vaultProbe) counts() (ok, failed, retried int, slowest time.Duration, failures []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ok, p.failed, p.retried, p.slowest, append([]string(nil), p.failures...)
}
