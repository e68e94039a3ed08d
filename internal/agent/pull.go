package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/zclconf/go-cty/cty"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/backoff"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/render"
	"github.com/steppe/steppe/internal/supervise"
)

// plan is a release resolved for this machine: its services with every
// path made absolute, and a digest per service of what it reads. It is
// persisted, so that the last good release can be run again at boot or on
// rollback without the stores.
type plan struct {
	Version  uint64       `json:"version"`
	Services []serviceDef `json:"services"`
	// Digests are per service: the files it reads, after rendering.
	Digests map[string]string `json:"digests"`
	// Steppe is the agent's own binary the release names (selfupgrade.go).
	Steppe *steppeArtifact `json:"steppe,omitempty"`
}

// steppeArtifact is a verified steppe binary of a release.
type steppeArtifact struct {
	Version string `json:"version"`
	Path    string `json:"path"`
}

// bundleState is the pull loop's persistent record.
type bundleState struct {
	// Good is the release that last passed its health gate.
	Good uint64 `json:"good"`
	// Pending is the release being applied: non-zero after a crash in the
	// middle of an apply, which the next start finishes.
	Pending  uint64 `json:"pending,omitempty"`
	Attempts int    `json:"attempts,omitempty"`
	// Failed is the newest release that failed, and why. It is not tried
	// again: only a newer version is.
	Failed      uint64 `json:"failed,omitempty"`
	FailedError string `json:"failed_error,omitempty"`
}

// BundleStatus is the bundle part of the agent's status.
type BundleStatus struct {
	Store       string    `json:"store"`
	Cluster     string    `json:"cluster"`
	Role        string    `json:"role"`
	Version     uint64    `json:"version"`           // the running release
	Pending     uint64    `json:"pending,omitempty"` // being applied
	LastPull    time.Time `json:"last_pull,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	Failed      uint64    `json:"failed,omitempty"`
	FailedError string    `json:"failed_error,omitempty"`

	// LastErrorClass is a short, fixed class of LastError, for metrics.
	LastErrorClass string `json:"last_error_class,omitempty"`
}

// maxPendingAttempts bounds how often a release whose apply was cut short
// (the agent was killed) is tried again before it counts as failed.
const maxPendingAttempts = 3

// puller pulls, verifies, renders, fetches and applies releases.
type puller struct {
	src      BundleSource
	facts    render.Facts
	dir      string // the agent's state dir
	keys     []bundle.PublicKey
	keyring  *artifact.Keyring
	store    bundle.Store
	fetcher  *artifact.Fetcher
	log      *slog.Logger
	apply    func(ctx context.Context, p *plan) error // supervise the plan's services with the machine's own
	external func() []string                          // the machine's own services' names
	sup      readiness
	onStatus func(func(*BundleStatus))
	// selfUpgrade moves the agent to a release's steppe binary; it does not
	// return when it execs it.
	selfUpgrade func(ctx context.Context, art *steppeArtifact)
}

// readiness is what the health gate needs of the supervisor.
type readiness interface {
	WaitReady(ctx context.Context, names ...string) error
	Reload(ctx context.Context, name string) error
	Status() []supervise.Status
}

func (p *puller) releasesDir() string { return filepath.Join(p.dir, "releases") }
func (p *puller) bundleDir() string   { return filepath.Join(p.dir, "bundle") }

func (p *puller) planPath(v uint64) string {
	return filepath.Join(p.bundleDir(), fmt.Sprintf("plan-%d.json", v))
}

func (p *puller) loadState() (bundleState, error) {
	var st bundleState
	b, err := os.ReadFile(filepath.Join(p.bundleDir(), "state.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("bundle state: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("bundle state %s: %w", filepath.Join(p.bundleDir(), "state.json"), err)
	}
	return st, nil
}

func (p *puller) saveState(st bundleState) error {
	if err := writeJSONAtomic(filepath.Join(p.bundleDir(), "state.json"), st); err != nil {
		return fmt.Errorf("bundle state: %w", err)
	}
	p.onStatus(func(bs *BundleStatus) {
		bs.Version, bs.Pending, bs.Failed, bs.FailedError = st.Good, st.Pending, st.Failed, st.FailedError
	})
	return nil
}

func (p *puller) loadPlan(v uint64) (*plan, error) {
	b, err := os.ReadFile(p.planPath(v))
	if err != nil {
		return nil, fmt.Errorf("plan of release %d: %w", v, err)
	}
	var pl plan
	if err := json.Unmarshal(b, &pl); err != nil {
		return nil, fmt.Errorf("plan of release %d: %w", v, err)
	}
	return &pl, nil
}

// boot runs what the machine ran before the agent started: the last good
// release, or the one whose apply a crash cut short. No store is needed.
func (p *puller) boot(ctx context.Context) error {
	st, err := p.loadState()
	if err != nil {
		return err
	}
	p.onStatus(func(bs *BundleStatus) {
		bs.Version, bs.Pending, bs.Failed, bs.FailedError = st.Good, st.Pending, st.Failed, st.FailedError
	})
	if st.Pending != 0 {
		if st.Attempts >= maxPendingAttempts {
			p.log.Error("release was cut short too often; rolling back", "version", st.Pending, "attempts", st.Attempts)
			v := st.Pending
			err := p.fail(ctx, st, v, fmt.Errorf("apply was cut short %d times (the agent died during it)", st.Attempts))
			return errors.Join(err, bundle.SaveAccepted(p.bundleDir(), v))
		}
		pl, err := p.loadPlan(st.Pending)
		if err == nil {
			p.log.Info("finishing the apply a restart cut short", "version", st.Pending)
			err := p.commit(ctx, st, pl)
			return errors.Join(err, bundle.SaveAccepted(p.bundleDir(), pl.Version))
		}
		// Killed before the plan was written: nothing of it ran.
		st.Pending, st.Attempts = 0, 0
		if err := p.saveState(st); err != nil {
			return err
		}
	}
	if st.Good == 0 {
		return p.apply(ctx, nil)
	}
	pl, err := p.loadPlan(st.Good)
	if err != nil {
		return err
	}
	if err := bundle.Activate(p.releasesDir(), st.Good); err != nil {
		return err
	}
	return p.apply(ctx, pl)
}

// bootSteppe is the steppe binary the last good release names, nil if none.
func (p *puller) bootSteppe() *steppeArtifact {
	st, err := p.loadState()
	if err != nil || st.Good == 0 {
		return nil
	}
	pl, err := p.loadPlan(st.Good)
	if err != nil {
		return nil
	}
	return pl.Steppe
}

// run pulls until ctx ends. Errors never stop it: the machine keeps
// running its last good release and the error shows in status.
func (p *puller) run(ctx context.Context) {
	etag := ""
	fails := 0 // in a row, pulls and installs alike
	// 250ms first, doubling up to 30s, up to half off at random: a store
	// away for a moment is asked again soon, one away for long seldom,
	// and machines that lost it together do not come back in step.
	pause := backoff.Policy{Min: 250 * time.Millisecond, Max: 30 * time.Second, Factor: 2, Jitter: 0.5}
	for ctx.Err() == nil {
		f, err := p.store.Fetch(ctx, p.src.Cluster, p.src.Role, etag, p.src.Wait)
		now := time.Now()
		class := fetchErrorClass(err) // before err is reworded
		switch {
		case errors.Is(err, bundle.ErrNotModified):
			p.onStatus(func(bs *BundleStatus) { bs.LastPull = now })
			fails = 0
			continue
		case errors.Is(err, bundle.ErrNotFound):
			err = fmt.Errorf("no bundle published yet for %s/%s at %s", p.src.Cluster, p.src.Role, p.src.Store)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			p.onStatus(func(bs *BundleStatus) { bs.LastPull, bs.LastError, bs.LastErrorClass = now, err.Error(), class })
			delay := pause.Delay(fails)
			fails++
			p.log.Warn("pull failed; running the last good release", "err", err, "retry_in", delay.Round(time.Millisecond))
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			continue
		}
		retry, err := p.install(ctx, f)
		f.Body.Close()
		var stale *bundle.StaleError
		if etag == "" && errors.As(err, &stale) && stale.Version == stale.After && p.running(stale.Version) {
			// The first pull of a restarted agent fetches the release it
			// already runs: nothing to do, and nothing wrong.
			err = nil
		}
		// The tag is kept when the bundle was refused for what it is: the
		// same bytes would be refused again, so only a new publish is worth
		// a fetch. A failure that may pass (a cut download, a full disk, an
		// artifact store away) is tried again after a pause, and so is a
		// refused bundle whose store gives no tag to wait on.
		etag = f.ETag
		if err != nil && retry {
			etag = ""
		}
		p.onStatus(func(bs *BundleStatus) {
			bs.LastPull, bs.LastError, bs.LastErrorClass = now, "", ""
			if err != nil {
				bs.LastError, bs.LastErrorClass = err.Error(), installErrorClass(err)
			}
		})
		if err == nil || ctx.Err() != nil {
			fails = 0
			continue
		}
		if !retry && etag != "" {
			fails = 0
			p.log.Error("bundle refused; running the last good release until a new one is published", "err", err)
			continue
		}
		// One backoff for pulls and installs: it grows while fetches
		// succeed and installs fail, so a store that cuts every download
		// is not asked for the whole bundle four times a second.
		delay := pause.Delay(fails)
		fails++
		p.log.Warn("bundle not installed; running the last good release", "err", err, "retry_in", delay.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
}

// running says whether version is the release the machine runs.
func (p *puller) running(version uint64) bool {
	st, err := p.loadState()
	return err == nil && st.Good == version && st.Pending == 0
}

// install takes one fetched bundle to the running release, or refuses it
// and leaves the machine as it was. retry says whether the same bundle is
// worth fetching again: a download cut short, a full disk or a failed
// artifact download may pass later; a bad signature, a manifest or policy
// refusal (bundle.InvalidError) or a release that ran and was rolled back
// will not.
func (p *puller) install(ctx context.Context, f *bundle.Fetched) (retry bool, err error) {
	st, err := p.loadState()
	if err != nil {
		return true, err
	}
	after, err := bundle.LoadAccepted(p.bundleDir())
	if err != nil {
		return true, err
	}
	rel, err := bundle.Unpack(ctx, f.Body, p.releasesDir(), bundle.Policy{
		Keys: p.keys, Cluster: p.src.Cluster, Role: p.src.Role, After: after,
	})
	if err != nil {
		var invalid *bundle.InvalidError
		return !errors.As(err, &invalid), fmt.Errorf("bundle from %s: %w", p.src.Store, err)
	}
	p.log.Info("bundle verified", "version", rel.Version, "key", rel.KeyID)
	pl, err := p.prepare(ctx, rel)
	if err != nil {
		_ = bundle.Remove(p.releasesDir(), rel.Version)
		return true, fmt.Errorf("release %d: %w", rel.Version, err)
	}
	// The version is accepted only once its outcome is durable (running,
	// or failed and rolled back): a crash before that fetches it again.
	// From then on no version at or below it is accepted: a replayed
	// bundle cannot roll a machine back.
	err = p.commit(ctx, st, pl)
	if aerr := bundle.SaveAccepted(p.bundleDir(), rel.Version); aerr != nil {
		return false, errors.Join(err, aerr)
	}
	if err == nil && p.selfUpgrade != nil {
		// The release runs and is accepted: the new binary boots into it.
		p.selfUpgrade(ctx, pl.Steppe)
	}
	return false, err
}

// prepare renders a release's templates, fetches its artifacts and
// resolves its services, changing nothing that runs.
func (p *puller) prepare(ctx context.Context, rel *bundle.Release) (*plan, error) {
	m := rel.Manifest
	if _, err := render.Render(rel.Dir, m.Templates, p.facts, m.Variables); err != nil {
		return nil, err
	}
	binaries := map[string]string{}
	var steppe *steppeArtifact
	for _, a := range m.Artifacts {
		var path string
		var err error
		if a.URL != "" {
			path, err = p.fetcher.FetchURL(ctx, a.URL, a.SHA256, a.Product)
		} else {
			if p.keyring == nil {
				return nil, fmt.Errorf("artifact %s %s: the agent trusts no artifact signing key (artifacts { keys = [...] })", a.Product, a.Version)
			}
			path, err = p.fetcher.Fetch(ctx, a.Store, a.Product, a.Version, runtime.GOOS, runtime.GOARCH, p.keyring)
		}
		if err != nil {
			return nil, fmt.Errorf("artifact %s %s: %w", a.Product, a.Version, err)
		}
		if a.Product == SteppeProduct {
			// The agent's own binary: no service runs it.
			steppe = &steppeArtifact{Version: a.Version, Path: path}
			continue
		}
		binaries[a.Product] = path
	}
	current := filepath.Join(p.releasesDir(), bundle.CurrentName)
	resolve := func(cmd string) (string, error) {
		if filepath.IsAbs(cmd) {
			return cmd, checkExecutable(cmd)
		}
		// A program shipped in the bundle runs from the stable path, so
		// that a release which does not change it does not restart it.
		if err := checkExecutable(filepath.Join(rel.Dir, cmd)); err != nil {
			return "", err
		}
		return filepath.Join(current, cmd), nil
	}
	var files []sourceFile
	for _, name := range m.Services {
		src, err := os.ReadFile(filepath.Join(rel.Dir, filepath.FromSlash(name)))
		if err != nil {
			return nil, fmt.Errorf("service file: %w", err)
		}
		files = append(files, sourceFile{Path: name, Src: src})
	}
	defs, err := parseBundleServices(files, p.external(), p.serviceVars(current, binaries), resolve)
	if err != nil {
		return nil, err
	}
	pl := &plan{Version: rel.Version, Digests: map[string]string{}, Steppe: steppe}
	for _, d := range defs {
		if d.Spec.Dir == "" {
			d.Spec.Dir = current
		} else if err := os.MkdirAll(d.Spec.Dir, 0o700); err != nil {
			// A service's own directory (Vault's raft store) is made
			// for it, as systemd makes a StateDirectory.
			return nil, fmt.Errorf("service %s: %w", d.Spec.Name, err)
		}
		digest, err := filesDigest(rel.Dir, d)
		if err != nil {
			return nil, fmt.Errorf("service %s: %w", d.Spec.Name, err)
		}
		pl.Digests[d.Spec.Name] = digest
		if d.OnChange == "restart" {
			// The digest in the environment makes the supervisor restart
			// the service exactly when what it reads changed.
			d.Spec.Env = append(d.Spec.Env, "STEPPE_CONFIG_DIGEST="+digest)
		}
		pl.Services = append(pl.Services, d)
	}
	if err := writeJSONAtomic(p.planPath(rel.Version), pl); err != nil {
		return nil, fmt.Errorf("plan: %w", err)
	}
	return pl, nil
}

// serviceVars are what a bundle's service files may refer to:
//
//	release      the current release, through a stable path: a service
//	             that reloads must read its files through it
//	data         a directory of the machine's that outlives releases
//	secrets      where the provider delivered the machine's secrets
//	             (the secrets_dir tag of templates)
//	artifact.X   the installed binary of the bundle's artifact X
//	machine.X    the machine's facts (name, address, pool, region,
//	             datacenter, role, cluster)
func (p *puller) serviceVars(current string, binaries map[string]string) *hcl.EvalContext {
	arts := map[string]cty.Value{}
	for name, path := range binaries {
		arts[name] = cty.StringVal(path)
	}
	f := p.facts
	return &hcl.EvalContext{Variables: map[string]cty.Value{
		"release":  cty.StringVal(current),
		"data":     cty.StringVal(filepath.Join(p.dir, "data")),
		"secrets":  cty.StringVal(filepath.Join(p.dir, "secrets")),
		"artifact": cty.ObjectVal(arts),
		"machine": cty.ObjectVal(map[string]cty.Value{
			"name": cty.StringVal(f.Name), "address": cty.StringVal(f.Address), "pool": cty.StringVal(f.Pool),
			"region": cty.StringVal(f.Region), "datacenter": cty.StringVal(f.Datacenter),
			"role": cty.StringVal(f.Role), "cluster": cty.StringVal(f.Cluster),
		}),
	}}
}

// filesDigest hashes what a service reads: its files (directories walked),
// and its program when the bundle ships it.
func filesDigest(releaseDir string, d serviceDef) (string, error) {
	h := sha256.New()
	var paths []string
	for _, f := range d.Files {
		root := filepath.Join(releaseDir, filepath.FromSlash(f))
		err := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if e.Type().IsRegular() {
				paths = append(paths, path)
			}
			return nil
		})
		if err != nil {
			return "", fmt.Errorf("files %q: %w", f, err)
		}
	}
	if rel, ok := strings.CutPrefix(d.Spec.Command, filepath.Join(filepath.Dir(releaseDir), bundle.CurrentName)+"/"); ok {
		paths = append(paths, filepath.Join(releaseDir, rel))
	}
	slices.Sort(paths)
	for _, path := range slices.Compact(paths) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", err
		}
		rel, _ := filepath.Rel(releaseDir, path)
		fmt.Fprintf(h, "%s\x00%d\x00", rel, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// commit switches to a prepared release, runs it, and keeps it only if it
// passes the health gate; otherwise the last good release runs again.
func (p *puller) commit(ctx context.Context, st bundleState, pl *plan) error {
	st.Pending = pl.Version
	st.Attempts++
	if err := p.saveState(st); err != nil {
		return err
	}
	var prev *plan
	if st.Good != 0 {
		prev, _ = p.loadPlan(st.Good)
	}
	if err := bundle.Activate(p.releasesDir(), pl.Version); err != nil {
		return err
	}
	if err := p.switchTo(ctx, prev, pl); err != nil {
		return p.fail(ctx, st, pl.Version, err)
	}
	st.Good, st.Pending, st.Attempts = pl.Version, 0, 0
	if err := p.saveState(st); err != nil {
		return err
	}
	p.log.Info("release running", "version", pl.Version)
	p.prune(st)
	return nil
}

// switchTo applies pl over what runs (prev), reloads what asks for a
// reload, then gates on readiness.
func (p *puller) switchTo(ctx context.Context, prev, pl *plan) error {
	if err := p.apply(ctx, pl); err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	for _, d := range pl.Services {
		if d.OnChange != "reload" || prev == nil {
			continue
		}
		if old, ok := prev.Digests[d.Spec.Name]; ok && old != pl.Digests[d.Spec.Name] {
			p.log.Info("reloading for changed files", "service", d.Spec.Name)
			if err := p.sup.Reload(ctx, d.Spec.Name); err != nil {
				return fmt.Errorf("reload %s: %w", d.Spec.Name, err)
			}
		}
	}
	return p.gate(ctx, pl)
}

// gate waits until every service of the release is ready, and fails with
// the services that are not and why.
func (p *puller) gate(ctx context.Context, pl *plan) error {
	names := make([]string, 0, len(pl.Services))
	for _, d := range pl.Services {
		names = append(names, d.Spec.Name)
	}
	gctx, cancel := context.WithTimeout(ctx, p.src.HealthTimeout)
	defer cancel()
	err := p.sup.WaitReady(gctx, names...)
	if err == nil {
		return nil
	}
	var bad []string
	for _, s := range p.sup.Status() {
		if slices.Contains(names, s.Name) && !s.Ready {
			why := string(s.State)
			if s.LastError != "" {
				why += ": " + s.LastError
			} else if s.LastExit != "" {
				why += ", last exit " + s.LastExit
			}
			bad = append(bad, fmt.Sprintf("%s (%s)", s.Name, why))
		}
	}
	if len(bad) == 0 {
		return fmt.Errorf("health gate: %w", err)
	}
	return fmt.Errorf("health gate: not ready within %v: %s", p.src.HealthTimeout, strings.Join(bad, "; "))
}

// fail rolls back to the last good release and records why version failed.
func (p *puller) fail(ctx context.Context, st bundleState, version uint64, cause error) error {
	p.log.Error("release failed; rolling back", "version", version, "err", cause, "to", st.Good)
	st.Failed, st.FailedError = version, cause.Error()
	st.Pending, st.Attempts = 0, 0
	if st.Good != 0 {
		good, err := p.loadPlan(st.Good)
		if err != nil {
			return errors.Join(cause, fmt.Errorf("rollback: %w", err))
		}
		if err := bundle.Activate(p.releasesDir(), st.Good); err != nil {
			return errors.Join(cause, fmt.Errorf("rollback: %w", err))
		}
		failed, _ := p.loadPlan(version)
		if err := p.switchTo(ctx, failed, good); err != nil {
			p.log.Error("the last good release is not healthy either", "version", st.Good, "err", err)
		}
	} else {
		// Nothing good to go back to: run no bundle service at all.
		if err := p.apply(ctx, &plan{}); err != nil {
			return errors.Join(cause, fmt.Errorf("rollback: %w", err))
		}
	}
	if err := p.saveState(st); err != nil {
		return errors.Join(cause, err)
	}
	_ = bundle.Remove(p.releasesDir(), version)
	_ = os.Remove(p.planPath(version))
	return fmt.Errorf("release %d rolled back to %d: %w", version, st.Good, cause)
}

func (p *puller) prune(st bundleState) {
	removed, err := bundle.Prune(p.releasesDir(), p.src.Keep)
	if err != nil {
		p.log.Warn("prune releases", "err", err)
	}
	for _, v := range removed {
		if v != st.Good {
			_ = os.Remove(p.planPath(v))
		}
	}
}

// discoverFacts fills what the machine block left out.
func discoverFacts(m Machine, src *BundleSource) render.Facts {
	f := render.Facts{
		Name: m.Name, Address: m.Address, Pool: m.Pool, Region: m.Region,
		Datacenter: m.Datacenter, Tags: m.Tags,
	}
	if f.Name == "" {
		f.Name, _ = os.Hostname()
	}
	if f.Address == "" {
		f.Address = firstAddress()
	}
	if f.Region == "" {
		f.Region = "global"
	}
	if f.Datacenter == "" {
		f.Datacenter = "dc1"
	}
	if src != nil {
		f.Cluster, f.Role = src.Cluster, src.Role
	}
	return f
}

// dirTags gives templates the machine's directories, as tags the config
// may also set: data_dir outlives releases, config_dir is the stable path
// of the current release, secrets_dir holds what the provider delivered.
func dirTags(f render.Facts, stateDir string) render.Facts {
	tags := map[string]string{
		"data_dir":    filepath.Join(stateDir, "data"),
		"config_dir":  filepath.Join(stateDir, "releases", bundle.CurrentName),
		"secrets_dir": filepath.Join(stateDir, "secrets"),
	}
	for k, v := range f.Tags {
		tags[k] = v
	}
	f.Tags = tags
	return f
}

// firstAddress is the machine's first non-loopback IPv4 address, or
// 127.0.0.1 on a machine with none.
func firstAddress() string {
	ifs, _ := net.Interfaces()
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
				return ipn.IP.String()
			}
		}
	}
	return "127.0.0.1"
}

func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b, 0o600)
}
