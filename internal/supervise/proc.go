package supervise

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/atomicfile"
)

// procStat is what steppe reads of /proc/PID/stat.
type procStat struct {
	state     byte
	ppid      int
	pgrp      int
	sid       int    // session id
	startTime uint64 // field 22, clock ticks after boot: tells a reused pid apart
}

func readProcStat(pid int) (procStat, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	// The command name (field 2) may contain spaces and parentheses.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 20 {
		return procStat{}, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	var st procStat
	st.state = f[0][0]
	st.ppid, _ = strconv.Atoi(f[1])
	st.pgrp, _ = strconv.Atoi(f[2])
	st.sid, _ = strconv.Atoi(f[3])
	st.startTime, _ = strconv.ParseUint(f[19], 10, 64)
	return st, nil
}

// alive reports whether pid is a live (not zombie) process that started at
// startTime, so a pid reused by an unrelated process is not taken for it.
func alive(pid int, startTime uint64) bool {
	if pid <= 0 {
		return false
	}
	st, err := readProcStat(pid)
	if err != nil {
		return false
	}
	return st.state != 'Z' && st.state != 'X' && (startTime == 0 || st.startTime == startTime)
}

// proc is a service's main process as the supervisor tracks it.
type proc struct {
	pid       int
	startTime uint64
	pidfd     *os.File // nonblocking pidfd, registered with the runtime poller
}

// openProc opens a pidfd for pid and checks, after opening (so the pid
// cannot be reused in between), that it is the process that started at
// startTime (0: any).
func openProc(pid int, startTime uint64) (*proc, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	return newProc(pid, fd, startTime)
}

func newProc(pid, fd int, startTime uint64) (*proc, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	st, err := readProcStat(pid)
	if err != nil || st.state == 'Z' || (startTime != 0 && st.startTime != startTime) {
		unix.Close(fd)
		return nil, fmt.Errorf("process %d is gone", pid)
	}
	return &proc{pid: pid, startTime: st.startTime, pidfd: os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid))}, nil
}

// signal sends sig through the pidfd, which cannot hit a reused pid.
func (p *proc) signal(sig syscall.Signal) error {
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.PidfdSendSignal(int(fd), sig, nil, 0)
	}); err != nil {
		return err
	}
	if errors.Is(serr, unix.ESRCH) {
		return nil
	}
	return serr
}

// wait blocks, without holding a thread, until the process exits or the
// pidfd is closed. It returns the exit status if the process was this
// process's child (reaping it), or ok=false if the status cannot be known.
func (p *proc) wait() (ws unix.WaitStatus, known bool, err error) {
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return 0, false, err
	}
	err = rc.Read(func(fd uintptr) bool {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(pfd, 0)
		return n > 0
	})
	if err != nil {
		return 0, false, err
	}
	// A child of ours is a zombie until reaped; its pid cannot be reused
	// before, so waiting by pid is safe. Others give ECHILD.
	wpid, werr := unix.Wait4(p.pid, &ws, unix.WNOHANG, nil)
	if werr == nil && wpid == p.pid {
		return ws, true, nil
	}
	return 0, false, nil
}

func (p *proc) close() {
	if p != nil && p.pidfd != nil {
		p.pidfd.Close()
	}
}

// describeExit renders a wait status as status shows it.
func describeExit(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return "exit " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		return "signal " + signalName(ws.Signal())
	}
	return "unknown"
}

func signalName(sig syscall.Signal) string {
	n := unix.SignalName(sig)
	if n == "" {
		return strconv.Itoa(int(sig))
	}
	return strings.TrimPrefix(n, "SIG")
}

// record is what survives an agent restart, per service, in StateDir.
type record struct {
	PID       int       `json:"pid"`
	StartTime uint64    `json:"start_time"` // /proc/PID/stat field 22
	Restarts  int       `json:"restarts"`
	Hash      string    `json:"hash"` // execHash of the spec it runs with
	Ready     bool      `json:"ready"`
	Since     time.Time `json:"since"`
	OOMKills  int       `json:"oom_kills,omitempty"`
	// Stop settings, so a service whose spec disappeared while the agent
	// was down can still be stopped the way it asked.
	StopSignal  syscall.Signal `json:"stop_signal"`
	StopTimeout time.Duration  `json:"stop_timeout"`
	StopMode    StopMode       `json:"stop_mode"`
	// Spawning (with PID 0) says that a main process was being spawned,
	// from this boot-time clock tick on (see markSpawn).
	Spawning uint64 `json:"spawning,omitempty"`
}

// userHZ is the unit of the times in /proc/PID/stat (USER_HZ: 100 on
// every Linux port Go supports).
const userHZ = 100

// bootTick is now on the clock of /proc/PID/stat's start times: clock
// ticks since boot, rounded down as the kernel rounds them.
func bootTick() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return uint64(ts.Nano()) / (1e9 / userHZ)
}

func readRecord(dir string) (record, error) {
	var r record
	data, err := os.ReadFile(filepath.Join(dir, "record.json"))
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return r, fmt.Errorf("parse %s: %w", filepath.Join(dir, "record.json"), err)
	}
	return r, nil
}

// writeRecordData replaces the record atomically and durably
// (atomicfile: temp file, fsync, rename, fsync of the directory), so an
// agent killed mid-write, or a machine that loses power, leaves the old
// record or the new one, never half, and never the old one after a start
// that was answered.
func writeRecordData(dir string, data []byte) error {
	if err := atomicfile.WriteFile(filepath.Join(dir, "record.json"), data, 0o600); err != nil {
		return fmt.Errorf("write record: %w", err)
	}
	return nil
}

// credential resolves Spec.User and Spec.Group; nil means "as the agent".
func credential(s Spec) (*syscall.Credential, error) {
	if s.User == "" && s.Group == "" {
		return nil, nil
	}
	c := &syscall.Credential{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid())}
	if s.User != "" {
		u, err := user.LookupId(s.User)
		if err != nil {
			u, err = user.Lookup(s.User)
		}
		if err != nil {
			return nil, fmt.Errorf("user %q: %w", s.User, err)
		}
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		c.Uid, c.Gid = uint32(uid), uint32(gid)
		if gids, err := u.GroupIds(); err == nil {
			for _, g := range gids {
				if n, err := strconv.ParseUint(g, 10, 32); err == nil {
					c.Groups = append(c.Groups, uint32(n))
				}
			}
		}
	}
	if s.Group != "" {
		g, err := user.LookupGroupId(s.Group)
		if err != nil {
			g, err = user.LookupGroup(s.Group)
		}
		if err != nil {
			return nil, fmt.Errorf("group %q: %w", s.Group, err)
		}
		gid, _ := strconv.ParseUint(g.Gid, 10, 32)
		c.Gid = uint32(gid)
	}
	if c.Groups == nil {
		c.Groups = []uint32{c.Gid}
	}
	return c, nil
}
