// Package supervise runs daemons and never loses one or starts a second
// copy.
//
// Each service has a cgroup v2 of its own, Options.CgroupParent/<name>
// below the cgroup v2 the agent runs in (as under systemd with
// Delegate=yes), or below the v2 mount (found in /proc/self/mountinfo) for
// a CgroupParent that starts with "/". Its main process is cloned directly
// into it (clone3 CLONE_INTO_CGROUP), so no fork, double fork or setsid
// escapes. To enable the memory controller below its own cgroup the agent
// first moves itself into the leaf "agent" of it (cgroup v2 allows no
// process in a cgroup whose children have controllers). A service runs while its cgroup is populated: a
// daemon whose first process exits 0 after forking stays running, and its
// sole remaining process is followed as the main one. Exits are seen
// through pidfds and inotify on cgroup.events, both on the runtime poller:
// no thread per service.
//
// The main pid, its start time (which tells a reused pid apart), the
// restart count and a hash of the spec are kept in StateDir, replaced
// atomically and durably. A new Supervisor adopts every populated cgroup
// instead of starting the service again, and Apply stops running services
// that are no longer configured. A StopMain service's cgroup holds
// processes without its main one (a Nomad client's tasks), so before its
// clone the record gets a mark with the time, from which a new agent finds
// a main process whose pid the agent before died too soon to record.
//
// Stop sends the stop signal to the main process through its pidfd, then,
// once it has exited, to the processes it left; after the timeout it kills
// the whole cgroup (cgroup.kill). For StopMain it signals and kills only
// the main process, leaving the rest (a Nomad client's tasks) alone.
// Linux kills any process later cloned into a cgroup that was the target
// of cgroup.kill, so such a cgroup is replaced by a fresh one before the
// next start.
//
// Without a writable cgroup v2 (or with Options.Fallback) a service runs
// in its own session, the agent is a child subreaper, and the child
// inherits a locked file descriptor: a held lock, or a live recorded pid,
// means "running, adopt". Processes that close that descriptor and fork
// away escape; Status.Isolation says "fallback".
//
// Children never have a pipe to the agent: stdin is /dev/null, stdout and
// stderr an O_APPEND descriptor of the service's log file, so a killed
// agent does not kill its daemons with SIGPIPE. The agent follows the file
// for an in-memory tail and rotates it by copy-then-truncate (see logFile
// for the window this leaves).
//
// Memory limits use memory.max where the v2 memory controller is available,
// else the v1 memory controller: the service is started through the exec
// trampoline (ExecMain), which joins the v1 memory cgroup before executing
// the real command. OOM kills are read from memory.events or
// memory.oom_control and reported as LastExit "oom".
package supervise
