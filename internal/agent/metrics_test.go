package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

// TestMain makes the test binary its own exec trampoline, as steppe is
// for its agent: the supervisor starts a service with a memory limit on
// cgroup v1 through it.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == supervise.ExecArg {
		err := supervise.ExecMain(os.Args[2:])
		fmt.Fprintf(os.Stderr, "exec trampoline: %v\n", err)
		os.Exit(127)
	}
	os.Exit(m.Run())
}

// metricsAgent is a real agent run in this process, writing its metrics
// textfile.
type metricsAgent struct {
	t        *testing.T
	client   *Client
	textfile string
	logs     *syncBuffer
	stop     func() // stops the agent and waits for it
}

// runMetricsAgent runs an agent whose config is body (service and bundle
// blocks) plus a metrics block naming a textfile in a directory of its
// own, until stop or the end of the test.
func runMetricsAgent(t *testing.T, body string) *metricsAgent {
	t.Helper()
	testenv.NeedRoot(t, "the agent (cgroups)")
	dir := t.TempDir()
	m := &metricsAgent{t: t, textfile: filepath.Join(dir, "textfile", "steppe.prom"), logs: &syncBuffer{}}
	sock := filepath.Join(dir, "agent.sock")
	cfg := fmt.Sprintf(`
agent {
  state_dir = %q
  socket    = %q
  cgroup    = %q
}
machine {
  name    = "m1"
  address = "127.0.0.1"
}
metrics {
  textfile = %q
}
%s
`, filepath.Join(dir, "state"), sock, fmt.Sprintf("steppe-test/%s-%d", t.Name(), time.Now().UnixNano()), m.textfile, body)
	path := filepath.Join(dir, "agent.hcl")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{ConfigPath: path, Exec: []string{exe}, Logger: slog.New(slog.NewTextHandler(m.logs, nil))})
	}()
	stopped := false
	m.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("the agent did not stop within 30s")
		}
	}
	t.Cleanup(func() {
		m.stop()
		if t.Failed() {
			t.Logf("agent log:\n%s", m.logs)
		}
	})
	m.client = NewClient(sock)
	return m
}

// families parses the textfile with Prometheus's own parser (classic
// metric names only). The file is written atomically: a reader never sees
// a part of it, so any parse error fails the test.
func (m *metricsAgent) families() (map[string]*dto.MetricFamily, bool) {
	m.t.Helper()
	b, err := os.ReadFile(m.textfile)
	if os.IsNotExist(err) {
		return nil, false
	}
	if err != nil {
		m.t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		m.t.Fatalf("the metrics textfile does not parse: %v\n%s", err, b)
	}
	return fams, true
}

// waitMetrics waits until ok holds of the textfile's families.
func (m *metricsAgent) waitMetrics(what string, timeout time.Duration, ok func(f metricSet) bool) metricSet {
	m.t.Helper()
	deadline := time.Now().Add(timeout)
	var last metricSet
	for time.Now().Before(deadline) {
		if fams, found := m.families(); found {
			last = metricSet(fams)
			if ok(last) {
				return last
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	b, _ := os.ReadFile(m.textfile)
	m.t.Fatalf("%s: not within %v; textfile:\n%s", what, timeout, b)
	return last
}

// metricSet is a parsed exposition.
type metricSet map[string]*dto.MetricFamily

// value is the value of the sample of family name whose labels include
// labels (name, value pairs), and whether there is one.
func (s metricSet) value(name string, labels ...string) (float64, bool) {
	f, ok := s[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if v, ok := have[labels[i]]; !ok || v != labels[i+1] {
				continue next
			}
		}
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue(), true
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue(), true
		}
		return m.GetUntyped().GetValue(), true
	}
	return 0, false
}

// is says whether the sample exists and has value want.
func (s metricSet) is(want float64, name string, labels ...string) bool {
	v, ok := s.value(name, labels...)
	return ok && v == want
}

// state is the state whose steppe_agent_service_state sample is 1, and
// checks that exactly one is.
func (s metricSet) state(service string) string {
	var on []string
	for _, m := range s["steppe_agent_service_state"].GetMetric() {
		var svc, st string
		for _, l := range m.GetLabel() {
			switch l.GetName() {
			case "service":
				svc = l.GetValue()
			case "state":
				st = l.GetValue()
			}
		}
		if svc == service && m.GetGauge().GetValue() == 1 {
			on = append(on, st)
		}
	}
	if len(on) != 1 {
		return fmt.Sprintf("%d states at 1: %q", len(on), on)
	}
	return on[0]
}

// Services as the metrics show them: states, readiness, restarts of a
// service that is killed, OOM kills of one over its memory limit (a cgroup
// v1 memory limit here, through the exec trampoline), counters typed as
// counters; the file is rewritten when nothing changes, and after the
// agent stops it says every service is stopped.
func TestMetricsServices(t *testing.T) {
	dir := t.TempDir()
	runs := filepath.Join(dir, "hog-runs")
	// The hog's first run allocates 200 MiB under a limit of 32 MiB; the
	// runs after it sleep.
	hog := fmt.Sprintf(`echo >> %s; if [ $(wc -l < %s) -ge 2 ]; then exec /bin/sleep 3600; fi; exec /usr/bin/python3 -c "b = b'x' * (200 << 20); print('survived', len(b))"`, runs, runs)
	m := runMetricsAgent(t, fmt.Sprintf(`
service "steady" {
  command = "/bin/sleep"
  args    = ["3600"]
}
service "victim" {
  command     = "/bin/sleep"
  args        = ["3600"]
  backoff_min = "10ms"
}
service "hog" {
  command     = "/bin/sh"
  args        = ["-c", %q]
  memory_max  = "32MiB"
  backoff_min = "10ms"
}
`, hog))
	s := m.waitMetrics("every service running", 20*time.Second, func(s metricSet) bool {
		return s.state("steady") == "running" && s.state("victim") == "running" && s.state("hog") == "running"
	})
	for _, svc := range []string{"steady", "victim"} {
		for _, want := range []struct {
			name  string
			value float64
		}{
			{"steppe_agent_service_ready", 1}, {"steppe_agent_service_up", 1}, {"steppe_agent_service_processes", 1},
			{"steppe_agent_service_restarts_total", 0}, {"steppe_agent_service_oom_kills_total", 0},
		} {
			if v, ok := s.value(want.name, "service", svc); !ok || v != want.value {
				t.Errorf("%s{service=%q} = %v (present %v), want %v", want.name, svc, v, ok, want.value)
			}
		}
	}
	for _, name := range []string{"steppe_agent_service_restarts_total", "steppe_agent_service_oom_kills_total"} {
		if typ := s[name].GetType(); typ != dto.MetricType_COUNTER {
			t.Errorf("%s is a %v, want a counter", name, typ)
		}
	}
	if _, ok := s["steppe_agent_bundle_version"]; ok {
		t.Errorf("bundle series from an agent that pulls no bundle")
	}
	if v, ok := s.value("steppe_agent_start_time_seconds"); !ok || time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("steppe_agent_start_time_seconds = %v (present %v)", v, ok)
	}

	// The hog was killed by the OOM killer once, and restarted.
	m.waitMetrics("the hog's OOM kill", 20*time.Second, func(s metricSet) bool {
		return s.is(1, "steppe_agent_service_oom_kills_total", "service", "hog") &&
			s.is(1, "steppe_agent_service_restarts_total", "service", "hog") && s.state("hog") == "running"
	})

	// A killed service is restarted: the counter says so.
	st, err := m.client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pid := 0
	for _, svc := range st.Services {
		if svc.Name == "victim" {
			pid = svc.PID
		}
	}
	if pid == 0 {
		t.Fatalf("no pid for victim in %+v", st.Services)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	m.waitMetrics("victim's restart", 20*time.Second, func(s metricSet) bool {
		return s.is(1, "steppe_agent_service_restarts_total", "service", "victim") && s.state("victim") == "running" &&
			s.is(0, "steppe_agent_service_oom_kills_total", "service", "victim") && s.is(0, "steppe_agent_service_restarts_total", "service", "steady")
	})

	// Nothing changes, and the file is written again all the same: its
	// mtime says the agent is alive.
	fi, err := os.Stat(m.textfile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("textfile mode %v, want 0644 (node_exporter may run as its own user)", fi.Mode().Perm())
	}
	deadline := time.Now().Add(metricsRefresh + 5*time.Second)
	for {
		fi2, err := os.Stat(m.textfile)
		if err != nil {
			t.Fatal(err)
		}
		if fi2.ModTime().After(fi.ModTime()) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the textfile was not rewritten within %v", metricsRefresh+5*time.Second)
		}
		time.Sleep(500 * time.Millisecond)
	}
	ents, err := os.ReadDir(filepath.Dir(m.textfile))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != "steppe.prom" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("the textfile directory holds %q, want only steppe.prom", names)
	}

	// The agent stops its services; its last word says so.
	m.stop()
	s, _ = m.families()
	for _, svc := range []string{"steady", "victim", "hog"} {
		if got := s.state(svc); got != "stopped" || !s.is(0, "steppe_agent_service_up", "service", svc) {
			t.Errorf("after the agent stopped: %s is %s, up present and 0: %v", svc, got, s.is(0, "steppe_agent_service_up", "service", svc))
		}
	}
}

// The bundle as the metrics show it: the last pull's error by class (none
// published yet; then a bundle refused for its signature), cleared once a
// good release runs; its version, the time of the last pull, and the
// release's artifact with the SHA-256 it was verified with.
func TestMetricsBundle(t *testing.T) {
	s := newTestStore(t)
	sleeper, sum := serveSleeper(t)
	m := runMetricsAgent(t, fmt.Sprintf(`
bundle {
  store          = %q
  cluster        = "c1"
  role           = "web"
  keys           = [%q]
  wait           = "1s"
  health_timeout = "10s"
}
`, s.url, s.pubFile))
	m.waitMetrics("nothing published", 20*time.Second, func(ms metricSet) bool {
		return ms.is(1, "steppe_agent_bundle_last_pull_error", "class", "not_published") && ms.is(0, "steppe_agent_bundle_version")
	})
	s.publish(changeManifest(t, s.build(1, nil)))
	m.waitMetrics("the changed bundle refused", 20*time.Second, func(ms metricSet) bool {
		return ms.is(1, "steppe_agent_bundle_last_pull_error", "class", "refused") && ms.is(0, "steppe_agent_bundle_version")
	})

	s.publish(buildWithArtifact(t, s, 2, sleeper, sum))
	ms := m.waitMetrics("release 2 running", 20*time.Second, func(ms metricSet) bool {
		return ms.is(2, "steppe_agent_bundle_version") && ms.state("hello") == "running"
	})
	if !ms.is(0, "steppe_agent_bundle_last_pull_error", "class", "none") || len(ms["steppe_agent_bundle_last_pull_error"].GetMetric()) != 1 {
		t.Errorf("the pull error did not clear: %v", ms["steppe_agent_bundle_last_pull_error"])
	}
	if !ms.is(1, "steppe_agent_artifact_info", "product", "sleeper", "version", "1.0.0", "sha256", sum) {
		t.Errorf("no artifact_info for sleeper 1.0.0 %s: %v", sum, ms["steppe_agent_artifact_info"])
	}
	if v, ok := ms.value("steppe_agent_bundle_last_pull_timestamp_seconds"); !ok || time.Since(time.Unix(int64(v), 0)) > 30*time.Second {
		t.Errorf("steppe_agent_bundle_last_pull_timestamp_seconds = %v (present %v), want within 30 s", v, ok)
	}
}

// serveSleeper serves a copy of /bin/sleep on loopback; it returns its
// URL and SHA-256.
func serveSleeper(t *testing.T) (string, string) {
	t.Helper()
	b, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(b) }))
	t.Cleanup(srv.Close)
	return srv.URL + "/sleeper", hex.EncodeToString(h[:])
}

// buildWithArtifact packs a bundle for c1/web of version v whose service
// runs the artifact sleeper, fetched from url with its pinned sum.
func buildWithArtifact(t *testing.T, s *testStore, v uint64, url, sum string) []byte {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "services"), 0o755); err != nil {
		t.Fatal(err)
	}
	svc := "service \"hello\" {\n  command = artifact.sleeper\n  args = [\"3600\"]\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "services", "steppe.hcl"), []byte(svc), 0o644); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	var buf bytes.Buffer
	if _, err := bundle.Build(&buf, dir, bundle.Manifest{
		Cluster: "c1", Role: "web", Version: v, Created: now.Add(-time.Minute), Expires: now.Add(time.Hour),
		Artifacts: []bundle.Artifact{{Product: "sleeper", Version: "1.0.0", URL: url, SHA256: sum}},
	}, &s.key); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// The metrics block: a default below the state dir that follows it, off
// with "", and clear errors for a file the collector would never read.
func TestMetricsConfig(t *testing.T) {
	cfg, err := ParseConfig("a.hcl", []byte("agent {\n  state_dir = \"/srv/steppe\"\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.MetricsTextfile(); got != "/srv/steppe/metrics/steppe.prom" {
		t.Errorf("default textfile %q", got)
	}
	cfg.StateDir = "/other" // as -state-dir overrides it
	if got := cfg.MetricsTextfile(); got != "/other/metrics/steppe.prom" {
		t.Errorf("default textfile after a state dir override: %q", got)
	}
	cfg, err = ParseConfig("a.hcl", []byte("metrics {\n  textfile = \"\"\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.MetricsTextfile(); got != "" {
		t.Errorf("textfile turned off: %q", got)
	}
	for _, bad := range []string{"steppe.prom", "/var/lib/node_exporter/steppe.txt", "/var/lib/node_exporter/.prom"} {
		_, err := ParseConfig("a.hcl", []byte(fmt.Sprintf("metrics {\n  textfile = %q\n}\n", bad)))
		if err == nil || !strings.Contains(err.Error(), "a.hcl:2:") || !strings.Contains(err.Error(), `ending in ".prom"`) {
			t.Errorf("textfile %q: %v", bad, err)
		}
	}
}
