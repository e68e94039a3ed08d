package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/supervise"
)

// Options are what the command line may set over the config file.
type Options struct {
	ConfigPath string
	StateDir   string   // overrides the config's agent.state_dir
	Socket     string   // overrides the config's agent.socket
	Exec       []string // argv prefix of steppe's exec trampoline (see supervise.ExecArg)
	Logger     *slog.Logger
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

	a.sup, err = supervise.New(ctx, supervise.Options{
		StateDir:     filepath.Join(cfg.StateDir, "services"),
		CgroupParent: cfg.Cgroup,
		Exec:         opts.Exec,
		Logger:       log,
	})
	if err != nil {
		return fmt.Errorf("supervisor: %w", err)
	}

	ln, err := listenUnix(cfg.Socket)
	if err != nil {
		a.sup.Close()
		return err
	}
	api := &apiServer{ctl: a.sup, status: a.Status, log: log}
	srv := &http.Server{Handler: api.handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("local api", "err", err)
		}
	}()
	log.Info("agent started", "config", opts.ConfigPath, "state_dir", cfg.StateDir, "socket", cfg.Socket, "services", len(cfg.Services))

	// The first apply runs in the background so that the API answers while
	// services wait for their dependencies.
	applied := make(chan error, 1)
	go func() { applied <- a.sup.Apply(ctx, cfg.Services) }()

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
		case <-hup:
			if err := a.ReloadConfig(ctx); err != nil {
				log.Error("config reload refused; services keep running as they were", "err", err)
			}
		case <-ctx.Done():
			done = true
		}
	}

	log.Info("agent stopping every service")
	stopCtx, cancel := context.WithTimeout(context.Background(), a.shutdownBudget())
	defer cancel()
	shutdownErr := a.sup.Shutdown(stopCtx)
	_ = srv.Close()
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
		}
	}
	if err == nil {
		a.log.Info("config reloaded", "config", cfg.Path, "services", len(cfg.Services))
		err = a.sup.Apply(ctx, cfg.Services)
		if err == nil {
			a.mu.Lock()
			a.cfg = cfg
			a.mu.Unlock()
		}
	}
	a.setConfigErr(err)
	return err
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
		},
		Services: services,
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
