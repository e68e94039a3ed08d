package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/supervise"
)

// Options are what the command line may set over the config file.
type Options struct {
	ConfigPath string
	StateDir   string   // overrides the config's agent.state_dir
	Socket     string   // overrides the config's agent.socket
	Exec       []string // argv prefix of steppe's exec trampoline (see supervise.ExecArg)
	Logger     *slog.Logger
	// Version is steppe's own version, which the agent reports and which
	// a release's steppe artifact is compared with (selfupgrade.go); ""
	// never upgrades itself.
	Version string
	// PIDFile, when set, is where the agent writes its pid as it starts
	// (a rolled-back self-upgrade runs the agent under another pid).
	PIDFile string
	// RestartedByInit says that an init system restarts the agent when it
	// dies: a failed self-upgrade leaves the restart to it.
	RestartedByInit bool
}

// Agent is a running machine agent.
type Agent struct {
	opts    Options
	log     *slog.Logger
	sup     *supervise.Supervisor
	started time.Time

	mu        sync.Mutex
	cfg       *Config
	configErr string
	bundle    *BundleStatus // nil: the machine pulls no bundle
	resolver  *resolver     // nil: resolv.conf is not the agent's (set before the API serves)
	// recoveries are the state recoveries of this agent's life (recover.go).
	recoveries []Recovery
	// binary is the file the agent runs from, which a self-upgrade
	// replaces; selfUpgrade is the last one's outcome.
	binary     string
	selfStatus *SelfUpgradeStatus

	// applyMu orders applies: the config reload and the pull loop both
	// hand the supervisor the whole set (the machine's services and the
	// running release's).
	applyMu sync.Mutex
	release *plan
}

// Run runs the agent until ctx is done, then stops every service in reverse
// dependency order. SIGHUP re-reads the config file and applies only the
// differences; an invalid file changes nothing and is reported in status.
func Run(ctx context.Context, opts Options) error {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	cfg, err := LoadConfig(opts.ConfigPath)
	if err != nil {
		return err
	}
	a := &Agent{opts: opts, log: log, cfg: cfg, started: time.Now()}
	a.override(cfg)

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	unlock, err := lockState(cfg.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	if a.binary, err = os.Executable(); err != nil {
		log.Warn("the agent's own binary is unknown: it cannot upgrade itself", "err", err)
	}
	if opts.PIDFile != "" {
		if err := atomicfile.WriteFile(opts.PIDFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
			return fmt.Errorf("pidfile: %w", err)
		}
	}
	trial, err := a.selfStart(cfg.StateDir)
	if err != nil {
		return err
	}

	a.sup, err = supervise.New(ctx, supervise.Options{
		StateDir:     filepath.Join(cfg.StateDir, "services"),
		CgroupParent: cfg.Cgroup,
		Exec:         opts.Exec,
		Logger:       log,
	})
	if err != nil {
		return fmt.Errorf("supervisor: %w", err)
	}

	// The bundle source is checked before the API answers: an agent that
	// is about to exit on its config must not look started to whoever
	// waits for its socket (a provider's Create took such an agent for
	// a healthy one).
	var pull *puller
	if cfg.Bundle != nil {
		if pull, err = a.newPuller(cfg); err != nil {
			a.sup.Close()
			return err
		}
	}
	ln, err := listenUnix(cfg.Socket)
	if err != nil {
		a.sup.Close()
		return err
	}
	if cfg.Resolver != nil {
		a.resolver = a.startResolver(ctx, cfg)
	}
	api := &apiServer{ctl: a.sup, status: a.Status, log: log}
	go api.serve(ctx, ln)
	log.Info("agent started", "version", opts.Version, "config", opts.ConfigPath, "state_dir", cfg.StateDir, "socket", cfg.Socket, "services", len(cfg.Services))

	finishMetrics := a.startMetrics(ctx, cfg)
	go a.watchStateFailures(ctx)

	// The first apply runs in the background so that the API answers while
	// services wait for their dependencies. The machine first runs what it
	// ran before (its last good release), whether the store answers or not.
	applied := make(chan error, 1)
	go func() {
		if pull == nil {
			applied <- a.applyOwn(ctx, cfg)
			return
		}
		// One apply of the machine's services together with the last good
		// release: an apply without the release would stop its services.
		if err := pull.boot(ctx); err != nil {
			log.Error("starting the last good release", "err", err)
			if trial != nil {
				// A new binary that cannot run the release is not committed.
				applied <- err
				return
			}
			if a.runningRelease() == nil {
				if err := a.applyOwn(ctx, cfg); err != nil {
					applied <- err
					return
				}
			}
		}
		applied <- nil
		if trial == nil {
			// The release may name another steppe than this one (a machine
			// made from an older binary): the bundle says what runs.
			a.selfUpgrade(ctx, pull.bootSteppe())
		}
		go pull.run(ctx)
	}()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	for done := false; !done; {
		select {
		case err := <-applied:
			if err != nil && ctx.Err() == nil {
				log.Error("apply config", "err", err)
				a.setConfigErr(err)
			}
			if err == nil && trial != nil {
				if err := a.commitSelf(ctx, trial, cfg); err != nil {
					log.Error("self-upgrade not committed", "err", err)
				}
			}
		case <-hup:
			if err := a.ReloadConfig(ctx); err != nil {
				log.Error("config reload refused; services keep running as they were", "err", err)
			}
		case <-ctx.Done():
			done = true
		}
	}

	if a.resolver != nil {
		a.resolver.stop()
	}
	log.Info("agent stopping every service")
	stopCtx, cancel := context.WithTimeout(context.Background(), a.shutdownBudget())
	defer cancel()
	shutdownErr := a.sup.Shutdown(stopCtx)
	if shutdownErr == nil {
		a.cleanDockerLeftovers()
	}
	finishMetrics()
	_ = ln.Close()
	_ = os.Remove(cfg.Socket)
	a.sup.Close()
	if shutdownErr != nil {
		return fmt.Errorf("stop services: %w", shutdownErr)
	}
	log.Info("agent stopped")
	return nil
}

func (a *Agent) override(cfg *Config) {
	if a.opts.StateDir != "" {
		cfg.StateDir = a.opts.StateDir
	}
	if a.opts.Socket != "" {
		cfg.Socket = a.opts.Socket
	}
}

// ReloadConfig re-reads the config file and applies the differences. The
// state dir, socket and cgroup cannot change under a running agent.
func (a *Agent) ReloadConfig(ctx context.Context) error {
	cfg, err := LoadConfig(a.opts.ConfigPath)
	if err == nil {
		a.override(cfg)
		a.mu.Lock()
		old := a.cfg
		a.mu.Unlock()
		switch {
		case cfg.StateDir != old.StateDir:
			err = fmt.Errorf("%s: agent.state_dir cannot change while the agent runs (restart it)", cfg.Path)
		case cfg.Socket != old.Socket:
			err = fmt.Errorf("%s: agent.socket cannot change while the agent runs (restart it)", cfg.Path)
		case cfg.Cgroup != old.Cgroup:
			err = fmt.Errorf("%s: agent.cgroup cannot change while the agent runs (restart it)", cfg.Path)
		case cfg.MetricsTextfile() != old.MetricsTextfile():
			err = fmt.Errorf("%s: metrics.textfile cannot change while the agent runs (restart it)", cfg.Path)
		case !sameResolver(cfg.Resolver, old.Resolver):
			err = fmt.Errorf("%s: the resolver block cannot change while the agent runs (restart it)", cfg.Path)
		}
	}
	if err == nil && !sameSource(cfg, a.currentConfig()) {
		err = fmt.Errorf("%s: the machine, bundle and artifacts blocks cannot change while the agent runs (restart it)", cfg.Path)
	}
	if err == nil {
		a.log.Info("config reloaded", "config", cfg.Path, "services", len(cfg.Services))
		err = a.applyOwn(ctx, cfg)
	}
	a.setConfigErr(err)
	return err
}

func (a *Agent) currentConfig() *Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg
}

func sameSource(x, y *Config) bool {
	bx, _ := json.Marshal([]any{x.Machine, x.Bundle, x.ArtifactKeys})
	by, _ := json.Marshal([]any{y.Machine, y.Bundle, y.ArtifactKeys})
	return string(bx) == string(by)
}

// applyOwn runs the services of cfg next to the running release, and makes
// cfg the agent's config once they run.
func (a *Agent) applyOwn(ctx context.Context, cfg *Config) error {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	if err := a.applyLocked(ctx, cfg.Services, a.release); err != nil {
		return err
	}
	a.mu.Lock()
	a.cfg = cfg
	a.mu.Unlock()
	return nil
}

// applyRelease runs release rel (nil: none) next to the machine's own services.
func (a *Agent) applyRelease(ctx context.Context, rel *plan) error {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	return a.applyLocked(ctx, a.currentConfig().Services, rel)
}

// applyLocked hands the supervisor the whole set, as it must run.
func (a *Agent) applyLocked(ctx context.Context, own []supervise.Spec, rel *plan) error {
	specs := slices.Clone(own)
	if rel != nil {
		for _, d := range rel.Services {
			specs = append(specs, d.Spec)
		}
	}
	// Whatever the outcome, the one-off work that led here (config parsing,
	// a release's verification and unpacking, or the start-up itself) is
	// over: its pages of the binary need not stay mapped.
	defer a.releasePages()
	if err := a.sup.Apply(ctx, specs); err != nil {
		return err
	}
	a.release = rel
	return nil
}

func (a *Agent) releasePages() {
	n, err := releaseExecutablePages()
	if err != nil {
		a.log.Warn("releasing the binary's startup pages", "err", err)
		return
	}
	a.log.Debug("released the mappings of the binary's read-only pages", "bytes", n)
}

func (a *Agent) runningRelease() *plan {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	return a.release
}

func (a *Agent) newPuller(cfg *Config) (*puller, error) {
	src := *cfg.Bundle
	keys, err := bundle.ReadPublicKeyFiles(src.Keys...)
	if err != nil {
		return nil, fmt.Errorf("bundle keys: %w", err)
	}
	var keyring *artifact.Keyring
	if len(cfg.ArtifactKeys) > 0 {
		if keyring, err = artifact.ReadKeyringFile(cfg.ArtifactKeys...); err != nil {
			return nil, fmt.Errorf("artifact keys: %w", err)
		}
	}
	store, err := bundle.OpenStore(src.Store, nil)
	if err != nil {
		return nil, err
	}
	// The floor its creator gave the machine: nothing at or below
	// MinVersion-1 is ever accepted, as if it had been.
	if src.MinVersion > 1 {
		dir := filepath.Join(cfg.StateDir, "bundle")
		if v, err := bundle.LoadAccepted(dir); err != nil {
			return nil, err
		} else if v < src.MinVersion-1 {
			if err := bundle.SaveAccepted(dir, src.MinVersion-1); err != nil {
				return nil, err
			}
		}
	}
	a.mu.Lock()
	a.bundle = &BundleStatus{Store: src.Store, Cluster: src.Cluster, Role: src.Role}
	a.mu.Unlock()
	return &puller{
		src:         src,
		facts:       dirTags(discoverFacts(cfg.Machine, cfg.Bundle), cfg.StateDir),
		dir:         cfg.StateDir,
		keys:        keys,
		keyring:     keyring,
		store:       store,
		fetcher:     &artifact.Fetcher{CacheDir: filepath.Join(cfg.StateDir, "artifacts"), Log: a.log},
		log:         a.log,
		sup:         a.sup,
		apply:       a.applyRelease,
		selfUpgrade: a.selfUpgrade,
		external: func() []string {
			var names []string
			for _, s := range a.currentConfig().Services {
				names = append(names, s.Name)
			}
			return names
		},
		onStatus: func(f func(*BundleStatus)) {
			a.mu.Lock()
			defer a.mu.Unlock()
			f(a.bundle)
		},
	}, nil
}

func (a *Agent) setConfigErr(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.configErr = ""
	if err != nil {
		a.configErr = err.Error()
	}
}

// Status reports the agent and every service.
func (a *Agent) Status() StatusReport {
	a.mu.Lock()
	cfg, cerr := a.cfg, a.configErr
	var self *SelfUpgradeStatus
	if a.selfStatus != nil {
		su := *a.selfStatus
		self = &su
	}
	recs := slices.Clone(a.recoveries)
	var bs *BundleStatus
	if a.bundle != nil {
		b := *a.bundle
		bs = &b
	}
	a.mu.Unlock()
	services := a.sup.Status()
	iso := ""
	if len(services) > 0 {
		iso = services[0].Isolation
	}
	return StatusReport{
		Agent: AgentInfo{
			PID:         os.Getpid(),
			Config:      cfg.Path,
			StateDir:    cfg.StateDir,
			StartedAt:   a.started,
			ConfigError: cerr,
			Isolation:   iso,
			Version:     a.opts.Version,
			Binary:      a.binary,
			SelfUpgrade: self,
		},
		Bundle:     bs,
		Services:   services,
		Resolver:   a.resolverStatus(),
		Recoveries: recs,
	}
}

// shutdownBudget is long enough for every service's stop timeout in turn.
func (a *Agent) shutdownBudget() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	total := 30 * time.Second
	for _, s := range a.cfg.Services {
		t := s.StopTimeout
		if t == 0 {
			t = 10 * time.Second
		}
		total += t
	}
	return total
}

// lockState makes sure one agent at a time owns a state dir: two would each
// believe they own the same services.
func lockState(dir string) (func(), error) {
	path := filepath.Join(dir, "agent.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("agent lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		return nil, fmt.Errorf("another agent (pid %s) holds %s: one agent per state dir", strings.TrimSpace(string(holder)), path)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}
