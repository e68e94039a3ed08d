package initmode

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/backoff"
	"github.com/steppe/steppe/internal/image"
)

// reaper waits for every child of PID 1: its own (the agent) and every
// orphan the kernel hands it. exec.Cmd.Wait is never used: a wait for
// one pid would race this wait for any.
type reaper struct {
	mu      sync.Mutex
	waiting map[int]chan unix.WaitStatus
}

func newReaper() *reaper {
	r := &reaper{waiting: map[int]chan unix.WaitStatus{}}
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, unix.SIGCHLD)
	go func() {
		for range ch {
			r.reap()
		}
	}()
	return r
}

func (r *reaper) reap() {
	for {
		var st unix.WaitStatus
		pid, err := unix.Wait4(-1, &st, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
		r.mu.Lock()
		c, ok := r.waiting[pid]
		delete(r.waiting, pid)
		r.mu.Unlock()
		if ok {
			c <- st
		}
	}
}

// watch returns a channel that gets pid's exit status.
func (r *reaper) watch(pid int) <-chan unix.WaitStatus {
	c := make(chan unix.WaitStatus, 1)
	r.mu.Lock()
	r.waiting[pid] = c
	r.mu.Unlock()
	// It may have exited before it was watched.
	r.reap()
	return c
}

// children counts the processes left besides init and kernel threads.
func (r *reaper) children() int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: kernel threads descend from kthreadd (2).
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) > 1 && f[1] != "2" && pid != 2 {
			n++
		}
	}
	return n
}

// agentProc is `steppe agent`, init's one child.
type agentProc struct {
	log    *slog.Logger
	reaper *reaper
	mu     sync.Mutex
	pid    int
	exited <-chan unix.WaitStatus
	// initStart is when init started, for the boot's timings in the log.
	initStart time.Time
}

// keep runs the agent until a shutdown is asked for, restarting it
// whenever it exits (backing off when it keeps failing), and returns why
// it stopped.
func (a *agentProc) keep(ctx context.Context, sigs <-chan os.Signal, powerOff <-chan string) string {
	policy := backoff.Policy{Min: 200 * time.Millisecond, Max: 10 * time.Second, Factor: 2, Jitter: 0.2}
	failures := 0
	for {
		started := time.Now()
		if err := a.start(); err != nil {
			a.log.Error("start agent", "err", err)
		} else {
			select {
			case st := <-a.exited:
				a.log.Error("agent exited; restarting it", "status", describe(st), "ran", time.Since(started).Round(time.Millisecond))
			case s := <-sigs:
				return s.String()
			case r := <-powerOff:
				return r
			case <-ctx.Done():
				return "context done"
			}
		}
		if time.Since(started) > agentHealthy {
			failures = 0
		}
		d := policy.Delay(failures)
		failures++
		select {
		case <-time.After(d):
		case s := <-sigs:
			return s.String()
		case r := <-powerOff:
			return r
		}
	}
}

func (a *agentProc) start() error {
	// init restarts the agent (keep): a failed self-upgrade leaves that to it.
	cmd := exec.Command("/proc/self/exe", "agent", "-config", AgentConfig, "-restarted-by-init")
	cmd.Args[0] = "steppe"
	cmd.Stdin = nil
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}
	if err := cmd.Start(); err != nil {
		return err
	}
	a.mu.Lock()
	a.pid = cmd.Process.Pid
	a.exited = a.reaper.watch(a.pid)
	a.mu.Unlock()
	a.log.Info("agent started", "pid", a.pid, "since_init", time.Since(a.initStart).Round(time.Millisecond))
	return nil
}

// kill SIGKILLs the agent, as a crash would, and returns its pid.
func (a *agentProc) kill() int {
	a.mu.Lock()
	pid := a.pid
	a.mu.Unlock()
	if pid > 0 {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	return pid
}

// stop asks the agent to stop (it stops its services in order) and kills
// it when it takes longer than budget.
func (a *agentProc) stop(budget time.Duration) {
	a.mu.Lock()
	pid, exited := a.pid, a.exited
	a.mu.Unlock()
	if pid == 0 {
		return
	}
	_ = unix.Kill(pid, unix.SIGTERM)
	select {
	case <-exited:
		a.log.Info("agent stopped")
	case <-time.After(budget):
		a.log.Error("agent did not stop in time; killing it", "budget", budget)
		_ = unix.Kill(pid, unix.SIGKILL)
	}
}

func describe(st unix.WaitStatus) string {
	switch {
	case st.Exited():
		return "exit " + strconv.Itoa(st.ExitStatus())
	case st.Signaled():
		return "signal " + st.Signal().String()
	}
	return "status " + strconv.Itoa(int(st))
}

// findPort returns the /dev node of the virtio-serial port named name.
func findPort(name string) string {
	ents, _ := os.ReadDir("/sys/class/virtio-ports")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + e.Name()
		}
	}
	return ""
}

// serveAPIPort carries the agent's local API over the virtio-serial port
// the provider connects to: the same one-JSON-line request and one JSON
// answer per connection as the unix socket, framed by that line, so the
// host needs no other protocol (`steppe agent status -socket` on the
// provider's end of the port works as on the machine).
func serveAPIPort(ctx context.Context, log *slog.Logger, socket string, a *agentProc) {
	var dev string
	for dev = findPort(image.APIPortName); dev == ""; dev = findPort(image.APIPortName) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	for ctx.Err() == nil {
		if err := servePort(ctx, log, dev, socket, a); err != nil {
			log.Warn("API port", "device", dev, "err", err)
			time.Sleep(time.Second)
		}
	}
}

// KillAgentRequest is the one request init answers itself on the API
// port: it SIGKILLs the agent (which init then restarts, and which adopts
// its services). A test hook for a crash; the port is the provider's
// channel, reachable only by root on the host.
const KillAgentRequest = `{"op":"init.kill-agent"}`

func servePort(ctx context.Context, log *slog.Logger, dev, socket string, a *agentProc) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	for ctx.Err() == nil {
		line, err := br.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			// Nobody on the host's end: read returns at once until someone connects.
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if err != nil {
			return err
		}
		if len(line) <= 1 {
			continue
		}
		if string(bytes.TrimSpace(line)) == KillAgentRequest {
			pid := a.kill()
			log.Warn("agent killed through the API port (test hook)", "pid", pid)
			fmt.Fprintf(f, `{"result":{"killed":%d}}`+"\n", pid)
			continue
		}
		c, err := net.DialTimeout("unix", socket, 2*time.Second)
		if err != nil {
			// The agent is (re)starting: answer as it would, with an error.
			_, _ = f.WriteString(`{"error":"steppe init: the agent is not answering yet"}` + "\n")
			continue
		}
		_, _ = c.Write(line)
		_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
		_, _ = io.Copy(f, c)
		c.Close()
	}
	return ctx.Err()
}
