package supervise

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// spawn starts the main process: directly inside the service's cgroup v2
// (clone3 CLONE_INTO_CGROUP, so not even its first instruction runs
// outside), in its own session (no controlling terminal, ever), stdin
// /dev/null, stdout and stderr the O_APPEND log file.
func (a *service) spawn() (*proc, error) {
	sp := a.spec
	cred, err := credential(sp)
	if err != nil {
		return nil, err
	}
	env := slices.Clone(sp.Env)
	if sp.Ready != nil && sp.Ready.Notify {
		env = append(env, "NOTIFY_SOCKET="+a.notifyPath)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	sys := &syscall.SysProcAttr{Setsid: true}
	pidfd := -1
	sys.PidFD = &pidfd
	files := []uintptr{devnull.Fd(), a.log.w.Fd(), a.log.w.Fd()}

	argv0, argv := sp.Command, append([]string{sp.Command}, sp.Args...)
	if err := a.applyMemory(); err != nil {
		return nil, err
	}
	// OOM kills are counted from here: the counters of a cgroup made anew
	// (renewCgroup, or the first start) begin at 0 again.
	a.oomBase = a.oomCount()
	a.markSysOOM()
	if a.memcg != "" {
		if len(a.sup.opts.Exec) == 0 {
			return nil, errors.New("a cgroup v1 memory limit needs the exec trampoline (Options.Exec)")
		}
		argv = trampolineArgs(a.sup.opts.Exec, filepath.Join(a.memcg, "cgroup.procs"), cred, sp.Command, sp.Args)
		argv0, cred = a.sup.opts.Exec[0], nil
	}
	sys.Credential = cred

	if a.cg != "" {
		cgfd, err := unix.Open(a.cg, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
		defer unix.Close(cgfd)
		sys.UseCgroupFD, sys.CgroupFD = true, cgfd
	} else {
		lock, err := takeLock(filepath.Join(a.dir, "lock"))
		if err != nil {
			return nil, err
		}
		// The child inherits the locked descriptor as fd 3; the agent
		// closes its own, so the lock is held exactly as long as a process
		// of the service keeps that descriptor.
		defer lock.Close()
		files = append(files, lock.Fd())
	}
	pid, err := syscall.ForkExec(argv0, argv, &syscall.ProcAttr{Dir: sp.Dir, Env: env, Files: files, Sys: sys})
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", sp.Command, err)
	}
	if pidfd < 0 {
		// No CLONE_PIDFD: the child cannot be reaped before we wait for
		// it, so its pid is still its own.
		if pidfd, err = unix.PidfdOpen(pid, 0); err != nil {
			return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
		}
	}
	_ = unix.SetNonblock(pidfd, true)
	st, _ := readProcStat(pid) // may already be a zombie: start time stays 0
	return &proc{pid: pid, startTime: st.startTime, pidfd: os.NewFile(uintptr(pidfd), "pidfd:"+strconv.Itoa(pid))}, nil
}

// takeLock opens and locks the service's lock file; it fails if a process
// of the service still holds it.
func takeLock(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errors.New("still running: a process holds the service's lock")
		}
		return nil, fmt.Errorf("lock: %w", err)
	}
	return f, nil
}

// lockHeld reports whether a process holds the lock file at path.
func lockHeld(path string) bool {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	_ = unix.Flock(fd, unix.LOCK_UN)
	return false
}

// lockHolders lists the processes that have the lock file at path open.
func lockHolders(path string) []int {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		fdDir := "/proc/" + e.Name() + "/fd"
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			var fst unix.Stat_t
			if unix.Stat(fdDir+"/"+fd.Name(), &fst) == nil && fst.Dev == st.Dev && fst.Ino == st.Ino {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}
