package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/supervise"
)

// The agent's own metrics are a file in the Prometheus text exposition
// format that node_exporter's textfile collector reads
// (--collector.textfile.directory): the agent serves no HTTP, and the
// file outlives an agent that died, whose last word it then is (the
// collector's node_textfile_mtime_seconds tells how old it is).
const (
	// metricsPoll is how often the writer looks for a change of state.
	metricsPoll = time.Second
	// metricsRefresh is how often the file is rewritten when nothing
	// changed, so that its mtime says the agent is alive.
	metricsRefresh = 15 * time.Second
)

// Classes of the last pull's error, the label of
// steppe_agent_bundle_last_pull_error: a short, fixed set, never the
// message (unbounded, and it may name a store's URL).
const (
	pullErrNone         = "none"
	pullErrStore        = "store"         // the store did not answer, or answered an error
	pullErrNotPublished = "not_published" // no bundle for the machine's cluster and role
	pullErrRefused      = "refused"       // signature, key, manifest or policy (stale, expired, other cluster)
	pullErrInstall      = "install"       // verified, but not installed: download cut, render, artifacts, health gate
)

// fetchErrorClass classifies an error of the store's fetch.
func fetchErrorClass(err error) string {
	if errors.Is(err, bundle.ErrNotFound) {
		return pullErrNotPublished
	}
	return pullErrStore
}

// installErrorClass classifies an error of a fetched bundle's install.
func installErrorClass(err error) string {
	var invalid *bundle.InvalidError
	if errors.As(err, &invalid) {
		return pullErrRefused
	}
	return pullErrInstall
}

// serviceStates are every state a service can be in, in the order the
// steppe_agent_service_state series list them.
func serviceStates() []supervise.State {
	return []supervise.State{
		supervise.StateStopped, supervise.StateWaiting, supervise.StateStarting, supervise.StateRunning,
		supervise.StateBackoff, supervise.StateStopping, supervise.StateFailed,
	}
}

// artifactInfo is one artifact the running release runs.
type artifactInfo struct {
	Product, Version, SHA256 string
}

// metricsWriter is the one writer of the textfile.
type metricsWriter struct {
	path      string
	status    func() StatusReport
	artifacts *artifactsCache
	log       *slog.Logger

	last    []byte
	written time.Time
	failing bool // the last write failed (logged once until one succeeds)
}

// run writes the file at once, then whenever what it says changes (looked
// at every metricsPoll) and at least every metricsRefresh, until ctx ends.
func (w *metricsWriter) run(ctx context.Context) {
	t := time.NewTicker(metricsPoll)
	defer t.Stop()
	for {
		w.update(false)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// update writes the file if its content changed, if force, or if it is
// due for a refresh.
func (w *metricsWriter) update(force bool) {
	st := w.status()
	var arts []artifactInfo
	if st.Bundle != nil {
		arts = w.artifacts.get(st.Bundle.Version)
	}
	b := renderMetrics(st, arts)
	if !force && bytes.Equal(b, w.last) && time.Since(w.written) < metricsRefresh {
		return
	}
	if err := w.write(b); err != nil {
		if !w.failing {
			w.log.Error("writing the metrics textfile", "path", w.path, "err", err)
		}
		w.failing = true
		return
	}
	if w.failing {
		w.log.Info("metrics textfile written again", "path", w.path)
	}
	w.failing = false
	w.last, w.written = b, time.Now()
}

func (w *metricsWriter) write(b []byte) error {
	// World-readable, as node_exporter often runs as its own user: the
	// file says nothing secret (no error message, no path, no token).
	if err := os.MkdirAll(filepath.Dir(w.path), 0o755); err != nil {
		return fmt.Errorf("metrics textfile: %w", err)
	}
	// The temporary name atomicfile writes first starts with "." and does
	// not end in ".prom": the collector never reads a half-written file.
	if err := atomicfile.WriteFile(w.path, b, 0o644); err != nil {
		return fmt.Errorf("metrics textfile: %w", err)
	}
	return nil
}

// expo builds a text exposition: each family's HELP and TYPE once, then
// its samples.
type expo struct {
	b bytes.Buffer
}

func (e *expo) family(name, typ, help string) {
	fmt.Fprintf(&e.b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

// sample writes one sample; labels are name, value pairs.
func (e *expo) sample(name string, value float64, labels ...string) {
	e.b.WriteString(name)
	if len(labels) > 0 {
		e.b.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				e.b.WriteByte(',')
			}
			e.b.WriteString(labels[i])
			e.b.WriteString(`="`)
			e.b.WriteString(escapeLabel(labels[i+1]))
			e.b.WriteByte('"')
		}
		e.b.WriteByte('}')
	}
	e.b.WriteByte(' ')
	e.b.WriteString(strconv.FormatFloat(value, 'g', -1, 64))
	e.b.WriteByte('\n')
}

// escapeLabel escapes a label value as the text format wants: backslash,
// double quote and line feed.
func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// renderMetrics is the textfile's content for a status report and the
// running release's artifacts. Nothing in it depends on the time it is
// made, so that an unchanged state renders the same bytes.
func renderMetrics(st StatusReport, artifacts []artifactInfo) []byte {
	var e expo
	e.family("steppe_agent_start_time_seconds", "gauge", "When the agent started, in seconds since the epoch.")
	e.sample("steppe_agent_start_time_seconds", float64(st.Agent.StartedAt.Unix()))
	e.family("steppe_agent_config_error", "gauge", "1 if the last config reload was refused (the services run on the config before it).")
	e.sample("steppe_agent_config_error", boolValue(st.Agent.ConfigError != ""))

	svcs := slices.Clone(st.Services)
	slices.SortFunc(svcs, func(a, b supervise.Status) int { return strings.Compare(a.Name, b.Name) })
	e.family("steppe_agent_service_state", "gauge", "1 for the state the service is in, 0 for the others.")
	states := serviceStates()
	for _, s := range svcs {
		for _, state := range states {
			e.sample("steppe_agent_service_state", boolValue(s.State == state), "service", s.Name, "state", string(state))
		}
	}
	series := []struct {
		name, typ, help string
		value           func(supervise.Status) float64
	}{
		{"steppe_agent_service_ready", "gauge", "1 if the service is running and ready.",
			func(s supervise.Status) float64 { return boolValue(s.Ready) }},
		{"steppe_agent_service_up", "gauge", "1 if the service's main process runs (it has a pid).",
			func(s supervise.Status) float64 { return boolValue(s.PID > 0) }},
		{"steppe_agent_service_processes", "gauge", "Processes in the service's cgroup.",
			func(s supervise.Status) float64 { return float64(s.Processes) }},
		{"steppe_agent_service_restarts_total", "counter", "Ends of the service that the agent restarted, since it first started it.",
			func(s supervise.Status) float64 { return float64(s.Restarts) }},
		{"steppe_agent_service_oom_kills_total", "counter", "Processes of the service killed by the kernel's OOM killer.",
			func(s supervise.Status) float64 { return float64(s.OOMKills) }},
	}
	for _, m := range series {
		e.family(m.name, m.typ, m.help)
		for _, s := range svcs {
			e.sample(m.name, m.value(s), "service", s.Name)
		}
	}

	if b := st.Bundle; b != nil {
		e.family("steppe_agent_bundle_version", "gauge", "The bundle version the machine runs (0: none yet).")
		e.sample("steppe_agent_bundle_version", float64(b.Version))
		e.family("steppe_agent_bundle_failed_version", "gauge", "The newest bundle version that failed and was rolled back (0: none).")
		e.sample("steppe_agent_bundle_failed_version", float64(b.Failed))
		e.family("steppe_agent_bundle_last_pull_timestamp_seconds", "gauge", "When the store last answered or failed to, in seconds since the epoch (0: never).")
		last := 0.0
		if !b.LastPull.IsZero() {
			last = float64(b.LastPull.Unix())
		}
		e.sample("steppe_agent_bundle_last_pull_timestamp_seconds", last)
		e.family("steppe_agent_bundle_last_pull_error", "gauge", "1 if the last pull failed, with the class of its error (the message is in steppe agent status).")
		class := b.LastErrorClass
		if b.LastError == "" {
			class = pullErrNone
		} else if class == "" {
			class = pullErrStore
		}
		e.sample("steppe_agent_bundle_last_pull_error", boolValue(b.LastError != ""), "class", class)
	}

	recoveryMetrics(&e, st)

	if len(artifacts) > 0 {
		e.family("steppe_agent_artifact_info", "gauge", "An artifact of the running release: product, version and the SHA-256 it was verified with.")
		for _, a := range artifacts {
			e.sample("steppe_agent_artifact_info", 1, "product", a.Product, "version", a.Version, "sha256", a.SHA256)
		}
	}
	return e.b.Bytes()
}

// releaseArtifacts lists the artifacts of release version as it runs
// them. The version of each comes from the release's manifest; its SHA-256
// from the manifest when it pins one, else from the path the release's
// services run the binary from: the artifact cache keeps each verified
// binary under the digest it was verified with (fetch/sha256/DIGEST/PRODUCT).
func releaseArtifacts(stateDir string, version uint64) ([]artifactInfo, error) {
	if version == 0 {
		return nil, nil
	}
	r, err := bundle.ReadRelease(filepath.Join(stateDir, "releases"), version)
	if err != nil {
		return nil, err
	}
	if len(r.Manifest.Artifacts) == 0 {
		return nil, nil
	}
	// The plan the pull loop persisted for the release (puller.planPath).
	b, err := os.ReadFile(filepath.Join(stateDir, "bundle", fmt.Sprintf("plan-%d.json", version)))
	if err != nil {
		return nil, fmt.Errorf("plan of release %d: %w", version, err)
	}
	var pl plan
	if err := json.Unmarshal(b, &pl); err != nil {
		return nil, fmt.Errorf("plan of release %d: %w", version, err)
	}
	prefix := filepath.Join(stateDir, "artifacts", "fetch", "sha256") + "/"
	digests := map[string]string{}
	for _, d := range pl.Services {
		for _, p := range append([]string{d.Spec.Command}, d.Spec.Args...) {
			rest, ok := strings.CutPrefix(p, prefix)
			if !ok {
				continue
			}
			if digest, name, ok := strings.Cut(rest, "/"); ok && !strings.Contains(name, "/") {
				digests[name] = digest
			}
		}
	}
	var out []artifactInfo
	for _, a := range r.Manifest.Artifacts {
		sum := a.SHA256
		if sum == "" {
			sum = digests[a.Product]
		}
		out = append(out, artifactInfo{Product: a.Product, Version: a.Version, SHA256: sum})
	}
	slices.SortFunc(out, func(a, b artifactInfo) int { return strings.Compare(a.Product, b.Product) })
	return out, nil
}

// artifactsCache remembers the artifacts of the running release, read once
// per release: the writer asks every second.
type artifactsCache struct {
	stateDir string
	log      *slog.Logger

	version uint64
	list    []artifactInfo
}

func (c *artifactsCache) get(version uint64) []artifactInfo {
	if version == c.version {
		return c.list
	}
	list, err := releaseArtifacts(c.stateDir, version)
	if err != nil {
		// Shown without artifacts; read again at the next release.
		c.log.Warn("metrics: artifacts of the running release", "version", version, "err", err)
	}
	c.version, c.list = version, list
	return list
}

// startMetrics starts the one writer of the metrics textfile, if the
// config names one. The function it returns waits for the writer to end
// (ctx done) and writes the file a last time: the services' states after
// the agent stopped them.
func (a *Agent) startMetrics(ctx context.Context, cfg *Config) (finish func()) {
	path := cfg.MetricsTextfile()
	if path == "" {
		return func() {}
	}
	w := &metricsWriter{
		path:      path,
		status:    a.Status,
		artifacts: &artifactsCache{stateDir: cfg.StateDir, log: a.log},
		log:       a.log,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.run(ctx)
	}()
	a.log.Info("writing metrics", "textfile", path)
	return func() {
		<-done
		w.update(true)
	}
}
