package agent

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/atomicfile"
)

// The agent upgrades itself when its release names a steppe artifact of
// another version than its own (SteppeProduct). It never restarts a
// daemon for it: the services run in cgroups of their own and are adopted
// by the new binary as by any restarted agent.
//
//  1. The artifact is fetched and verified like any other (signed
//     SHA256SUMS, digest), and run once as `steppe version`: it must say
//     the version the bundle names.
//  2. It is installed atomically over the agent's own binary (the file it
//     was started from); the previous binary is kept beside it, hard
//     linked as BINARY.prev.
//  3. A trial is recorded (STATE/steppe-trial.json: versions, paths, the
//     agent's argv, a deadline), and a watchdog is started from the
//     previous, known good binary (WatchArg). The agent then execs the new
//     binary: syscall.Exec keeps the pid, so the provider's pidfile, an
//     init's supervision and the daemons' parent stay as they were.
//  4. The new binary adopts every service, checks that its own API
//     answers, and commits the trial; the watchdog sees it and exits.
//  5. If the new binary dies, or has not committed by the deadline, the
//     watchdog kills it (when it still runs), puts the previous binary
//     back, records why, and runs the previous binary as the agent itself
//     (it execs into it), unless an init restarts the agent (the agent
//     was started with RestartedByInit): then it leaves that to the init,
//     which finds the previous binary at the path. A new binary that was
//     restarted after dying in its trial (an init, with the watchdog gone)
//     rolls itself back as it starts.
//
// The watchdog is a separate process of the old binary because a broken
// new binary cannot be trusted to roll itself back: one that exits at
// once, or hangs before it reads anything, never runs this code. A
// rolled-back version is not tried again until the bundle names another
// binary.

// SteppeProduct is the artifact product of steppe itself.
const SteppeProduct = "steppe"

// WatchArg is the hidden first argument that makes steppe the watchdog of
// a self-upgrade trial: main calls WatchMain(os.Args[2:]).
const WatchArg = "__steppe-upgrade-watch"

// DefaultUpgradeTimeout is how long a new binary has to commit its trial
// (agent { upgrade_timeout }).
const DefaultUpgradeTimeout = 20 * time.Second

const trialFile = "steppe-trial.json"

// Trial states.
const (
	TrialExec       = "exec"        // the old binary is about to exec the new one
	TrialStarted    = "started"     // the new binary runs and has not committed
	TrialCommitted  = "committed"   // the new binary runs healthy
	TrialRolledBack = "rolled-back" // the previous binary was put back
)

// trial is the record of one self-upgrade.
type trial struct {
	State    string    `json:"state"`
	Version  string    `json:"version"` // the new binary's
	From     string    `json:"from"`    // the previous binary's
	SHA256   string    `json:"sha256"`  // of the new binary
	Binary   string    `json:"binary"`  // the agent's binary path
	Previous string    `json:"previous,omitempty"`
	Args     []string  `json:"args,omitempty"` // the agent's argv
	PID      int       `json:"pid,omitempty"`
	Watchdog int       `json:"watchdog,omitempty"`
	ByInit   bool      `json:"by_init,omitempty"`
	Deadline time.Time `json:"deadline,omitzero"`
	Error    string    `json:"error,omitempty"`
	At       time.Time `json:"at"`
	// Failed are the digests of every binary rolled back on this machine:
	// none is tried again.
	Failed []string `json:"failed,omitempty"`
}

// rolledBack marks the trial failed for why.
func (t *trial) rolledBack(why string) {
	t.State, t.Error = TrialRolledBack, why
	if t.SHA256 != "" && !slices.Contains(t.Failed, t.SHA256) {
		t.Failed = append(t.Failed, t.SHA256)
	}
}

// failedBefore lists the binaries the machine rolled back so far.
func failedBefore(stateDir string) []string {
	if t, err := loadTrial(stateDir); err == nil && t != nil {
		return t.Failed
	}
	return nil
}

// SelfUpgradeStatus is the agent's last self-upgrade, as status shows it.
type SelfUpgradeStatus struct {
	Version string    `json:"version"`
	From    string    `json:"from"`
	State   string    `json:"state"`
	Error   string    `json:"error,omitempty"`
	At      time.Time `json:"at"`
}

func trialPath(stateDir string) string { return filepath.Join(stateDir, trialFile) }

func loadTrial(stateDir string) (*trial, error) {
	b, err := os.ReadFile(trialPath(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("self-upgrade trial: %w", err)
	}
	var t trial
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, fmt.Errorf("self-upgrade trial %s: %w", trialPath(stateDir), err)
	}
	return &t, nil
}

func saveTrial(stateDir string, t *trial) error {
	t.At = time.Now().UTC()
	if err := writeJSONAtomic(trialPath(stateDir), t); err != nil {
		return fmt.Errorf("self-upgrade trial: %w", err)
	}
	return nil
}

func (t *trial) status() *SelfUpgradeStatus {
	if t == nil {
		return nil
	}
	return &SelfUpgradeStatus{Version: t.Version, From: t.From, State: t.State, Error: t.Error, At: t.At}
}

// restore puts the previous binary back at the agent's path (atomically:
// a rename), if it is still kept.
func (t *trial) restore() error {
	if t.Previous == "" {
		return errors.New("no previous binary was kept")
	}
	if err := os.Rename(t.Previous, t.Binary); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if sum, herr := fileSHA256(t.Binary); herr == nil && sum != t.SHA256 {
				return nil // put back already
			}
		}
		return fmt.Errorf("put the previous steppe binary back: %w", err)
	}
	return atomicfile.SyncDir(filepath.Dir(t.Binary))
}

// selfStart runs as the agent starts, with the state dir locked: a trial
// in progress is either this binary's (the new one, started by the exec:
// it goes on, and commits once healthy) or over. It returns the trial the
// agent must commit, or nil. A new binary started again after it died in
// its trial rolls back and execs the previous binary (never returns).
func (a *Agent) selfStart(stateDir string) (*trial, error) {
	t, err := loadTrial(stateDir)
	if err != nil || t == nil {
		return nil, err
	}
	a.setSelfUpgrade(t)
	mine := t.Version == a.opts.Version
	switch t.State {
	case TrialExec:
		if !mine {
			// The exec did not happen (the old agent died before it).
			t.rolledBack("the new binary was never started")
			return nil, a.saveSelf(stateDir, t)
		}
		t.State, t.PID = TrialStarted, os.Getpid()
		return t, a.saveSelf(stateDir, t)
	case TrialStarted:
		if !mine {
			t.rolledBack(fmt.Sprintf("steppe %s died before it reported healthy; steppe %s was started again", t.Version, a.opts.Version))
			return nil, a.saveSelf(stateDir, t)
		}
		// Started a second time: the first start died without committing
		// (an init restarted it) and the watchdog did not put the previous
		// binary back. Do it now.
		t.rolledBack(fmt.Sprintf("steppe %s died before it reported healthy (restarted, rolled back to %s)", t.Version, t.From))
		if err := t.restore(); err != nil {
			return nil, fmt.Errorf("self-upgrade rollback: %w", err)
		}
		if err := a.saveSelf(stateDir, t); err != nil {
			return nil, err
		}
		a.log.Error("self-upgrade failed; running the previous binary", "version", t.Version, "previous", t.From)
		return nil, execAgent(t.Binary, t.Args)
	case TrialRolledBack:
		if mine {
			// A new binary started after the watchdog put the previous
			// one back (an init's restart raced it): run what is there.
			if sum, err := fileSHA256(t.Binary); err == nil && sum != t.SHA256 {
				return nil, execAgent(t.Binary, os.Args)
			}
		}
	}
	return nil, nil
}

// commitSelf commits the trial once the new binary runs healthy: its own
// API answers and every service was adopted (the first apply went
// through). The watchdog sees the commit and exits; it is this process's
// child (the old binary started it), so it is reaped here.
func (a *Agent) commitSelf(ctx context.Context, t *trial, cfg *Config) error {
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := NewClient(cfg.Socket).Status(sctx); err != nil {
		return fmt.Errorf("self-upgrade: the agent's own API does not answer: %w", err)
	}
	t.State, t.Error = TrialCommitted, ""
	if err := a.saveSelf(cfg.StateDir, t); err != nil {
		return err
	}
	a.log.Info("self-upgrade committed", "version", t.Version, "from", t.From)
	if w := t.Watchdog; w > 0 {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", w)); err == nil && parentOf(st) == os.Getpid() {
			go func() {
				var ws unix.WaitStatus
				_, _ = unix.Wait4(w, &ws, 0, nil)
			}()
		}
	}
	return nil
}

// parentOf reads the ppid from a /proc/PID/stat text.
func parentOf(stat []byte) int {
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}

func (a *Agent) saveSelf(stateDir string, t *trial) error {
	a.setSelfUpgrade(t)
	return saveTrial(stateDir, t)
}

func (a *Agent) setSelfUpgrade(t *trial) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.selfStatus = t.status()
}

// selfUpgrade moves the agent to the steppe binary of its release, when
// the release names another version than the agent's. It returns only
// when it did not exec (nothing to do, or a failure, which status shows);
// a version that was rolled back before is not tried again.
func (a *Agent) selfUpgrade(ctx context.Context, art *steppeArtifact) {
	if art == nil || art.Version == a.opts.Version || a.opts.Version == "" {
		return
	}
	cfg := a.currentConfig()
	sum, err := fileSHA256(art.Path)
	if err != nil {
		a.selfFailed(cfg, art, "", fmt.Errorf("read the artifact: %w", err))
		return
	}
	if slices.Contains(failedBefore(cfg.StateDir), sum) {
		return // failed before: status says why
	}
	// No apply runs while the binary changes and the process is replaced.
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	if err := a.execUpgrade(ctx, cfg, art, sum); err != nil {
		a.selfFailed(cfg, art, sum, err)
	}
}

func (a *Agent) selfFailed(cfg *Config, art *steppeArtifact, sum string, err error) {
	a.log.Error("self-upgrade refused; the agent keeps running its binary", "version", art.Version, "running", a.opts.Version, "err", err)
	t := &trial{Version: art.Version, From: a.opts.Version, SHA256: sum, Binary: a.binary, Failed: failedBefore(cfg.StateDir)}
	t.rolledBack(err.Error())
	if serr := a.saveSelf(cfg.StateDir, t); serr != nil {
		a.log.Error("recording the failed self-upgrade", "err", serr)
	}
}

// execUpgrade checks, installs and execs the new binary. It returns only
// on failure, with the agent's binary as it was.
func (a *Agent) execUpgrade(ctx context.Context, cfg *Config, art *steppeArtifact, sum string) error {
	if a.binary == "" {
		return errors.New("the agent does not know its own binary's path")
	}
	a.log.Info("self-upgrade", "version", art.Version, "from", a.opts.Version, "binary", a.binary)
	// Checked before anything changes: the new binary runs and is the
	// version the bundle says.
	pending, err := atomicfile.CreateCopy(art.Path, a.binary, 0o755)
	if err != nil {
		return fmt.Errorf("install beside %s: %w", a.binary, err)
	}
	defer pending.Discard()
	if err := CheckVersion(ctx, pending.TempName(), art.Version); err != nil {
		return err
	}
	prev := a.binary + ".prev"
	if err := linkReplace(a.binary, prev); err != nil {
		return fmt.Errorf("keep the previous binary: %w", err)
	}
	timeout := cfg.UpgradeTimeout
	if timeout == 0 {
		timeout = DefaultUpgradeTimeout
	}
	t := &trial{
		State: TrialExec, Version: art.Version, From: a.opts.Version, SHA256: sum,
		Binary: a.binary, Previous: prev, Args: os.Args, PID: os.Getpid(),
		ByInit: a.opts.RestartedByInit, Deadline: time.Now().Add(timeout).UTC(),
		Failed: failedBefore(cfg.StateDir),
	}
	if err := a.saveSelf(cfg.StateDir, t); err != nil {
		return err
	}
	if err := pending.Commit(); err != nil {
		return fmt.Errorf("install over %s: %w", a.binary, err)
	}
	wd, err := startWatchdog(cfg.StateDir)
	if err != nil {
		return errors.Join(err, t.restore())
	}
	t.Watchdog = wd.Process.Pid
	if err := a.saveSelf(cfg.StateDir, t); err != nil {
		_ = wd.Process.Kill()
		_, _ = wd.Process.Wait()
		return errors.Join(err, t.restore())
	}
	a.log.Info("self-upgrade: exec", "binary", a.binary, "version", art.Version, "watchdog", wd.Process.Pid)
	err = execAgent(a.binary, os.Args)
	// Still here: the exec failed, nothing changed but the file.
	_ = wd.Process.Kill()
	_, _ = wd.Process.Wait()
	return errors.Join(fmt.Errorf("exec %s: %w", a.binary, err), t.restore())
}

// execAgent replaces this process with the agent binary at path.
func execAgent(path string, args []string) error {
	return syscall.Exec(path, args, os.Environ())
}

// CheckVersion runs `BINARY version` and wants "steppe VERSION".
func CheckVersion(ctx context.Context, bin, want string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "version").Output()
	line, _, _ := strings.Cut(string(out), "\n")
	if err != nil {
		return fmt.Errorf("the new binary does not run (%s version: %v)", bin, err)
	}
	if strings.TrimSpace(line) != "steppe "+want {
		return fmt.Errorf("the new binary says %q, want \"steppe %s\"", strings.TrimSpace(line), want)
	}
	return nil
}

// linkReplace makes dst a hard link of src, replacing dst atomically.
func linkReplace(src, dst string) error {
	tmp := dst + ".tmp"
	_ = os.Remove(tmp)
	if err := os.Link(src, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// startWatchdog starts the watchdog from this very (previous) binary and
// returns once it holds a pidfd of the agent.
func startWatchdog(stateDir string) (*exec.Cmd, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command("/proc/self/exe", WatchArg, stateDir)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr // the agent's log
	cmd.ExtraFiles = []*os.File{w}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return nil, fmt.Errorf("start the self-upgrade watchdog: %w", err)
	}
	armed := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		if err == nil && line != "armed\n" {
			err = fmt.Errorf("said %q", line)
		}
		armed <- err
	}()
	select {
	case err = <-armed:
	case <-time.After(10 * time.Second):
		err = errors.New("no answer within 10s")
	}
	if err != nil {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		return nil, fmt.Errorf("self-upgrade watchdog: %w", err)
	}
	return cmd, nil
}

// WatchMain is the watchdog of a self-upgrade trial (args: the agent's
// state dir). It waits for the new binary to commit; if the agent dies
// first or the deadline passes, it rolls back (see the comment at the top
// of this file). It returns only on failure or when its work is done.
func WatchMain(args []string) error {
	if len(args) != 1 {
		return errors.New("want the agent's state dir")
	}
	dir := args[0]
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("watchdog", os.Getpid())
	t, err := loadTrial(dir)
	if err != nil {
		return err
	}
	if t == nil || t.PID <= 0 {
		return errors.New("no trial to watch")
	}
	pidfd, err := unix.PidfdOpen(t.PID, 0)
	if err != nil {
		return fmt.Errorf("watch agent pid %d: %w", t.PID, err)
	}
	defer unix.Close(pidfd)
	armed := os.NewFile(3, "armed")
	_, err = armed.WriteString("armed\n")
	armed.Close()
	if err != nil {
		return err
	}
	deadline := t.Deadline
	for {
		pfd := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, _ := unix.Poll(pfd, 100)
		dead := n > 0
		cur, err := loadTrial(dir)
		if err == nil && cur != nil {
			switch cur.State {
			case TrialCommitted:
				log.Info("self-upgrade committed by the new binary", "version", cur.Version)
				return nil
			case TrialRolledBack:
				return nil // the new binary rolled itself back
			}
			t = cur
		}
		var why string
		switch {
		case dead:
			why = fmt.Sprintf("steppe %s exited before it reported healthy", t.Version)
		case time.Now().After(deadline):
			why = fmt.Sprintf("steppe %s did not report healthy by its deadline (%s)", t.Version, deadline.Format(time.RFC3339))
		default:
			continue
		}
		return watchRollback(log, dir, t, pidfd, dead, why)
	}
}

// watchRollback puts the previous binary back, stops the new one if it
// still runs, records why, and runs the previous binary unless an init
// does.
func watchRollback(log *slog.Logger, dir string, t *trial, pidfd int, dead bool, why string) error {
	log.Error("self-upgrade failed; rolling back", "version", t.Version, "to", t.From, "reason", why)
	// The binary first: an init that restarts the agent must find the
	// previous one.
	if err := t.restore(); err != nil {
		log.Error("self-upgrade rollback", "err", err)
	}
	if !dead {
		_ = unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
		pfd := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for range 100 {
			if n, _ := unix.Poll(pfd, 100); n > 0 {
				break
			}
		}
	}
	t.rolledBack(why + "; rolled back to " + t.From)
	if err := saveTrial(dir, t); err != nil {
		log.Error("self-upgrade rollback", "err", err)
	}
	if t.ByInit {
		log.Info("self-upgrade rolled back; the init restarts the agent", "binary", t.Binary)
		return nil
	}
	log.Info("self-upgrade rolled back; running the previous binary", "binary", t.Binary, "version", t.From)
	return execAgent(t.Binary, t.Args)
}
