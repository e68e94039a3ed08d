package supervise

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Options configure a Supervisor.
type Options struct {
	// StateDir holds per service the adoption record, logs and the notify
	// socket; created 0700.
	StateDir string
	// CgroupParent is where the service cgroups are, CgroupParent/<name>:
	// relative to the cgroup v2 the agent runs in (its own, as under
	// systemd with Delegate=yes; "" means "steppe"), or below the cgroup
	// v2 mount when it starts with "/". A v1 memory cgroup, where one is
	// used, sits at the same relative path below the agent's own.
	CgroupParent string
	// Exec is the argv prefix that runs steppe's exec trampoline (ExecArg
	// is appended); nil means no trampoline, so no cgroup v1 memory limits.
	Exec []string
	// Fallback forces the mode without cgroups (process group, child
	// subreaper, lock file), whose guarantees are weaker.
	Fallback bool
	Logger   *slog.Logger
}

// ErrClosed is returned by calls on a closed Supervisor.
var ErrClosed = errors.New("supervisor closed")

// Supervisor runs a set of services. Each service is driven by one
// goroutine (its actor) that owns the service's processes and timers; the
// methods of Supervisor send it commands.
type Supervisor struct {
	opts     Options
	log      *slog.Logger
	fallback bool
	reason   string // why fallback, if it is
	v2Mount  string // cgroup v2 mount point
	v2Base   string // what CgroupParent is relative to: the agent's own cgroup v2, or the mount
	v2Parent string // absolute cgroup v2 directory of the services
	memV1    string // absolute v1 memory cgroup directory of the services; "" if none
	memV2    bool   // memory.max usable in v2 service cgroups

	inoFD   int
	inotify *os.File

	applyMu sync.Mutex // one Apply or Shutdown at a time

	mu       sync.Mutex
	svcs     map[string]*service
	wds      map[int]*service // inotify watch → service
	closed   bool
	shutDown bool // Shutdown stopped every service

	stop chan struct{}
	wg   sync.WaitGroup

	// afterSpawn, if set (by tests, before Apply), is called right after a
	// main process is cloned, before anything records it.
	afterSpawn func(service string, pid int)
}

// New prepares a supervisor. It starts nothing: Apply does, adopting what
// is found running.
func New(ctx context.Context, opts Options) (*Supervisor, error) {
	if opts.StateDir == "" {
		return nil, errors.New("supervise: no state directory")
	}
	if opts.CgroupParent == "" {
		opts.CgroupParent = "steppe"
	}
	absParent := strings.HasPrefix(opts.CgroupParent, "/")
	relParent := strings.TrimPrefix(opts.CgroupParent, "/")
	if !filepath.IsLocal(relParent) || filepath.Clean(relParent) == "." {
		return nil, fmt.Errorf(`supervise: cgroup parent %q: want a path below the agent's own cgroup (such as "steppe") or, starting with "/", below the cgroup v2 mount (such as "/steppe/machine-1")`, opts.CgroupParent)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("supervise: state directory: %w", err)
	}
	s := &Supervisor{
		opts:  opts,
		log:   opts.Logger,
		svcs:  map[string]*service{},
		wds:   map[int]*service{},
		inoFD: -1,
		stop:  make(chan struct{}),
	}
	m, err := findMounts()
	if err != nil {
		return nil, fmt.Errorf("supervise: %w", err)
	}
	switch {
	case opts.Fallback:
		s.fallback, s.reason = true, "fallback requested"
	case m.v2 == "":
		s.fallback, s.reason = true, "no cgroup v2 mount"
	default:
		s.v2Mount = m.v2
		s.v2Base = m.v2
		if !absParent {
			s.v2Base = filepath.Join(m.v2, ownBase(m.own))
		}
		s.v2Parent = filepath.Join(s.v2Base, relParent)
		if err := os.MkdirAll(s.v2Parent, 0o755); err != nil {
			s.fallback, s.reason = true, fmt.Sprintf("cgroup v2 not writable: %v", err)
		} else if _, err := os.Stat(filepath.Join(s.v2Parent, "cgroup.procs")); err != nil {
			s.fallback, s.reason = true, fmt.Sprintf("cgroup v2 not usable: %v", err)
		}
	}
	if s.fallback {
		s.v2Parent = ""
		// Orphans of a double fork are reparented to the agent instead of
		// init, so they stay visible and are reaped here.
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			return nil, fmt.Errorf("supervise: set child subreaper: %w", err)
		}
		s.log.Warn("supervising without cgroups: a double fork can escape, duplicates are prevented only by lock files", "reason", s.reason)
	} else {
		s.memV2 = enableControllerV2("memory", m.v2, s.v2Base, s.v2Parent, s.log)
		fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("supervise: inotify: %w", err)
		}
		s.inoFD, s.inotify = fd, os.NewFile(uintptr(fd), "inotify")
		s.wg.Add(1)
		go s.readInotify()
	}
	if !s.memV2 && m.memoryV1 != "" {
		dir := filepath.Join(m.memoryV1, relParent)
		if err := os.MkdirAll(dir, 0o755); err == nil {
			s.memV1 = dir
		} else {
			s.log.Warn("no memory limits: cgroup v1 memory controller not writable", "err", err)
		}
	}
	s.wg.Add(1)
	go s.ticker()
	return s, nil
}

// Isolation reports the supervision mode, "cgroup2" or "fallback", and in
// fallback mode why, for status displays.
func (s *Supervisor) Isolation() (mode, reason string) {
	return s.isolation(), s.reason
}

// isolation names the guarantee, as Status.Isolation shows it.
func (s *Supervisor) isolation() string {
	if s.fallback {
		return "fallback"
	}
	return "cgroup2"
}

// readInotify turns cgroup.events modifications into kicks of the actors.
func (s *Supervisor) readInotify() {
	defer s.wg.Done()
	buf := make([]byte, 4096)
	for {
		n, err := s.inotify.Read(buf)
		if err != nil {
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			wd := int(int32(binary.NativeEndian.Uint32(buf[off:])))
			nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
			off += unix.SizeofInotifyEvent + nameLen
			s.mu.Lock()
			svc := s.wds[wd]
			s.mu.Unlock()
			if svc != nil {
				svc.kickCgroup()
			}
		}
	}
}

func (s *Supervisor) watchCgroup(svc *service) error {
	wd, err := unix.InotifyAddWatch(s.inoFD, filepath.Join(svc.cg, "cgroup.events"), unix.IN_MODIFY)
	if err != nil {
		return fmt.Errorf("watch %s: %w", svc.cg, err)
	}
	s.mu.Lock()
	s.wds[wd] = svc
	s.mu.Unlock()
	svc.wd = wd
	return nil
}

func (s *Supervisor) unwatchCgroup(svc *service) {
	if s.inoFD < 0 || svc.wd < 0 {
		return
	}
	s.mu.Lock()
	delete(s.wds, svc.wd)
	s.mu.Unlock()
	_, _ = unix.InotifyRmWatch(s.inoFD, uint32(svc.wd))
	svc.wd = -1
}

// ticker follows and rotates logs, and in fallback mode reaps the orphans
// that the subreaper inherits.
func (s *Supervisor) ticker() {
	defer s.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var svcs []*service // reused: an idle agent should not allocate every second
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		clear(svcs)
		svcs = svcs[:0]
		s.mu.Lock()
		for _, svc := range s.svcs {
			svcs = append(svcs, svc)
		}
		s.mu.Unlock()
		for _, svc := range svcs {
			if err := svc.log.tick(); err != nil {
				s.log.Warn("log rotation", "service", svc.name, "err", err)
			}
		}
		if s.fallback {
			s.reapOrphans(svcs)
		}
	}
}

// reapOrphans reaps zombie children that the agent inherited as subreaper:
// those in another process group than the agent's (services run in their
// own sessions), except main processes an actor is about to reap itself.
func (s *Supervisor) reapOrphans(svcs []*service) {
	tracked := map[int]bool{}
	for _, svc := range svcs {
		if pid := svc.snapshot().PID; pid > 0 {
			tracked[pid] = true
		}
	}
	self, pgrp := os.Getpid(), unix.Getpgrp()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || tracked[pid] {
			continue
		}
		st, err := readProcStat(pid)
		if err != nil || st.ppid != self || st.state != 'Z' || st.pgrp == pgrp {
			continue
		}
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
}

func (s *Supervisor) get(name string) (*service, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	svc := s.svcs[name]
	if svc == nil {
		return nil, fmt.Errorf("service %q: no such service", name)
	}
	return svc, nil
}

// Apply makes the running set match specs. It validates the whole set
// first and changes nothing when it is invalid. Services found running are
// adopted, never started again; new ones start, each once what it needs
// (After) is ready; removed ones stop in reverse dependency order; ones
// whose command, arguments, environment, directory, user, group or memory
// changed restart; other changes apply in place. Apply does not wait for
// readiness (WaitReady does).
func (s *Supervisor) Apply(ctx context.Context, specs []Spec) error {
	norm := make([]Spec, len(specs))
	for i, sp := range specs {
		norm[i] = Defaults(sp)
	}
	if err := Validate(norm); err != nil {
		return err
	}
	if s.memV1 != "" && len(s.opts.Exec) == 0 {
		for _, sp := range norm {
			if sp.MemoryMax > 0 {
				return fmt.Errorf("service %q: a memory limit here needs the cgroup v1 memory controller and so the exec trampoline, but Options.Exec is empty", sp.Name)
			}
		}
	}
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	current := maps.Clone(s.svcs)
	s.mu.Unlock()

	want := make(map[string]Spec, len(norm))
	for _, sp := range norm {
		want[sp.Name] = sp
	}
	var errs []error
	removed := map[string][]string{}
	for name, svc := range current {
		if _, ok := want[name]; !ok {
			removed[name] = svc.currentSpec().After
		}
	}
	errs = append(errs, s.inLevels(ctx, removed, true, ctlRemove)...)
	errs = append(errs, s.stopStrays(ctx, want, current)...)

	var updates sync.WaitGroup
	var umu sync.Mutex
	for name, svc := range current {
		if sp, ok := want[name]; ok {
			updates.Go(func() {
				if err := svc.call(ctx, ctlMsg{op: ctlUpdate, spec: sp}); err != nil {
					umu.Lock()
					errs = append(errs, err)
					umu.Unlock()
				}
			})
		}
	}
	updates.Wait()

	var fresh []*service
	for _, sp := range norm {
		if _, ok := current[sp.Name]; ok {
			continue
		}
		svc, err := s.newService(sp, false)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fresh = append(fresh, svc)
	}
	var wg sync.WaitGroup
	for _, svc := range fresh {
		wg.Go(func() {
			if err := svc.call(ctx, ctlMsg{op: ctlInit}); err != nil {
				umu.Lock()
				errs = append(errs, err)
				umu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// stopStrays stops services that run (a record in StateDir, or a cgroup
// below CgroupParent) but are in no spec: left behind by an agent that was
// down when they were removed from its configuration.
func (s *Supervisor) stopStrays(ctx context.Context, want map[string]Spec, current map[string]*service) []error {
	names := map[string]bool{}
	if ents, err := os.ReadDir(s.opts.StateDir); err == nil {
		for _, e := range ents {
			if _, err := os.Stat(filepath.Join(s.opts.StateDir, e.Name(), "record.json")); err == nil {
				names[e.Name()] = true
			}
		}
	}
	if s.v2Parent != "" {
		if ents, err := os.ReadDir(s.v2Parent); err == nil {
			for _, e := range ents {
				if e.IsDir() {
					names[e.Name()] = true
				}
			}
		}
	}
	stray := map[string][]string{}
	for n := range names {
		if _, ok := want[n]; ok {
			continue
		}
		if _, ok := current[n]; ok {
			continue
		}
		if validName(n) != nil {
			continue
		}
		stray[n] = nil
	}
	if len(stray) == 0 {
		return nil
	}
	var errs []error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for n := range stray {
		wg.Go(func() {
			spec := Spec{Name: n}
			if r, err := readRecord(filepath.Join(s.opts.StateDir, n)); err == nil {
				spec.StopSignal, spec.StopTimeout, spec.StopMode = r.StopSignal, r.StopTimeout, r.StopMode
			}
			spec = Defaults(spec)
			svc, err := s.newService(spec, true)
			if err == nil {
				err = svc.call(ctx, ctlMsg{op: ctlInit})
			}
			if err == nil {
				s.log.Info("stopping a service that is no longer configured", "service", n)
				err = svc.call(ctx, ctlMsg{op: ctlRemove})
			}
			if err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("stop unconfigured service %q: %w", n, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errs
}

// inLevels sends op to the named services level by level of their
// dependency graph (deps), deepest dependents first when reverse, and waits
// for each level to finish.
func (s *Supervisor) inLevels(ctx context.Context, deps map[string][]string, reverse bool, op ctlOp) []error {
	lv := levels(deps)
	if reverse {
		slices.Reverse(lv)
	}
	var errs []error
	var mu sync.Mutex
	for _, names := range lv {
		var wg sync.WaitGroup
		for _, n := range names {
			svc, err := s.get(n)
			if err != nil {
				continue
			}
			wg.Go(func() {
				if err := svc.call(ctx, ctlMsg{op: op}); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}
	return errs
}

// Start starts a stopped or failed service, or one waiting in backoff at
// once. Starting a running service does nothing: never a second copy.
func (s *Supervisor) Start(ctx context.Context, name string) error {
	svc, err := s.get(name)
	if err != nil {
		return err
	}
	return svc.call(ctx, ctlMsg{op: ctlStart})
}

// Stop stops a service and returns when it is stopped or ctx ends.
func (s *Supervisor) Stop(ctx context.Context, name string) error {
	svc, err := s.get(name)
	if err != nil {
		return err
	}
	return svc.call(ctx, ctlMsg{op: ctlStop})
}

// Restart stops a service if it runs and starts it again; during a backoff
// it starts it at once. It returns once the new process is started.
func (s *Supervisor) Restart(ctx context.Context, name string) error {
	svc, err := s.get(name)
	if err != nil {
		return err
	}
	return svc.call(ctx, ctlMsg{op: ctlRestart})
}

// Reload sends the service's ReloadSignal to its main process.
func (s *Supervisor) Reload(ctx context.Context, name string) error {
	svc, err := s.get(name)
	if err != nil {
		return err
	}
	return svc.call(ctx, ctlMsg{op: ctlReload})
}

// Status returns a snapshot of every service, sorted by name.
func (s *Supervisor) Status() []Status {
	s.mu.Lock()
	svcs := slices.Collect(maps.Values(s.svcs))
	s.mu.Unlock()
	out := make([]Status, 0, len(svcs))
	for _, svc := range svcs {
		if svc.stray {
			continue
		}
		st := svc.snapshot()
		st.Processes = svc.processCount()
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b Status) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return out
}

// Logs returns the last n lines the service wrote (stdout and stderr
// interleaved, with the agent's own lines about it).
func (s *Supervisor) Logs(name string, n int) ([]string, error) {
	svc, err := s.get(name)
	if err != nil {
		return nil, err
	}
	return svc.log.tail(n)
}

// FollowLogs returns the lines of a service's log after cursor (from an
// earlier call), or with no cursor its last n lines.
func (s *Supervisor) FollowLogs(name, cursor string, n int) (LogChunk, error) {
	svc, err := s.get(name)
	if err != nil {
		return LogChunk{}, err
	}
	return svc.log.follow(cursor, n)
}

// WaitReady waits until every named service is ready, or ctx ends.
func (s *Supervisor) WaitReady(ctx context.Context, names ...string) error {
	for _, n := range names {
		for {
			svc, err := s.get(n)
			if err != nil {
				return err
			}
			ch := svc.readyChan()
			select {
			case <-ch:
			case <-ctx.Done():
				return fmt.Errorf("service %q: not ready: %w", n, ctx.Err())
			case <-svc.done:
				continue // replaced or removed: look it up again
			}
			break
		}
	}
	return nil
}

// Shutdown stops every service in reverse dependency order, honouring stop
// modes, and returns when all are stopped or ctx ends.
func (s *Supervisor) Shutdown(ctx context.Context) error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	s.mu.Lock()
	deps := map[string][]string{}
	for n, svc := range s.svcs {
		deps[n] = svc.currentSpec().After
	}
	s.mu.Unlock()
	err := errors.Join(s.inLevels(ctx, deps, true, ctlStop)...)
	if err == nil {
		s.mu.Lock()
		s.shutDown = true
		s.mu.Unlock()
	}
	return err
}

// Close releases the supervisor without stopping any service: they keep
// running and the next supervisor on the same StateDir adopts them.
func (s *Supervisor) Close() error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	svcs := slices.Collect(maps.Values(s.svcs))
	s.mu.Unlock()
	for _, svc := range svcs {
		_ = svc.call(context.Background(), ctlMsg{op: ctlDetach})
	}
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	close(s.stop)
	if s.inotify != nil {
		s.inotify.Close()
	}
	s.wg.Wait()
	s.mu.Lock()
	shutDown := s.shutDown
	s.mu.Unlock()
	if shutDown {
		s.removeEmptyCgroups(svcs)
	}
	return nil
}

// removeEmptyCgroups removes, once every service is stopped and its actor
// gone, the cgroups with no process left, then the services' parents if
// they are empty. A cgroup that still holds processes (a Nomad client's
// tasks, which its stop mode leaves running) stays, with its parents. The
// next start makes them again.
func (s *Supervisor) removeEmptyCgroups(svcs []*service) {
	for _, svc := range svcs {
		if svc.cg != "" {
			if pop, err := cgPopulated(svc.cg); err == nil && !pop {
				if err := cgRemove(svc.cg); err != nil {
					s.log.Debug("leaving a stopped service's cgroup", "service", svc.name, "err", err)
				}
			}
		}
		if s.memV1 != "" {
			_ = unix.Rmdir(filepath.Join(s.memV1, svc.name)) // fails while tasks remain
		}
	}
	for _, dir := range []string{s.v2Parent, s.memV1} {
		if dir != "" {
			_ = unix.Rmdir(dir)
		}
	}
}
