package supervise

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

type ctlOp int

const (
	ctlInit     ctlOp = iota // adopt what runs, else start
	ctlStart                 // start if not running
	ctlStop                  // stop; reply when stopped
	ctlRestart               // stop if running, then start
	ctlReload                // reload signal to the main process
	ctlUpdate                // new spec: in place, or restart if exec-relevant
	ctlRemove                // stop, clean up, end the actor
	ctlDetach                // end the actor, leave the processes running
	ctlKillLeft              // kill what a stopped service left in its cgroup (leftovers.go)
)

type ctlMsg struct {
	op    ctlOp
	spec  Spec
	reply chan error
}

// reply is an answer to a command, held until the state it reports is
// published, so a caller that reads Status after Stop returns sees it.
type reply struct {
	c   chan error
	err error
}

type evKind int

const (
	evExit   evKind = iota // the main process ended
	evProbe                // readiness probe result
	evDeps                 // dependencies ready
	evNotify               // a NOTIFY_SOCKET message
)

type event struct {
	kind   evKind
	gen    uint64
	ws     unix.WaitStatus
	known  bool // ws is the real exit status (the process was our child)
	err    error
	notify notifyMsg
	sender int // pid that sent a notify message, 0 if unknown
}

// service is one supervised service. Its actor goroutine (run) owns every
// field below "actor-owned"; other goroutines read the published Status
// under mu.
type service struct {
	sup   *Supervisor
	name  string
	dir   string // state directory of the service
	cg    string // cgroup v2 directory; "" in fallback mode
	wd    int    // inotify watch of cg's cgroup.events
	stray bool   // found running without a spec: only adopted, to be stopped
	log   *logFile

	ctl    chan ctlMsg
	ev     chan event
	cgKick chan struct{} // cgroup.events changed
	done   chan struct{} // closed when the actor has ended

	mu      sync.Mutex
	st      Status
	spec    Spec
	readyCh chan struct{} // closed while ready

	// actor-owned
	phase         State // changed only by transition (state.go)
	goal          goal  // what it is meant to do; changed only by setGoal
	main          *proc
	gen           uint64 // main process generation; exit events carry it
	runGen        uint64 // start attempt generation; probe and deps events carry it
	crashes       int    // consecutive, for the backoff
	restarts      int
	oomKills      int
	oomBase       int64
	sysOOMBase    int64 // the kernel's count of OOM kills (/proc/vmstat) when the run began
	sysOOMSince   int64 // and when it began (monoMicros)
	startedAt     time.Time
	since         time.Time
	adopted       bool // taken over running (Status.Adopted), not started
	lastExit      string
	lastErr       string
	message       string
	failed        bool // the current run ended in failure
	nextStart     time.Time
	memcg         string // v1 memory cgroup directory of its own, when a v1 limit is used
	notifyPath    string
	notifyConn    *net.UnixConn
	probeCancel   context.CancelFunc
	depsCancel    context.CancelFunc
	stopWaiters   []chan error
	startWaiters  []chan error
	removeWaiters []chan error
	backoffT      *time.Timer
	stopT         *time.Timer
	pollT         *time.Timer
	pollDelay     time.Duration
	outbox        []reply // answers sent after the next publish
	warnedMemory  bool    // said once that its memory limit is not enforced
	saved         []byte  // the record as last written
	cgKilled      bool    // cgroup.kill was used: recreate the cgroup before the next spawn
	spawnTick     uint64  // a spawn marked in the record began at this tick (markSpawn); 0 otherwise
}

func (s *Supervisor) newService(spec Spec, stray bool) (*service, error) {
	dir := filepath.Join(s.opts.StateDir, spec.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("service %q: state directory: %w", spec.Name, err)
	}
	lf, err := openLog(filepath.Join(dir, "log"), spec.LogMaxBytes, spec.LogKeep)
	if err != nil {
		return nil, fmt.Errorf("service %q: %w", spec.Name, err)
	}
	svc := &service{
		sup:        s,
		name:       spec.Name,
		dir:        dir,
		wd:         -1,
		stray:      stray,
		log:        lf,
		ctl:        make(chan ctlMsg),
		ev:         make(chan event, 8),
		cgKick:     make(chan struct{}, 1),
		done:       make(chan struct{}),
		spec:       spec,
		readyCh:    make(chan struct{}),
		phase:      StateStopped,
		since:      time.Now(),
		notifyPath: filepath.Join(dir, "notify"),
	}
	if !s.fallback {
		svc.cg = filepath.Join(s.v2Parent, spec.Name)
		// An empty cgroup may have been the target of cgroup.kill (by an
		// agent that died since): see renewCgroup.
		if pop, err := cgPopulated(svc.cg); err == nil && !pop {
			_ = unix.Rmdir(svc.cg)
		}
		if err := os.MkdirAll(svc.cg, 0o755); err != nil {
			lf.close()
			return nil, fmt.Errorf("service %q: create cgroup: %w", spec.Name, err)
		}
		if err := s.watchCgroup(svc); err != nil {
			lf.close()
			return nil, fmt.Errorf("service %q: %w", spec.Name, err)
		}
	}
	s.mu.Lock()
	if old := s.svcs[spec.Name]; old != nil {
		s.mu.Unlock()
		lf.close()
		return nil, fmt.Errorf("service %q: already supervised", spec.Name)
	}
	s.svcs[spec.Name] = svc
	s.mu.Unlock()
	svc.configure()
	svc.publish()
	go svc.run()
	return svc, nil
}

// call sends a command to the actor and waits for its answer.
func (a *service) call(ctx context.Context, m ctlMsg) error {
	m.reply = make(chan error, 1)
	select {
	case a.ctl <- m:
	case <-a.done:
		return fmt.Errorf("service %q: no such service", a.name)
	case <-ctx.Done():
		return fmt.Errorf("service %q: %w", a.name, ctx.Err())
	}
	select {
	case err := <-m.reply:
		return err
	case <-ctx.Done():
		return fmt.Errorf("service %q: %w", a.name, ctx.Err())
	}
}

func (a *service) send(e event) {
	select {
	case a.ev <- e:
	case <-a.done:
	}
}

func (a *service) kickCgroup() {
	select {
	case a.cgKick <- struct{}{}:
	default:
	}
}

func (a *service) currentSpec() Spec {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.spec
}

func (a *service) snapshot() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st
}

func (a *service) readyChan() chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.readyCh
}

// configure derives what follows from the spec. Actor-owned (or before run).
func (a *service) configure() {
	a.memcg = ""
	sp := a.spec
	// Only a limit earns a v1 memory cgroup: joining one takes the exec
	// trampoline, about 20 ms per start. Without one, an OOM kill is told
	// by the kernel's count and log instead (killedByOOM).
	if sp.MemoryMax > 0 && !a.sup.memV2 && a.sup.memV1 != "" {
		a.memcg = filepath.Join(a.sup.memV1, a.name)
	}
	a.log.setLimits(sp.LogMaxBytes, sp.LogKeep)
}

// publish copies the actor's state to the Status others read.
func (a *service) publish() {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := Status{
		Name:      a.name,
		State:     a.phase,
		Ready:     a.ready(),
		Restarts:  a.restarts,
		Since:     a.since,
		LastExit:  a.lastExit,
		LastError: a.lastErr,
		OOMKills:  a.oomKills,
		NextStart: a.nextStart,
		Adopted:   a.adopted,
		Isolation: a.sup.isolation(),
		Cgroup:    a.cg,
		Log:       a.log.path,
		Message:   a.message,
	}
	if a.main != nil {
		st.PID = a.main.pid
	}
	a.st = st
	// The ready channel changes together with the Status: a WaitReady
	// that returns sees a ready Status.
	select {
	case <-a.readyCh:
		if !a.ready() {
			a.readyCh = make(chan struct{})
		}
	default:
		if a.ready() {
			close(a.readyCh)
		}
	}
}

// ready: a service is ready exactly while it is running.
func (a *service) ready() bool { return a.phase == StateRunning }

func (a *service) run() {
	defer close(a.done)
	for a.goal != goalGone {
		select {
		case m := <-a.ctl:
			a.handleCtl(m)
		case e := <-a.ev:
			a.handleEvent(e)
		case <-a.cgKick:
			a.cgroupChanged()
		case <-timerC(a.backoffT):
			a.backoffT = nil
			a.backoffFired()
		case <-timerC(a.stopT):
			a.stopT = nil
			a.stopTimedOut()
		case <-timerC(a.pollT):
			a.pollT = nil
			a.poll()
		}
		a.publish()
		for _, r := range a.outbox {
			r.c <- r.err
		}
		a.outbox = a.outbox[:0]
	}
}

func timerC(t *time.Timer) <-chan time.Time {
	if t == nil {
		return nil
	}
	return t.C
}

func stopTimer(t **time.Timer) {
	if *t != nil {
		(*t).Stop()
		*t = nil
	}
}

func (a *service) handleCtl(m ctlMsg) {
	switch m.op {
	case ctlInit:
		a.initial(m.reply)
	case ctlStart:
		if a.goal == goalRemove {
			a.answer(m.reply, fmt.Errorf("service %q: being removed", a.name))
			return
		}
		switch a.phase {
		case StateStarting, StateRunning, StateWaiting:
			a.setGoal(goalRun)
			a.answer(m.reply, nil)
		case StateStopping:
			a.setGoal(goalRestart)
			a.startWaiters = append(a.startWaiters, m.reply)
		default: // stopped, failed, backoff
			a.setGoal(goalRun)
			stopTimer(&a.backoffT)
			a.nextStart = time.Time{}
			a.crashes = 0
			a.startWaiters = append(a.startWaiters, m.reply)
			a.begin()
		}
	case ctlStop:
		a.setGoal(goalStop)
		switch a.phase {
		case StateStarting, StateRunning:
			a.stopWaiters = append(a.stopWaiters, m.reply)
			a.beginStop("stop")
		case StateStopping:
			a.stopWaiters = append(a.stopWaiters, m.reply)
		default:
			a.toStopped()
			a.answer(m.reply, nil)
		}
		a.replyStarts(fmt.Errorf("service %q: stopped", a.name))
	case ctlRestart:
		if a.goal == goalRemove {
			a.answer(m.reply, fmt.Errorf("service %q: being removed", a.name))
			return
		}
		a.setGoal(goalRun)
		a.startWaiters = append(a.startWaiters, m.reply)
		a.restartNow()
	case ctlReload:
		a.answer(m.reply, a.reload())
	case ctlUpdate:
		a.update(m.spec, m.reply)
	case ctlRemove:
		a.setGoal(goalRemove)
		a.removeWaiters = append(a.removeWaiters, m.reply)
		a.replyStarts(fmt.Errorf("service %q: removed", a.name))
		switch a.phase {
		case StateStarting, StateRunning:
			a.beginStop("remove")
		case StateStopping:
		default:
			a.toStopped()
		}
	case ctlDetach:
		a.detach()
		a.answer(m.reply, nil)
	case ctlKillLeft:
		a.answer(m.reply, a.killLeftovers())
	}
}

func (a *service) answer(c chan error, err error) {
	a.outbox = append(a.outbox, reply{c, err})
}

func (a *service) replyStarts(err error) {
	for _, c := range a.startWaiters {
		a.answer(c, err)
	}
	a.startWaiters = nil
}

func (a *service) handleEvent(e event) {
	switch e.kind {
	case evExit:
		if e.gen == a.gen && a.main != nil {
			a.mainExited(e.ws, e.known)
		}
	case evProbe:
		if e.gen != a.runGen || a.phase != StateStarting {
			return
		}
		if e.err == nil {
			a.markReady()
			return
		}
		a.lastErr = e.err.Error()
		a.log.agentf("%v", e.err)
		a.sup.log.Warn("not ready", "service", a.name, "err", e.err)
		a.failed = true
		a.beginStop("not ready") // a failed start: the restart policy applies once stopped
	case evDeps:
		if e.gen != a.runGen || a.phase != StateWaiting {
			return
		}
		if e.err != nil {
			a.lastErr = "waiting for dependencies: " + e.err.Error()
			a.backoffT = time.NewTimer(time.Second)
			return
		}
		a.launch()
	case evNotify:
		a.handleNotify(e.notify, e.sender)
	}
}

func (a *service) replyStops(err error) {
	for _, c := range a.stopWaiters {
		a.answer(c, err)
	}
	a.stopWaiters = nil
}
