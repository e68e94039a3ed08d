package supervise

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type ctlOp int

const (
	ctlInit    ctlOp = iota // adopt what runs, else start
	ctlStart                // start if not running
	ctlStop                 // stop; reply when stopped
	ctlRestart              // stop if running, then start
	ctlReload               // reload signal to the main process
	ctlUpdate               // new spec: in place, or restart if exec-relevant
	ctlRemove               // stop, clean up, end the actor
	ctlDetach               // end the actor, leave the processes running
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
	want           bool // meant to run
	phase          State
	main           *proc
	gen            uint64 // main process generation; exit events carry it
	runGen         uint64 // start attempt generation; probe and deps events carry it
	crashes        int    // consecutive, for the backoff
	restarts       int
	oomKills       int
	oomBase        int64
	startedAt      time.Time
	since          time.Time
	ready          bool
	adopted        bool
	lastExit       string
	lastErr        string
	message        string
	failed         bool // the current run ended in failure
	pendingRestart bool
	removing       bool
	exit           bool
	nextStart      time.Time
	memcg          string // v1 memory cgroup directory, when a v1 limit is used
	notifyPath     string
	notifyConn     *net.UnixConn
	probeCancel    context.CancelFunc
	depsCancel     context.CancelFunc
	stopWaiters    []chan error
	startWaiters   []chan error
	removeWaiters  []chan error
	backoffT       *time.Timer
	stopT          *time.Timer
	pollT          *time.Timer
	pollDelay      time.Duration
	outbox         []reply // answers sent after the next publish
	warnedMemory   bool
	saved          []byte // the record as last written
	cgKilled       bool   // cgroup.kill was used: recreate the cgroup before the next spawn
	spawnTick      uint64 // a spawn marked in the record began at this tick (markSpawn); 0 otherwise
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

// members lists the service's processes: its cgroup's, or in fallback
// mode those holding its lock file, plus the main process.
func (a *service) members() []int {
	if a.cg != "" {
		pids, _ := cgProcsAll(a.cg)
		return pids
	}
	pids := lockHolders(filepath.Join(a.dir, "lock"))
	if pid := a.snapshot().PID; pid > 0 && !slices.Contains(pids, pid) && alive(pid, 0) {
		pids = append(pids, pid)
	}
	return pids
}

// processCount is len(a.members()), without building the list where the
// cgroup can be counted in place (status polls ask for it every time).
func (a *service) processCount() int {
	if a.cg != "" {
		n, _ := cgCount(a.cg)
		return n
	}
	return len(a.members())
}

// configure derives what follows from the spec. Actor-owned (or before run).
func (a *service) configure() {
	a.memcg = ""
	sp := a.spec
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
		Ready:     a.ready,
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
		if !a.ready {
			a.readyCh = make(chan struct{})
		}
	default:
		if a.ready {
			close(a.readyCh)
		}
	}
}

func (a *service) setPhase(p State) {
	if a.phase != p {
		a.phase, a.since = p, time.Now()
	}
}

func (a *service) run() {
	defer close(a.done)
	for !a.exit {
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
		a.want = true
		switch a.phase {
		case StateStarting, StateRunning, StateWaiting:
			a.answer(m.reply, nil)
		case StateStopping:
			a.pendingRestart = true
			a.startWaiters = append(a.startWaiters, m.reply)
		default: // stopped, failed, backoff
			stopTimer(&a.backoffT)
			a.nextStart = time.Time{}
			a.crashes = 0
			a.startWaiters = append(a.startWaiters, m.reply)
			a.begin()
		}
	case ctlStop:
		a.want, a.pendingRestart = false, false
		switch a.phase {
		case StateStarting, StateRunning:
			a.stopWaiters = append(a.stopWaiters, m.reply)
			a.beginStop()
		case StateStopping:
			a.stopWaiters = append(a.stopWaiters, m.reply)
		default:
			a.toStopped()
			a.answer(m.reply, nil)
		}
		a.replyStarts(fmt.Errorf("service %q: stopped", a.name))
	case ctlRestart:
		a.want = true
		a.startWaiters = append(a.startWaiters, m.reply)
		a.restartNow()
	case ctlReload:
		a.answer(m.reply, a.reload())
	case ctlUpdate:
		a.update(m.spec, m.reply)
	case ctlRemove:
		a.want, a.pendingRestart, a.removing = false, false, true
		a.removeWaiters = append(a.removeWaiters, m.reply)
		a.replyStarts(fmt.Errorf("service %q: removed", a.name))
		switch a.phase {
		case StateStarting, StateRunning:
			a.beginStop()
		case StateStopping:
		default:
			a.toStopped()
		}
	case ctlDetach:
		a.detach()
		a.answer(m.reply, nil)
	}
}

// restartNow stops the service if it runs and starts it again; from a
// backoff or a wait it starts at once.
func (a *service) restartNow() {
	a.crashes = 0
	switch a.phase {
	case StateStarting, StateRunning:
		a.pendingRestart = true
		a.beginStop()
	case StateStopping:
		a.pendingRestart = true
	default:
		stopTimer(&a.backoffT)
		a.nextStart = time.Time{}
		a.begin()
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

func (a *service) record() record {
	r := record{
		Restarts:    a.restarts,
		Hash:        execHash(a.spec),
		Ready:       a.ready,
		Since:       a.startedAt,
		OOMKills:    a.oomKills,
		StopSignal:  a.spec.StopSignal,
		StopTimeout: a.spec.StopTimeout,
		StopMode:    a.spec.StopMode,
	}
	if a.main != nil {
		r.PID, r.StartTime = a.main.pid, a.main.startTime
	} else {
		r.Spawning = a.spawnTick
	}
	return r
}

// saveRecord persists the record when it changed: creating a file is the
// dearest step of adopting a service that has not changed.
func (a *service) saveRecord() {
	if a.stray {
		return
	}
	data, err := json.Marshal(a.record())
	if err == nil && bytes.Equal(data, a.saved) {
		return
	}
	if err == nil {
		err = writeRecordData(a.dir, data)
	}
	if err != nil {
		a.sup.log.Error("persist service state", "service", a.name, "err", err)
		return
	}
	a.saved = data
}

// initial adopts the service if it is found running, else starts it. The
// answer comes once it is adopted, started, or waiting for dependencies.
func (a *service) initial(reply chan error) {
	rec, recErr := readRecord(a.dir)
	if recErr == nil {
		a.restarts, a.oomKills = rec.Restarts, rec.OOMKills
		a.saved, _ = json.Marshal(rec)
	}
	a.oomBase = a.oomCount()
	if a.adopt(rec, recErr == nil) {
		if recErr == nil && rec.Hash != execHash(a.spec) && !a.stray {
			a.log.agentf("the spec changed while the agent was away: restarting")
			a.sup.log.Info("spec changed while the agent was away: restarting", "service", a.name)
			a.want = true
			a.startWaiters = append(a.startWaiters, reply)
			a.restartNow()
			return
		}
		a.answer(reply, nil)
		return
	}
	if a.stray {
		a.toStopped()
		a.answer(reply, nil)
		return
	}
	a.want = true
	a.startWaiters = append(a.startWaiters, reply)
	a.begin()
}

// adopt takes over a service found running: never a second copy. It
// reports whether it did.
func (a *service) adopt(rec record, haveRec bool) bool {
	var main *proc
	if haveRec && rec.PID > 0 && alive(rec.PID, rec.StartTime) && a.isMember(rec.PID) {
		main, _ = openProc(rec.PID, rec.StartTime)
	}
	if haveRec && rec.PID == 0 && rec.Spawning > 0 && a.cg != "" {
		// The agent before died between a clone and recording its pid.
		if main = a.findSpawned(rec.Spawning); main != nil {
			a.log.agentf("found pid %d, spawned by an agent that died before recording it", main.pid)
		}
	}
	running := main != nil
	if a.spec.StopMode != StopMain || a.cg == "" {
		// Whole-cgroup services run as long as any process is left.
		running = running || a.occupied()
		if main == nil && running {
			if pids := a.members(); len(pids) == 1 {
				main, _ = openProc(pids[0], 0)
			}
		}
	}
	if !running {
		return false
	}
	a.want = !a.stray
	a.adopted = true
	a.startedAt = rec.Since
	if rec.Since.IsZero() {
		a.startedAt = time.Now()
	}
	a.runGen++
	if main != nil {
		a.setMain(main)
	} else {
		a.armPoll(10 * time.Millisecond)
	}
	pid := 0
	if main != nil {
		pid = main.pid
	}
	a.log.agentf("adopted running service (main pid %d)", pid)
	a.sup.log.Info("adopted running service", "service", a.name, "pid", pid)
	a.setPhase(StateStarting)
	if r := a.spec.Ready; r != nil && r.Notify && !a.stray {
		// Same path as before the agent restart: the daemon's later
		// notifications (STATUS=, RELOADING=1) still arrive.
		if err := a.openNotify(); err != nil {
			a.lastErr = err.Error()
		}
	}
	if a.stray || (haveRec && rec.Ready) || a.spec.Ready == nil {
		a.markReady()
		a.since = a.startedAt // running since it was started, not adopted
	} else {
		a.startProbe()
	}
	a.saveRecord()
	return true
}

// isMember reports whether pid belongs to the service (its cgroup, or in
// fallback mode its lock).
func (a *service) isMember(pid int) bool {
	if a.cg != "" {
		data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
		if err != nil {
			return false
		}
		rel := strings.TrimPrefix(a.cg, a.sup.v2Mount)
		for line := range strings.Lines(string(data)) {
			if strings.HasPrefix(line, "0::") {
				return strings.TrimSpace(line[3:]) == rel
			}
		}
		return false
	}
	return true // fallback: the pid record with its start time is the evidence
}

// occupied reports whether any process of the service is left.
func (a *service) occupied() bool {
	if a.cg != "" {
		ok, err := cgPopulated(a.cg)
		return ok || err != nil // when in doubt, never start a second copy
	}
	return lockHeld(filepath.Join(a.dir, "lock")) || (a.main != nil && alive(a.main.pid, a.main.startTime))
}

func (a *service) setMain(p *proc) {
	a.main = p
	a.gen++
	g := a.gen
	go func() {
		ws, known, err := p.wait()
		if err != nil {
			return // closed: the actor let go of it
		}
		a.send(event{kind: evExit, gen: g, ws: ws, known: known})
	}()
}

// begin starts the service once its dependencies are ready.
func (a *service) begin() {
	a.cancelDeps()
	a.runGen++
	if deps := a.spec.After; len(deps) > 0 {
		g := a.runGen
		ctx, cancel := context.WithCancel(context.Background())
		a.depsCancel = cancel
		a.setPhase(StateWaiting)
		a.replyStarts(nil)
		go func() {
			err := a.sup.WaitReady(ctx, deps...)
			a.send(event{kind: evDeps, gen: g, err: err})
		}()
		return
	}
	a.launch()
}

func (a *service) cancelDeps() {
	if a.depsCancel != nil {
		a.depsCancel()
		a.depsCancel = nil
	}
}

func (a *service) cancelProbe() {
	if a.probeCancel != nil {
		a.probeCancel()
		a.probeCancel = nil
	}
}

// launch spawns the main process, unless something of the service still
// runs, which it adopts instead.
func (a *service) launch() {
	a.cancelDeps()
	if a.occupiedForStart() {
		rec, err := readRecord(a.dir)
		if a.adopt(rec, err == nil) {
			a.replyStarts(nil)
			return
		}
	}
	a.runGen++
	if a.cgKilled {
		if err := a.renewCgroup(); err != nil {
			a.startFailed(err)
			return
		}
	}
	if a.spec.Ready != nil && a.spec.Ready.Notify {
		if err := a.openNotify(); err != nil {
			a.startFailed(err)
			return
		}
	}
	if a.spec.StopMode == StopMain && a.cg != "" {
		if err := a.markSpawn(); err != nil {
			a.startFailed(err)
			return
		}
	}
	p, err := a.spawn()
	a.spawnTick = 0
	if err != nil {
		a.startFailed(err)
		return
	}
	if h := a.sup.afterSpawn; h != nil {
		h(a.name, p.pid)
	}
	a.adopted, a.failed = false, false
	a.startedAt = time.Now()
	a.setPhase(StateStarting)
	a.setMain(p)
	a.log.agentf("started %s (pid %d)", a.spec.Command, p.pid)
	a.replyStarts(nil)
	if a.spec.Ready == nil {
		a.markReady()
		return
	}
	a.saveRecord()
	a.startProbe()
}

// spawnWindow bounds, in clock ticks after the mark, when the main process
// of a marked spawn started: markSpawn clones within half of it.
const spawnWindow = 2 * userHZ

// markSpawn records, durably and before the clone, that a main process is
// about to be spawned, and the tick from which on it starts. A StopMain
// service's cgroup holds processes while its main process does not run (a
// Nomad client's tasks), so a populated cgroup does not tell the next agent
// that the main process runs: if this agent dies between the clone and
// recording the pid, the next one finds the process by this mark
// (findSpawned) instead of starting a second copy.
func (a *service) markSpawn() error {
	a.startedAt = time.Now()
	for range 5 {
		a.spawnTick = a.firstNewTick()
		data, err := json.Marshal(a.record())
		if err == nil {
			err = writeRecordData(a.dir, data)
		}
		if err != nil {
			a.spawnTick = 0
			return fmt.Errorf("record the start before it: %w", err)
		}
		a.saved = data
		if bootTick() < a.spawnTick+spawnWindow/2 {
			return nil
		}
		// The write took so long that the clone could fall outside the
		// window findSpawned looks in: mark again.
	}
	a.spawnTick = 0
	return fmt.Errorf("record the start before it: writing %s takes longer than %v", filepath.Join(a.dir, "record.json"), time.Second*spawnWindow/userHZ/2)
}

// firstNewTick returns now as a tick after the start of every process in
// the cgroup, so that of its processes only those started from now on
// start at or after it: when one started within the current tick, it
// waits for the next one.
func (a *service) firstNewTick() uint64 {
	pids, _ := cgProcs(a.cg)
	t := bootTick()
	for _, pid := range pids {
		if st, err := readProcStat(pid); err == nil && st.startTime >= t {
			time.Sleep(time.Second / userHZ)
			return bootTick()
		}
	}
	return t
}

// findSpawned finds the main process of a spawn marked at tick among the
// cgroup's processes: one that leads its own session (the main process is
// spawned with setsid; its children inherit its session), started within
// spawnWindow of the mark, and whose parent (the agent, now gone) is not in
// the cgroup. Of several (a child that made its own session and lost its
// parent), the one that started first.
func (a *service) findSpawned(tick uint64) *proc {
	pids, err := cgProcs(a.cg)
	if err != nil {
		return nil
	}
	best, bestSt := 0, procStat{}
	for _, pid := range pids {
		st, err := readProcStat(pid)
		if err != nil || st.state == 'Z' || st.sid != pid || st.startTime < tick || st.startTime >= tick+spawnWindow || slices.Contains(pids, st.ppid) {
			continue
		}
		if best == 0 || st.startTime < bestSt.startTime || st.startTime == bestSt.startTime && pid < best {
			best, bestSt = pid, st
		}
	}
	if best == 0 {
		return nil
	}
	p, err := openProc(best, bestSt.startTime)
	if err != nil {
		return nil
	}
	return p
}

// renewCgroup replaces the service's empty cgroup by a fresh one. Linux
// (seen on 6.18) kills every process cloned with CLONE_INTO_CGROUP into a
// cgroup that was once the target of cgroup.kill: the child is checked
// against the cgroup's kill sequence number, which a kill increments and
// nothing resets. A fresh cgroup starts at zero.
func (a *service) renewCgroup() error {
	a.sup.unwatchCgroup(a)
	if err := cgRemove(a.cg); err != nil {
		return err
	}
	if err := os.Mkdir(a.cg, 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	a.cgKilled = false
	return a.sup.watchCgroup(a)
}

// occupiedForStart: for a whole-cgroup service any process left counts;
// for StopMain only the main process (the rest, a Nomad client's tasks,
// legitimately outlives it).
func (a *service) occupiedForStart() bool {
	if a.spec.StopMode == StopMain && a.cg != "" {
		return false
	}
	return a.occupied()
}

func (a *service) startFailed(err error) {
	a.lastErr = "start: " + err.Error()
	a.log.agentf("start failed: %v", err)
	a.sup.log.Error("start failed", "service", a.name, "err", err)
	a.replyStarts(fmt.Errorf("service %q: start: %w", a.name, err))
	a.failed = true
	a.afterEnd()
}

func (a *service) startProbe() {
	ctx, cancel := context.WithCancel(context.Background())
	a.probeCancel = cancel
	g, r := a.runGen, a.spec.Ready
	go func() {
		err := probe(ctx, r)
		if ctx.Err() != nil && err != nil && !strings.HasPrefix(err.Error(), "readiness") {
			return
		}
		a.send(event{kind: evProbe, gen: g, err: err})
	}()
}

func (a *service) markReady() {
	a.cancelProbe()
	a.ready = true
	a.lastErr = ""
	a.setPhase(StateRunning)
	a.saveRecord()
}

func (a *service) unready() {
	a.ready = false
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
		a.beginStop() // a failed start: the restart policy applies once stopped
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
		if e.sender > 0 && alive(e.sender, 0) && !a.isMember(e.sender) {
			a.sup.log.Warn("notify message from a process outside the service ignored", "service", a.name, "pid", e.sender)
			return
		}
		m := e.notify
		if m.status != "" {
			a.message = m.status
		}
		if m.mainPID > 0 && (a.main == nil || a.main.pid != m.mainPID) && a.isMember(m.mainPID) {
			if p, err := openProc(m.mainPID, 0); err == nil {
				a.main.close()
				a.setMain(p)
				a.saveRecord()
			}
		}
		if m.ready && a.phase == StateStarting && a.spec.Ready != nil && a.spec.Ready.Notify {
			a.markReady()
		}
	}
}

// mainExited handles the end of the main process.
func (a *service) mainExited(ws unix.WaitStatus, known bool) {
	pid := a.main.pid
	a.main.close()
	a.main = nil
	desc, failed := "unknown (not our child)", true
	if known {
		desc = describeExit(ws)
		failed = !(ws.Exited() && ws.ExitStatus() == 0)
	}
	if a.checkOOM() {
		desc, failed = "oom", true
		a.log.agentf("main process %d was killed by the kernel: OOM (memory limit %d bytes)", pid, a.spec.MemoryMax)
		a.sup.log.Error("killed: out of memory", "service", a.name, "pid", pid, "limit", a.spec.MemoryMax)
	}
	if a.phase != StateStopping || known {
		a.lastExit = desc
	}
	a.log.agentf("main process %d ended: %s", pid, desc)
	if a.spec.StopMode == StopMain && a.cg != "" {
		a.failed = a.failed || failed
		a.ended()
		return
	}
	if !a.occupied() {
		a.failed = a.failed || failed
		a.ended()
		return
	}
	switch {
	case a.phase == StateStopping:
		// The main process has had its say; what it left behind (workers,
		// a child it did not reap) gets the stop signal now rather than
		// cgroup.kill when the timeout runs out.
		a.log.agentf("main process gone: stop signal to the processes it left (%d)", a.processCount())
		a.signalAll(a.spec.StopSignal)
		a.armPoll(10 * time.Millisecond)
	case !failed:
		// A daemon that forked and let its parent exit: still running. Its
		// sole remaining process becomes the main one when found.
		a.log.agentf("main process exited 0 leaving processes behind: following them as a daemon")
		a.pollDelay = 0
		a.armPoll(2 * time.Millisecond)
		a.saveRecord()
	default:
		a.log.agentf("main process failed leaving processes behind: killing them")
		a.failed = true
		a.setPhase(StateStopping)
		a.cancelProbe()
		a.killAll()
		a.armPoll(10 * time.Millisecond)
	}
}

func (a *service) cgroupChanged() {
	if a.main != nil {
		return // the main process's exit event will tell
	}
	switch a.phase {
	case StateStarting, StateRunning, StateStopping:
		if !a.occupied() {
			a.failed = a.failed || a.phase != StateStopping
			if a.phase != StateStopping {
				a.lastExit = "unknown (all processes ended)"
			}
			a.ended()
		}
	}
}

// armPoll schedules a check of the processes: to find the main process of
// a daemon, and in fallback mode (no cgroup events) to see them end.
func (a *service) armPoll(d time.Duration) {
	stopTimer(&a.pollT)
	a.pollDelay = d
	a.pollT = time.NewTimer(d)
}

func (a *service) poll() {
	switch a.phase {
	case StateStarting, StateRunning, StateStopping:
	default:
		return
	}
	if a.main != nil {
		return
	}
	if !a.occupied() {
		a.cgroupChanged()
		return
	}
	if a.phase != StateStopping {
		if pids := a.members(); len(pids) == 1 {
			if p, err := openProc(pids[0], 0); err == nil {
				a.setMain(p)
				a.log.agentf("following pid %d as the main process", p.pid)
				a.saveRecord()
				return
			}
		}
	}
	a.armPoll(min(2*a.pollDelay, time.Second))
}

// beginStop signals the service to stop; ended() follows when it has.
func (a *service) beginStop() {
	a.cancelDeps()
	a.cancelProbe()
	stopTimer(&a.backoffT)
	a.nextStart = time.Time{}
	a.setPhase(StateStopping)
	a.unready()
	sig := a.spec.StopSignal
	switch {
	case a.main != nil:
		if err := a.main.signal(sig); err != nil {
			a.sup.log.Warn("stop signal", "service", a.name, "err", err)
		}
	case a.spec.StopMode == StopMain && a.cg != "":
		a.ended()
		return
	default:
		a.signalAll(sig)
		a.armPoll(10 * time.Millisecond)
	}
	if a.cg == "" {
		a.armPoll(10 * time.Millisecond)
	}
	stopTimer(&a.stopT)
	a.stopT = time.NewTimer(a.spec.StopTimeout)
}

func (a *service) stopTimedOut() {
	if a.phase != StateStopping {
		return
	}
	if a.spec.StopMode == StopMain && a.cg != "" {
		if a.main != nil {
			a.log.agentf("stop timeout (%v): killing the main process", a.spec.StopTimeout)
			_ = a.main.signal(syscall.SIGKILL)
		}
	} else {
		a.log.agentf("stop timeout (%v): killing all processes", a.spec.StopTimeout)
		a.killAll()
	}
	a.stopT = time.NewTimer(5 * time.Second)
}

func (a *service) signalAll(sig syscall.Signal) {
	if a.cg != "" {
		_ = cgSignal(a.cg, sig)
		return
	}
	for _, p := range a.members() {
		_ = unix.Kill(p, sig)
	}
}

func (a *service) killAll() {
	if a.cg != "" {
		a.cgKilled = true
		if err := cgKill(a.cg); err != nil {
			a.sup.log.Error("kill", "service", a.name, "err", err)
		}
		return
	}
	if a.main != nil {
		_ = a.main.signal(syscall.SIGKILL)
		_ = unix.Kill(-a.main.pid, syscall.SIGKILL)
	}
	for _, p := range a.members() {
		_ = unix.Kill(p, syscall.SIGKILL)
	}
}

// ended runs when the service has no process left (for StopMain: its main
// process ended).
func (a *service) ended() {
	a.cancelProbe()
	stopTimer(&a.stopT)
	stopTimer(&a.pollT)
	if a.main != nil {
		a.main.close()
		a.main = nil
	}
	a.unready()
	a.afterEnd()
}

// afterEnd decides what follows the end of a run: stopped, started again
// (a requested restart, or the restart policy after a crash), or failed.
func (a *service) afterEnd() {
	switch {
	case !a.want:
		a.toStopped()
		return
	case a.pendingRestart:
		a.pendingRestart = false
		a.replyStops(nil)
		a.begin()
		return
	}
	failed := a.failed
	a.failed = false
	policy := a.spec.Restart
	if policy == RestartNever || (policy == RestartOnFailure && !failed) {
		if failed {
			a.setPhase(StateFailed)
		} else {
			a.setPhase(StateStopped)
		}
		a.want = false
		a.saveRecord()
		return
	}
	if !a.startedAt.IsZero() && time.Since(a.startedAt) >= a.spec.HealthyAfter {
		a.crashes = 0
	}
	delay := backoff(a.spec, a.crashes)
	a.crashes++
	a.restarts++
	a.saveRecord()
	if delay <= 0 {
		a.begin()
		return
	}
	a.setPhase(StateBackoff)
	a.nextStart = time.Now().Add(delay)
	a.log.agentf("restarting in %v", delay.Round(time.Millisecond))
	a.backoffT = time.NewTimer(delay)
}

func (a *service) backoffFired() {
	a.nextStart = time.Time{}
	switch a.phase {
	case StateBackoff, StateWaiting:
		a.begin()
	}
}

// backoff is the delay before restart number n (0-based) of a crash loop:
// BackoffMin first (0: at once), then doubling from max(BackoffMin, 100ms),
// capped at BackoffMax, with jitter that takes up to a quarter off so that
// services crashing together do not restart in lockstep. The delays still
// grow: a quarter off the double is more than the single.
func backoff(s Spec, n int) time.Duration {
	if n == 0 {
		return s.BackoffMin
	}
	step := max(s.BackoffMin, 100*time.Millisecond)
	d := step
	for i := 1; i < n && d < s.BackoffMax; i++ {
		d *= 2
	}
	if s.BackoffMin > 0 {
		d *= 2
	}
	d = min(d, s.BackoffMax)
	return d - time.Duration(rand.Int64N(int64(d)/4+1))
}

func (a *service) toStopped() {
	a.cancelDeps()
	a.cancelProbe()
	stopTimer(&a.backoffT)
	stopTimer(&a.stopT)
	stopTimer(&a.pollT)
	a.nextStart = time.Time{}
	a.unready()
	a.setPhase(StateStopped)
	a.replyStops(nil)
	a.saveRecord()
	if a.removing {
		a.finishRemove()
	}
}

func (a *service) replyStops(err error) {
	for _, c := range a.stopWaiters {
		a.answer(c, err)
	}
	a.stopWaiters = nil
}

func (a *service) finishRemove() {
	var errs []error
	a.closeNotify()
	a.sup.unwatchCgroup(a)
	if a.cg != "" {
		if err := cgRemove(a.cg); err != nil {
			errs = append(errs, err)
		}
	}
	if a.memcg != "" || a.sup.memV1 != "" {
		_ = unix.Rmdir(filepath.Join(a.sup.memV1, a.name))
	}
	_ = os.Remove(filepath.Join(a.dir, "record.json"))
	_ = os.Remove(filepath.Join(a.dir, "lock"))
	a.sup.mu.Lock()
	if a.sup.svcs[a.name] == a {
		delete(a.sup.svcs, a.name)
	}
	a.sup.mu.Unlock()
	a.log.close()
	err := errors.Join(errs...)
	for _, c := range a.removeWaiters {
		a.answer(c, err)
	}
	a.removeWaiters = nil
	a.exit = true
}

// detach lets go of the service without touching its processes.
func (a *service) detach() {
	a.cancelDeps()
	a.cancelProbe()
	stopTimer(&a.backoffT)
	stopTimer(&a.stopT)
	stopTimer(&a.pollT)
	if a.main != nil {
		a.main.close()
	}
	a.closeNotify()
	a.sup.unwatchCgroup(a)
	err := fmt.Errorf("service %q: supervisor closed", a.name)
	a.replyStarts(err)
	a.replyStops(err)
	for _, c := range a.removeWaiters {
		a.answer(c, err)
	}
	a.log.close()
	a.exit = true
}

func (a *service) reload() error {
	sig := a.spec.ReloadSignal
	if a.main != nil {
		if err := a.main.signal(sig); err != nil {
			return fmt.Errorf("service %q: reload: %w", a.name, err)
		}
		a.log.agentf("sent %s to pid %d (reload)", signalName(sig), a.main.pid)
		return nil
	}
	if (a.phase == StateRunning || a.phase == StateStarting) && a.spec.StopMode == StopCgroup && a.occupied() {
		a.signalAll(sig)
		return nil
	}
	return fmt.Errorf("service %q: reload: not running", a.name)
}

// update applies a new spec: in place, or with a restart when what the
// process was started with changed. The answer comes once the new process
// is started.
func (a *service) update(spec Spec, reply chan error) {
	old := a.spec
	a.mu.Lock()
	a.spec = spec
	a.mu.Unlock()
	a.configure()
	if execHash(old) == execHash(spec) {
		if a.phase != StateStopped && a.phase != StateFailed {
			a.saveRecord()
		}
		if a.phase == StateWaiting && !slices.Equal(old.After, spec.After) {
			a.begin() // wait for the new dependencies instead
		}
		a.answer(reply, nil)
		return
	}
	switch a.phase {
	case StateStopped, StateFailed:
		a.answer(reply, nil)
		return
	}
	a.log.agentf("configuration changed: restarting")
	a.startWaiters = append(a.startWaiters, reply)
	a.restartNow()
}

func (a *service) openNotify() error {
	if a.notifyConn != nil {
		return nil
	}
	c, err := listenNotify(a.notifyPath)
	if err != nil {
		return err
	}
	if err := a.notifyAccess(); err != nil {
		c.Close()
		return err
	}
	// With SO_PASSCRED every datagram carries its sender's pid, checked
	// against the service's processes.
	if rc, err := c.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
		})
	}
	a.notifyConn = c
	go func() {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			pid := 0
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					if cred, err := unix.ParseUnixCredentials(&m); err == nil {
						pid = int(cred.Pid)
					}
				}
			}
			a.send(event{kind: evNotify, notify: parseNotify(buf[:n]), sender: pid})
		}
	}()
	return nil
}

// notifyAccess lets a service that runs as another user reach its notify
// socket: the socket becomes the user's, and the two directories above it
// searchable (not listable; the files in them stay 0600).
func (a *service) notifyAccess() error {
	if a.spec.User == "" && a.spec.Group == "" {
		return nil
	}
	cred, err := credential(a.spec)
	if err != nil || cred == nil {
		return err
	}
	if err := os.Chown(a.notifyPath, int(cred.Uid), int(cred.Gid)); err != nil {
		return fmt.Errorf("notify socket: %w", err)
	}
	for _, d := range []string{a.sup.opts.StateDir, a.dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			return fmt.Errorf("notify socket: %w", err)
		}
	}
	return nil
}

func (a *service) closeNotify() {
	if a.notifyConn != nil {
		a.notifyConn.Close()
		a.notifyConn = nil
	}
}

// oomCount reads how many OOM kills the service's memory cgroup has seen.
func (a *service) oomCount() int64 {
	switch {
	case a.cg != "" && a.sup.memV2:
		return readKeyed(filepath.Join(a.cg, "memory.events"), "oom_kill")
	case a.sup.memV1 != "":
		return readKeyed(filepath.Join(a.sup.memV1, a.name, "memory.oom_control"), "oom_kill")
	}
	return 0
}

// checkOOM counts the OOM kills since the last look (oomBase, taken when
// the run began) and reports whether there were any.
func (a *service) checkOOM() bool {
	n := a.oomCount()
	if n < a.oomBase {
		a.oomBase = 0 // the cgroup was made anew under the run: it counts from 0
	}
	if n > a.oomBase {
		a.oomKills += int(n - a.oomBase)
		a.oomBase = n
		return true
	}
	return false
}
