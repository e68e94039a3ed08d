package supervise

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ExecArg is the hidden first argument that makes steppe act as the exec
// trampoline: main calls ExecMain(os.Args[2:]) when os.Args[1] == ExecArg.
const ExecArg = "__steppe-exec"

// ExecMain is the body of the exec trampoline. The supervisor uses it when a
// service needs a cgroup v1 memory limit: the child must be in the limited
// memory cgroup before it runs any code of its own, and clone3 can only place
// it into a cgroup v2. So the trampoline, already in the service's v2 cgroup,
// moves itself into the v1 memory cgroup, drops privileges if asked, and
// replaces itself with the real command.
//
// args (after ExecArg) are: the cgroup.procs file to join ("-" for none),
// uid, gid and comma-separated supplementary gids ("-" each to keep), the
// command's path, then its arguments. It returns only on failure.
func ExecMain(args []string) error {
	if len(args) < 5 {
		return errors.New("exec trampoline: too few arguments")
	}
	procs, uid, gid, groups, command, rest := args[0], args[1], args[2], args[3], args[4], args[5:]
	if procs != "-" {
		if err := os.WriteFile(procs, []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return fmt.Errorf("exec trampoline: join memory cgroup: %w", err)
		}
	}
	if groups != "-" {
		var gs []int
		for g := range strings.SplitSeq(groups, ",") {
			n, err := strconv.Atoi(g)
			if err != nil {
				return fmt.Errorf("exec trampoline: bad group %q", g)
			}
			gs = append(gs, n)
		}
		if err := syscall.Setgroups(gs); err != nil {
			return fmt.Errorf("exec trampoline: setgroups: %w", err)
		}
	}
	if gid != "-" {
		n, err := strconv.Atoi(gid)
		if err != nil {
			return fmt.Errorf("exec trampoline: bad gid %q", gid)
		}
		if err := syscall.Setgid(n); err != nil {
			return fmt.Errorf("exec trampoline: setgid: %w", err)
		}
	}
	if uid != "-" {
		n, err := strconv.Atoi(uid)
		if err != nil {
			return fmt.Errorf("exec trampoline: bad uid %q", uid)
		}
		if err := syscall.Setuid(n); err != nil {
			return fmt.Errorf("exec trampoline: setuid: %w", err)
		}
	}
	argv := append([]string{command}, rest...)
	if err := unix.Exec(command, argv, os.Environ()); err != nil {
		return fmt.Errorf("exec trampoline: exec %s: %w", command, err)
	}
	return nil
}

// trampolineArgs builds the argv that runs command through the trampoline.
func trampolineArgs(prefix []string, procs string, cred *syscall.Credential, command string, args []string) []string {
	uid, gid, groups := "-", "-", "-"
	if cred != nil {
		uid, gid = strconv.Itoa(int(cred.Uid)), strconv.Itoa(int(cred.Gid))
		gs := make([]string, len(cred.Groups))
		for i, g := range cred.Groups {
			gs[i] = strconv.Itoa(int(g))
		}
		groups = strings.Join(gs, ",")
		if groups == "" {
			groups = gid
		}
	}
	out := append([]string{}, prefix...)
	out = append(out, ExecArg, procs, uid, gid, groups, command)
	return append(out, args...)
}
