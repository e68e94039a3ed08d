package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/upgrade"
)

// The upgrade pair built on these machines (DESIGN: facts).
const (
	upgNomadFrom, upgNomadTo   = "1.9.3", "1.10.5"
	upgConsulFrom, upgConsulTo = "1.14.8", "1.14.11"
)

// upgradeBinaries checks that both versions of both daemons are in the
// artifact cache: a skip with the reason outside CI, a failure in CI.
// It returns the older ones.
func upgradeBinaries(t testing.TB) (consul, nomad string) {
	t.Helper()
	bins := cachedBinaries(t, "the upgrade test needs both versions of nomad and consul built (make artifacts)",
		"consul@"+upgConsulFrom, "nomad@"+upgNomadFrom, "consul@"+upgConsulTo, "nomad@"+upgNomadTo)
	return bins[0], bins[1]
}

// newUpgradeCluster writes a spec of 3 servers and 3 clients of pool
// "default" on the old versions, from 127.0.2.first (the other e2e tests
// use 127.0.1.x; scaling may take a few more addresses after these).
func newUpgradeCluster(t testing.TB, name string, first int) *upCluster {
	t.Helper()
	consul, nomad := upgradeBinaries(t)
	body := fmt.Sprintf(`name = %q

versions {
  nomad  = %q
  consul = %q
}

servers {
  count = 3
}

pool "default" {
  count = 3
}
`, name, upgNomadFrom, upgConsulFrom)
	return newSpecCluster(t, consul, nomad, body, "127.0.2", first, 8)
}

// checkDaemonVersions checks what the daemons report running: every
// Consul member and Nomad server, and the Nomad clients too when clients.
func checkDaemonVersions(t *testing.T, when string, st *deploy.Status, consul, nomad string, clients bool) {
	t.Helper()
	for _, m := range st.Consul {
		if m.Version != consul {
			t.Errorf("%s: consul member %s runs %s, want %s", when, m.Name, m.Version, consul)
		}
	}
	for _, s := range st.Servers {
		if s.Version != nomad {
			t.Errorf("%s: nomad server %s runs %s, want %s", when, s.Name, s.Version, nomad)
		}
	}
	if !clients {
		return
	}
	for _, cl := range st.Clients {
		if cl.Version != nomad {
			t.Errorf("%s: nomad client %s runs %s, want %s", when, cl.Name, cl.Version, nomad)
		}
	}
}

// statusJSON runs `steppe status -json`, without judging: for polling.
func (c *upCluster) statusJSON() (*deploy.Status, error) {
	st, _, _, err := c.runStatus()
	if err != nil {
		return nil, err
	}
	return &st, nil
}

// waitHealthy polls status until it says healthy and cond (if any) holds.
func (c *upCluster) waitHealthy(what string, timeout time.Duration, cond func(*deploy.Status) bool) *deploy.Status {
	c.t.Helper()
	var last *deploy.Status
	var lastErr error
	deadline := time.Now().Add(timeout)
	for {
		st, err := c.statusJSON()
		if err == nil && st.Healthy && (cond == nil || cond(st)) {
			return st
		}
		last, lastErr = st, err
		if time.Now().After(deadline) {
			if last != nil {
				b, _ := json.MarshalIndent(last, "", "  ")
				c.t.Fatalf("timed out after %v waiting for %s; last status problems %q:\n%s", timeout, what, last.Problems, b)
			}
			c.t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, lastErr)
		}
		time.Sleep(2 * time.Second)
	}
}

func readyClients(st *deploy.Status) int {
	n := 0
	for _, cl := range st.Clients {
		if cl.Status == "ready" && cl.Eligible && !cl.Drain {
			n++
		}
	}
	return n
}

const upgradeWebJob = `job "web" {
  datacenters = ["dc1"]
  type        = "service"

  update {
    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "2s"
    healthy_deadline  = "2m"
    progress_deadline = "5m"
  }

  group "web" {
    count = 3
%s
    # Consul stops sending traffic before the task dies.
    shutdown_delay = "3s"

    migrate {
      max_parallel     = 1
      health_check     = "checks"
      min_healthy_time = "2s"
      healthy_deadline = "2m"
    }

    network {
      port "http" {}
    }

    service {
      name     = "web"
      port     = "http"
      provider = "consul"
      check {
        type     = "http"
        path     = "/"
        interval = "1s"
        timeout  = "1s"
      }
    }

    task "serve" {
      driver       = "raw_exec"
      kill_timeout = "10s"
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

const distinctHosts = `    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }
`

func (c *upCluster) nomadClient(env map[string]string) *nomadapi.Client {
	c.t.Helper()
	cfg := nomadapi.DefaultConfig()
	cfg.Address, cfg.SecretID = env["NOMAD_ADDR"], env["NOMAD_TOKEN"]
	cfg.TLSConfig = &nomadapi.TLSConfig{CACert: env["NOMAD_CACERT"], ClientCert: env["NOMAD_CLIENT_CERT"], ClientKey: env["NOMAD_CLIENT_KEY"]}
	nc, err := nomadapi.NewClient(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	return nc
}

// runUpgradeWebJob registers the web job through the real nomad CLI and
// waits until its latest version is deployed: 3 running allocations and 3
// passing instances in Consul.
func (c *upCluster) runUpgradeWebJob(nc *nomadapi.Client, pr *probe, distinct bool) {
	t := c.t
	t.Helper()
	constraint := ""
	if distinct {
		constraint = distinctHosts
	}
	job := filepath.Join(c.dir, "web-upgrade.nomad.hcl")
	if err := os.WriteFile(job, []byte(fmt.Sprintf(upgradeWebJob, constraint, c.bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := c.sh("nomad job run -detach " + job)
	if err != nil {
		t.Fatalf("nomad job run: %v\n%s", err, out)
	}
	var why string
	waitUntil(t, "the web job deployed: 3 running allocations, 3 passing instances in Consul", 5*time.Minute, func() bool {
		defer time.Sleep(time.Second)
		j, _, err := nc.Jobs().Info("web", nil)
		if err != nil || j.Version == nil {
			why = fmt.Sprintf("job info: %v", err)
			return false
		}
		d, _, err := nc.Jobs().LatestDeployment("web", nil)
		if err != nil || d == nil || d.JobVersion != *j.Version || d.Status != nomadapi.DeploymentStatusSuccessful {
			why = fmt.Sprintf("deployment %+v %v", d, err)
			return false
		}
		running, bad, err := webAllocs(nc)
		if err != nil || len(running) != 3 || len(bad) > 0 {
			why = fmt.Sprintf("running %v, lost or failed %v, %v", running, bad, err)
			return false
		}
		inst, err := pr.instances(context.Background())
		why = fmt.Sprintf("consul instances %v %v", inst, err)
		return err == nil && len(inst) == 3
	})
	t.Logf("web job (distinct_hosts=%v) deployed; %s", distinct, why)
}

// webAllocs are the web job's running allocations (id@node) and every
// allocation it ever had that was lost or failed.
func webAllocs(nc *nomadapi.Client) (running, bad []string, err error) {
	allocs, _, err := nc.Jobs().Allocations("web", true, nil)
	if err != nil {
		return nil, nil, err
	}
	for _, a := range allocs {
		switch a.ClientStatus {
		case nomadapi.AllocClientStatusRunning:
			if a.DesiredStatus == nomadapi.AllocDesiredStatusRun {
				running = append(running, a.ID[:8]+"@"+a.NodeName)
			}
		case nomadapi.AllocClientStatusLost, nomadapi.AllocClientStatusFailed:
			bad = append(bad, fmt.Sprintf("%s@%s %s (%s)", a.ID[:8], a.NodeName, a.ClientStatus, a.ClientDescription))
		}
	}
	sort.Strings(running)
	return running, bad, nil
}

// probe is a client of the web service as a real one would be: each
// request goes to a healthy instance picked from Consul's catalog (any
// server answers, stale reads allowed), with one retry on a fresh pick
// when the connection is refused.
type probe struct {
	consul []*consulapi.Client // one per Consul server
	http   *http.Client

	mu       sync.Mutex
	ok       int
	retried  int
	failures []probeFailure
	pref     int // the Consul server that answered last

	cancel context.CancelFunc
	done   chan struct{}
}

type probeFailure struct {
	at   time.Time
	kind string
	err  string
}

// probeCounts are the figures of a probe at one moment; sub gives those
// of a window.
type probeCounts struct {
	ok, failed, retried int
	failures            []probeFailure
}

func (a probeCounts) sub(b probeCounts) probeCounts {
	return probeCounts{ok: a.ok - b.ok, failed: a.failed - b.failed, retried: a.retried - b.retried, failures: a.failures[len(b.failures):]}
}

func (a probeCounts) rate() float64 {
	if a.ok+a.failed == 0 {
		return 0
	}
	return float64(a.ok) / float64(a.ok+a.failed)
}

func (a probeCounts) String() string {
	kinds := map[string]int{}
	for _, f := range a.failures {
		kinds[f.kind]++
	}
	return fmt.Sprintf("%d requests, %d ok (%.3f%%), %d failed %v, %d retried after a refused connection",
		a.ok+a.failed, a.ok, 100*a.rate(), a.failed, kinds, a.retried)
}

func (a probeCounts) failureLines() string {
	var b strings.Builder
	for _, f := range a.failures {
		fmt.Fprintf(&b, "  %s %s: %s\n", f.at.Format("15:04:05.000"), f.kind, f.err)
	}
	return b.String()
}

// newProbe makes Consul clients for every server, with the operator's
// token and certificates from steppe env.
func newProbe(t testing.TB, env map[string]string, servers []string) *probe {
	t.Helper()
	u, err := url.Parse(env["CONSUL_HTTP_ADDR"])
	if err != nil || u.Port() == "" {
		t.Fatalf("CONSUL_HTTP_ADDR %q: %v", env["CONSUL_HTTP_ADDR"], err)
	}
	hosts := []string{u.Hostname()}
	for _, s := range servers {
		if !slices.Contains(hosts, s) {
			hosts = append(hosts, s)
		}
	}
	p := &probe{http: &http.Client{
		// Generous: the figure is availability, not latency, on a loaded
		// 2-core machine.
		Timeout: 10 * time.Second,
		// A new connection per request, as a client that follows the
		// catalog would; no keep-alive hides a dead instance.
		Transport: &http.Transport{DisableKeepAlives: true},
	}}
	for _, h := range hosts {
		cfg := consulapi.DefaultConfig()
		cfg.Address = net.JoinHostPort(h, u.Port())
		cfg.Scheme = u.Scheme
		cfg.Token = env["CONSUL_HTTP_TOKEN"]
		cfg.TLSConfig = consulapi.TLSConfig{CAFile: env["CONSUL_CACERT"], CertFile: env["CONSUL_CLIENT_CERT"], KeyFile: env["CONSUL_CLIENT_KEY"]}
		cl, err := consulapi.NewClient(cfg)
		if err != nil {
			t.Fatal(err)
		}
		p.consul = append(p.consul, cl)
	}
	return p
}

// instances are the passing instances of web, from the first Consul server
// that answers.
func (p *probe) instances(ctx context.Context) ([]string, error) {
	p.mu.Lock()
	pref := p.pref
	p.mu.Unlock()
	var errs []error
	for i := range p.consul {
		k := (pref + i) % len(p.consul)
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		entries, _, err := p.consul[k].Health().Service("web", "", true, (&consulapi.QueryOptions{AllowStale: true}).WithContext(qctx))
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.mu.Lock()
		p.pref = k
		p.mu.Unlock()
		var out []string
		for _, e := range entries {
			addr := e.Service.Address
			if addr == "" {
				addr = e.Node.Address
			}
			out = append(out, net.JoinHostPort(addr, fmt.Sprint(e.Service.Port)))
		}
		sort.Strings(out)
		return out, nil
	}
	return nil, fmt.Errorf("no Consul server answered: %w", errors.Join(errs...))
}

func (p *probe) start() {
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan struct{})
	go func() {
		defer close(p.done)
		tick := time.NewTicker(50 * time.Millisecond) // about 20 requests a second
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			kind, retried, err := p.once(ctx)
			if ctx.Err() != nil {
				return // the test is over: do not count a cancelled request
			}
			p.mu.Lock()
			if retried {
				p.retried++
			}
			if err == nil {
				p.ok++
			} else {
				p.failures = append(p.failures, probeFailure{at: time.Now(), kind: kind, err: err.Error()})
			}
			p.mu.Unlock()
		}
	}()
}

func (p *probe) stop() {
	if p.cancel != nil {
		p.cancel()
		<-p.done
		p.cancel = nil
	}
}

func (p *probe) counts() probeCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	return probeCounts{ok: p.ok, failed: len(p.failures), retried: p.retried, failures: slices.Clone(p.failures)}
}

// once is one request, with its one retry on a refused connection.
func (p *probe) once(ctx context.Context) (kind string, retried bool, err error) {
	kind, err = p.try(ctx)
	if err != nil && errors.Is(err, syscall.ECONNREFUSED) {
		retried = true
		kind, err = p.try(ctx)
		if err != nil {
			kind = "after retry: " + kind
		}
	}
	return kind, retried, err
}

func (p *probe) try(ctx context.Context) (string, error) {
	inst, err := p.instances(ctx)
	if err != nil {
		return "consul", err
	}
	if len(inst) == 0 {
		return "no healthy instance", errors.New("the catalog has no passing instance of web")
	}
	addr := inst[rand.IntN(len(inst))]
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		return "request", err
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return errKind(err), fmt.Errorf("%s: %w", addr, err)
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return errKind(err), fmt.Errorf("%s: body: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("http %d", resp.StatusCode), fmt.Errorf("%s: %s", addr, resp.Status)
	}
	return "", nil
}

func errKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// upgradeRun is one `steppe upgrade` process whose output is watched.
type upgradeRun struct {
	out    strings.Builder
	killed bool
	err    error
	took   time.Duration
}

var serverStepRE = regexp.MustCompile(`server/(consul|nomad)/[a-z0-9-]+`)

// runUpgrade runs `steppe upgrade` with args. With killMidway, it is
// killed (SIGKILL) as soon as a second server step has started: seen in
// its output (a second server step named) or in the upgrade's state file
// (a server step running after one is done), whichever comes first.
func (c *upCluster) runUpgrade(timeout time.Duration, killMidway bool, args ...string) *upgradeRun {
	t := c.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, append([]string{"upgrade", "-state", c.state}, args...)...)
	cmd.Env = c.baseEnv()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	r := &upgradeRun{}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	var mu sync.Mutex
	var once sync.Once
	kill := func(why string) {
		once.Do(func() {
			mu.Lock()
			r.killed = true
			fmt.Fprintf(&r.out, "### test: SIGKILL (%s)\n", why)
			mu.Unlock()
			cmd.Process.Signal(syscall.SIGKILL)
		})
	}
	lines := make(chan struct{})
	go func() {
		defer close(lines)
		seen := map[string]bool{}
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			l := sc.Text()
			mu.Lock()
			r.out.WriteString(l + "\n")
			mu.Unlock()
			if c.onUpgradeLine != nil {
				c.onUpgradeLine(l)
			}
			if !killMidway {
				continue
			}
			for _, id := range serverStepRE.FindAllString(l, -1) {
				seen[id] = true
			}
			if len(seen) >= 2 {
				kill("output names a second server step: " + l)
			}
		}
	}()
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		if !killMidway {
			return
		}
		for {
			select {
			case <-stopWatch:
				return
			case <-time.After(200 * time.Millisecond):
			}
			st := c.upgradeState()
			if st == nil {
				continue
			}
			done, running := 0, ""
			for _, s := range st.Steps {
				if s.Kind != upgrade.KindServer {
					continue
				}
				switch s.Status {
				case upgrade.StatusDone:
					done++
				case upgrade.StatusRunning:
					running = s.ID
				}
			}
			if done >= 1 && running != "" {
				kill("state file: " + running + " running after a server step done")
				return
			}
		}
	}()
	r.err = cmd.Wait()
	r.took = time.Since(start)
	close(stopWatch)
	<-watched
	<-lines
	pr.Close()
	return r
}

// upgradeState is the upgrade's state file, wherever in the state
// directory the CLI keeps it; nil if there is none.
func (c *upCluster) upgradeState() *upgrade.State {
	for _, pat := range []string{upgrade.StateFile, "*/" + upgrade.StateFile} {
		files, _ := filepath.Glob(filepath.Join(c.state, pat))
		for _, f := range files {
			if st, err := upgrade.LoadState(filepath.Dir(f)); err == nil && st != nil {
				return st
			}
		}
	}
	return nil
}

func (c *upCluster) machineSocket(name string) string {
	return filepath.Join(c.state, "machines", name, "agent.sock")
}

// machineLogs is the end of a machine's agent log and of its daemons'
// logs, for a failure message.
func (c *upCluster) machineLogs(name string) string {
	var b strings.Builder
	if log, err := os.ReadFile(filepath.Join(c.state, "machines", name, "agent.log")); err == nil {
		lines := strings.Split(strings.TrimSpace(string(log)), "\n")
		fmt.Fprintf(&b, "--- %s agent.log ---\n%s\n", name, strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	for _, svc := range []string{"consul", "nomad"} {
		out, _ := c.steppe(time.Minute, "agent", "logs", svc, "-n", "20", "-socket", c.machineSocket(name))
		fmt.Fprintf(&b, "--- %s %s ---\n%s\n", name, svc, out)
	}
	return b.String()
}

// leftovers are the processes and files of a removed machine.
func (c *upCluster) leftovers(name string) []string {
	dir := filepath.Join(c.state, "machines", name)
	var left []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && (strings.Contains(string(b), dir+"/") || strings.Contains(string(b), dir+"\x00")) {
			left = append(left, fmt.Sprintf("process %s: %q", filepath.Base(filepath.Dir(p)), strings.ReplaceAll(string(b), "\x00", " ")))
		}
	}
	if _, err := os.Stat(dir); err == nil {
		left = append(left, "directory "+dir)
	}
	return left
}

// probeControl shows the probe is not blind: one instance frozen
// (SIGSTOP: it still accepts connections, and answers none) costs at
// least one failed request before Consul's check takes it out of the
// catalog. The instance is thawed and back in the catalog afterwards.
func (c *upCluster) probeControl(pr *probe) {
	t := c.t
	t.Helper()
	inst, err := pr.instances(context.Background())
	if err != nil || len(inst) != 3 {
		t.Fatalf("web instances %v: %v", inst, err)
	}
	pid := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), "artifact\x00serve\x00") && strings.Contains(string(b), "\x00"+inst[0]+"\x00") {
			fmt.Sscan(filepath.Base(filepath.Dir(p)), &pid)
		}
	}
	if pid == 0 {
		t.Fatalf("no process serves the web instance at %s", inst[0])
	}
	before := pr.counts()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	t.Cleanup(thaw)
	waitUntil(t, "the probe to see the frozen instance at "+inst[0], 2*time.Minute, func() bool {
		time.Sleep(100 * time.Millisecond)
		return pr.counts().failed > before.failed
	})
	thaw()
	waitUntil(t, "the thawed instance back among 3 passing", 2*time.Minute, func() bool {
		time.Sleep(500 * time.Millisecond)
		now, err := pr.instances(context.Background())
		return err == nil && len(now) == 3
	})
	t.Logf("control: instance %s (pid %d) frozen, then thawed: the probe saw %s", inst[0], pid, pr.counts().sub(before))
}

// phaseTotals sums the seconds of each phase over the upgrade's steps.
func phaseTotals(st *upgrade.State) string {
	sums := map[string]float64{}
	for _, s := range st.Steps {
		for _, p := range s.Phases {
			sums[string(s.Kind)+"/"+p.Name] += p.Seconds
		}
	}
	var keys []string
	for k := range sums {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.1fs", k, sums[k]))
	}
	return strings.Join(parts, ", ")
}

// TestUpgradeScale is one cluster (the CI budget has room for one) of 3
// servers and 3 clients on nomad 1.9.3 and consul 1.14.8, running a
// 3-instance HTTP service registered in Consul, with a probe that keeps
// asking a healthy instance picked from Consul's catalog. On it: an
// upgrade refused while a Consul server is down; the rolling upgrade to
// nomad 1.10.5 and consul 1.14.11, killed midway and run again; then the
// pool scaled 3 → 5 → 2. The probe must stay at 99.9% or better through
// the upgrade and through the scaling, and no allocation may be lost.
func TestUpgradeScale(t *testing.T) {
	c := newUpgradeCluster(t, "e2eupg", 11)
	out, took := c.up()
	t.Logf("steppe up (3 servers, 3 clients, nomad %s, consul %s) took %v", upgNomadFrom, upgConsulFrom, took.Round(time.Millisecond))
	st0 := c.waitHealthy("the new cluster healthy, 3 ready clients", 3*time.Minute, func(st *deploy.Status) bool {
		return len(st.Servers) == 3 && readyClients(st) == 3
	})
	var servers, serverMachines []string
	for _, m := range st0.Consul {
		if m.Server {
			host := m.Address
			if h, _, err := net.SplitHostPort(m.Address); err == nil {
				host = h
			}
			servers = append(servers, host)
			serverMachines = append(serverMachines, m.Name)
		}
	}
	if len(servers) != 3 {
		t.Fatalf("consul servers %v in status:\n%s", servers, out)
	}
	for _, s := range st0.Servers {
		if s.Version != upgNomadFrom {
			t.Errorf("server %s runs nomad %s, the spec says %s", s.Name, s.Version, upgNomadFrom)
		}
	}

	env := c.envMap()
	nc := c.nomadClient(env)
	pr := newProbe(t, env, servers)
	c.runUpgradeWebJob(nc, pr, true)
	pr.start()
	t.Cleanup(pr.stop) // before the cluster's down (cleanups run last first)
	c.probeControl(pr)

	// Refused: a Consul server is down. Nothing is touched.
	victim := serverMachines[len(serverMachines)-1]
	if out, err := c.steppe(time.Minute, "agent", "stop", "consul", "-socket", c.machineSocket(victim)); err != nil {
		t.Fatalf("steppe agent stop consul on %s: %v\n%s", victim, err, out)
	}
	target := []string{"-nomad", upgNomadTo, "-consul", upgConsulTo, "-stable", "5s", "-drain-deadline", "3m"}
	ref := c.runUpgrade(5*time.Minute, false, target...)
	victimAddr := servers[slices.Index(serverMachines, victim)]
	if ref.err == nil {
		t.Errorf("upgrade with the consul server of %s stopped succeeded:\n%s", victim, ref.out.String())
	} else if !strings.Contains(ref.out.String(), victim) && !strings.Contains(ref.out.String(), victimAddr) {
		t.Errorf("the refusal does not name the stopped server %s (%s):\n%s", victim, victimAddr, ref.out.String())
	}
	t.Logf("upgrade refused with %s's consul stopped (%v, %v):\n%s", victim, ref.err, ref.took.Round(time.Millisecond), ref.out.String())
	if st := c.upgradeState(); st != nil {
		t.Errorf("a refused upgrade recorded a plan of %d steps", len(st.Steps))
	}
	if out, err := c.steppe(time.Minute, "agent", "start", "consul", "-socket", c.machineSocket(victim)); err != nil {
		t.Fatalf("steppe agent start consul on %s: %v\n%s", victim, err, out)
	}
	stRef := c.waitHealthy("the cluster healthy again after consul restarted on "+victim, 5*time.Minute, func(st *deploy.Status) bool {
		return readyClients(st) == 3
	})
	// Consul 1.14 has no raft pre-vote: the server that came back may call
	// an election seconds later, and autopilot calls it unhealthy
	// meanwhile. The upgrade must start from a settled cluster.
	for range 3 {
		time.Sleep(3 * time.Second)
		stRef = c.waitHealthy("the cluster still healthy after consul restarted on "+victim, 5*time.Minute, func(st *deploy.Status) bool {
			return readyClients(st) == 3
		})
	}
	checkDaemonVersions(t, "after the refusal (untouched)", stRef, upgConsulFrom, upgNomadFrom, false)
	// The refusal window is not the upgrade's: the probe may have seen
	// what a stopped Consul server does to its own catalog queries.
	t.Logf("probe before the upgrade: %s", pr.counts())

	// The upgrade, killed once a second server step has started, then
	// run again to the end.
	before := pr.counts()
	start := time.Now()
	run1 := c.runUpgrade(30*time.Minute, true, target...)
	t.Logf("upgrade run 1 (%v, %v):\n%s", run1.err, run1.took.Round(time.Millisecond), run1.out.String())
	if !run1.killed {
		t.Errorf("the first upgrade run was never killed midway (no second server step seen in its output or state file): the resume is not tested")
	}
	run2 := c.runUpgrade(30*time.Minute, false, target...)
	upgradeTook := time.Since(start)
	t.Logf("upgrade run 2 (%v, %v):\n%s", run2.err, run2.took.Round(time.Millisecond), run2.out.String())
	if run2.err != nil {
		var logs strings.Builder
		st, _ := c.statusJSON()
		if st != nil {
			for _, a := range st.Agents {
				logs.WriteString(c.machineLogs(a.Machine))
			}
		}
		t.Fatalf("the resumed upgrade failed: %v\n%s", run2.err, logs.String())
	}
	upgWindow := pr.counts().sub(before)
	// The final report: a row per step, each machine's from → to, and
	// the time by phase.
	report := run2.out.String()
	if i := strings.LastIndex(report, "upgrade report"); i < 0 {
		t.Errorf("the upgrade printed no report:\n%s", report)
	} else {
		report = report[i:]
		for _, m := range append(slices.Clone(serverMachines), "e2eupg-default-1", "e2eupg-default-2", "e2eupg-default-3") {
			if !regexp.MustCompile(`(?m)^\S*` + regexp.QuoteMeta(m) + `\s+done\s+\S`).MatchString(report) {
				t.Errorf("the report has no finished row for %s:\n%s", m, report)
			}
		}
		if !strings.Contains(report, "time by phase:") {
			t.Errorf("the report has no time by phase:\n%s", report)
		}
	}

	stUp := c.waitHealthy("the upgraded cluster healthy", 3*time.Minute, func(st *deploy.Status) bool {
		return readyClients(st) == 3
	})
	checkDaemonVersions(t, "after the upgrade", stUp, upgConsulTo, upgNomadTo, true)
	for _, a := range stUp.Agents {
		if a.Versions["nomad"] != upgNomadTo || a.Versions["consul"] != upgConsulTo {
			t.Errorf("agent of %s is set to run %v, want nomad %s and consul %s", a.Machine, a.Versions, upgNomadTo, upgConsulTo)
		}
		if a.Runs["nomad"] != upgNomadTo || a.Runs["consul"] != upgConsulTo {
			t.Errorf("the daemons of %s run %v, want nomad %s and consul %s", a.Machine, a.Runs, upgNomadTo, upgConsulTo)
		}
	}
	if len(stUp.Servers) != 3 || len(stUp.Consul) != 6 || len(stUp.Agents) != 6 {
		t.Errorf("after the upgrade: %d nomad servers, %d consul members, %d agents; want 3, 6, 6", len(stUp.Servers), len(stUp.Consul), len(stUp.Agents))
	}
	var running, bad []string
	waitUntil(t, "3 running web allocations after the upgrade", 3*time.Minute, func() bool {
		var err error
		running, bad, err = webAllocs(nc)
		if err != nil {
			time.Sleep(time.Second)
		}
		return err == nil && len(running) == 3
	})
	if len(bad) > 0 {
		t.Errorf("allocations lost or failed during the upgrade: %v", bad)
	}
	phases := ""
	if st := c.upgradeState(); st == nil {
		t.Errorf("no upgrade state file under %s after the upgrade", c.state)
	} else {
		if !st.Done {
			t.Errorf("the upgrade state is not done after run 2 succeeded")
		}
		phases = phaseTotals(st)
		// The kill came while a server step was running: the next run
		// found it so and verified it before going on.
		if run1.killed && !slices.ContainsFunc(st.Steps, func(s upgrade.Step) bool { return s.Resumed }) {
			t.Errorf("run 1 was killed inside a server step, but no step of the upgrade says it was resumed")
		}
		for _, s := range st.Steps {
			t.Logf("step %-36s %-7s %8v attempts %d resumed %-5v drained %d phases %v %s",
				s.ID, s.Status, s.Duration().Round(time.Millisecond), s.Attempts, s.Resumed, s.Drained, s.Phases, s.Note)
		}
	}
	t.Logf("UPGRADE: wall time %v (run 1 %v, killed %v; run 2 %v); phase totals: %s", upgradeTook.Round(time.Millisecond),
		run1.took.Round(time.Millisecond), run1.killed, run2.took.Round(time.Millisecond), phases)
	t.Logf("probe during the upgrade: %s; allocations running %v", upgWindow, running)
	if upgWindow.ok+upgWindow.failed < 100 {
		t.Errorf("the probe made only %d requests during the upgrade", upgWindow.ok+upgWindow.failed)
	}
	if upgWindow.rate() < 0.999 {
		t.Errorf("probe success during the upgrade %.3f%% < 99.9%%; failures:\n%s", 100*upgWindow.rate(), upgWindow.failureLines())
	}

	// Scale 3 → 5 → 2. Two clients cannot hold 3 distinct_hosts
	// allocations: the job drops that constraint first (a rolling,
	// health-checked update the probe watches too).
	before = pr.counts()
	c.runUpgradeWebJob(nc, pr, false)
	scaleStart := time.Now()
	out, err := c.steppe(15*time.Minute, "scale", "-state", c.state, "-drain-deadline", "3m", "default", "5")
	t.Logf("steppe scale default 5 (%v, %v):\n%s", err, time.Since(scaleStart).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("steppe scale default 5: %v", err)
	}
	st5 := c.waitHealthy("5 ready clients", 5*time.Minute, func(st *deploy.Status) bool { return readyClients(st) == 5 })
	for _, cl := range st5.Clients {
		if cl.Version != upgNomadTo {
			t.Errorf("scaled up: client %s runs nomad %s, want the cluster's %s", cl.Name, cl.Version, upgNomadTo)
		}
	}
	for _, a := range st5.Agents {
		if a.Versions["nomad"] != upgNomadTo || a.Versions["consul"] != upgConsulTo {
			t.Errorf("scaled up: agent of %s is set to run %v, want nomad %s and consul %s", a.Machine, a.Versions, upgNomadTo, upgConsulTo)
		}
	}
	clients5 := map[string]bool{}
	for _, cl := range st5.Clients {
		clients5[cl.Name] = true
	}

	// Refused: a machine that would stay cannot take work (made
	// ineligible here; a node that is down is refused the same way), so
	// what the drains move would have one place less to go. Nothing is
	// drained or removed.
	keeper := "e2eupg-default-1"
	setEligible := func(on bool) {
		t.Helper()
		nodes, _, err := nc.Nodes().List(nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			if n.Name == keeper {
				if _, err := nc.Nodes().ToggleEligibility(n.ID, on, nil); err != nil {
					t.Fatal(err)
				}
				return
			}
		}
		t.Fatalf("no nomad node %s", keeper)
	}
	setEligible(false)
	out, err = c.steppe(5*time.Minute, "scale", "-state", c.state, "default", "2")
	if err == nil || !strings.Contains(out, keeper) {
		t.Errorf("scale default 2 with %s ineligible: %v, want a refusal naming it:\n%s", keeper, err, out)
	}
	if st, err := c.statusJSON(); err == nil && len(st.Agents) != 8 {
		t.Errorf("a refused scale changed the machines: %d agents, want 8", len(st.Agents))
	}
	setEligible(true)

	shrinkStart := time.Now()
	out, err = c.steppe(15*time.Minute, "scale", "-state", c.state, "-drain-deadline", "3m", "default", "2")
	t.Logf("steppe scale default 2 (%v, %v):\n%s", err, time.Since(shrinkStart).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("steppe scale default 2: %v", err)
	}
	st2 := c.waitHealthy("2 ready clients", 5*time.Minute, func(st *deploy.Status) bool { return readyClients(st) == 2 })
	scaleWindow := pr.counts().sub(before)
	var removed []string
	for name := range clients5 {
		if !slices.ContainsFunc(st2.Clients, func(cl deploy.ClientStatus) bool { return cl.Name == name && cl.Status == "ready" }) {
			removed = append(removed, name)
		}
	}
	sort.Strings(removed)
	var nodes []string
	for _, cl := range st2.Clients {
		nodes = append(nodes, cl.Name+" "+cl.Status)
	}
	t.Logf("nomad clients after scaling to 2: %v", nodes)
	if len(removed) != 3 {
		t.Errorf("scaling 5 → 2 removed %v, want 3 machines", removed)
	}
	// The highest-numbered go first: default-1 and default-2 stay.
	for _, keep := range []string{"e2eupg-default-1", "e2eupg-default-2"} {
		if slices.Contains(removed, keep) {
			t.Errorf("scaling down removed %s, not the highest-numbered machines: %v", keep, removed)
		}
	}
	for _, name := range removed {
		var left []string
		deadline := time.Now().Add(time.Minute)
		for left = c.leftovers(name); len(left) > 0 && time.Now().Before(deadline); left = c.leftovers(name) {
			time.Sleep(time.Second)
		}
		if len(left) > 0 {
			t.Errorf("removed machine %s left:\n  %s", name, strings.Join(left, "\n  "))
		}
		if slices.ContainsFunc(st2.Agents, func(a deploy.AgentStatus) bool { return a.Machine == name }) {
			t.Errorf("removed machine %s still has an agent in status", name)
		}
	}
	waitUntil(t, "3 running web allocations after scaling to 2 clients", 5*time.Minute, func() bool {
		var err error
		running, bad, err = webAllocs(nc)
		if err != nil {
			time.Sleep(time.Second)
		}
		return err == nil && len(running) == 3
	})
	if len(bad) > 0 {
		t.Errorf("allocations lost or failed: %v", bad)
	}
	for _, r := range running {
		if _, node, _ := strings.Cut(r, "@"); slices.Contains(removed, node) {
			t.Errorf("allocation %s runs on a removed machine", r)
		}
	}
	t.Logf("SCALE: 3 → 5 in %v, 5 → 2 in %v; removed %v; allocations %v", shrinkStart.Sub(scaleStart).Round(time.Millisecond),
		time.Since(shrinkStart).Round(time.Millisecond), removed, running)
	t.Logf("probe during the job update and the scaling: %s", scaleWindow)
	if scaleWindow.rate() < 0.999 {
		t.Errorf("probe success during the scaling %.3f%% < 99.9%%; failures:\n%s", 100*scaleWindow.rate(), scaleWindow.failureLines())
	}
	pr.stop()
	t.Logf("probe over the whole test: %s", pr.counts())
}
