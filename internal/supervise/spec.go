package supervise

import (
	"syscall"
	"time"
)

// StopMode says which processes a stop signals.
type StopMode string

const (
	// StopCgroup signals the main process; once it has exited, the
	// processes it left get the signal too. The whole cgroup is killed
	// (cgroup.kill) when StopTimeout passes with processes left.
	StopCgroup StopMode = "cgroup"
	// StopMain signals only the main process and waits for it alone. The
	// rest of the cgroup survives: a Nomad client's task executors must
	// outlive the agent.
	StopMain StopMode = "main"
)

// RestartPolicy says when a service that ended is started again.
type RestartPolicy string

const (
	RestartAlways    RestartPolicy = "always"
	RestartOnFailure RestartPolicy = "on-failure"
	RestartNever     RestartPolicy = "never"
)

// Spec declares one service. The zero value of every optional field means
// "the default" (see Defaults).
type Spec struct {
	Name    string
	Command string   // absolute path of the program
	Args    []string // arguments after the program name
	Env     []string // KEY=VALUE; the child gets only these plus NOTIFY_SOCKET
	Dir     string   // working directory; "" means /
	User    string   // name or numeric uid; "" means the agent's
	Group   string   // name or numeric gid; "" means the user's primary group

	// After names the services that must be ready before this one starts.
	After []string

	StopSignal   syscall.Signal // default SIGTERM
	StopTimeout  time.Duration  // default 10s
	StopMode     StopMode       // default StopCgroup
	ReloadSignal syscall.Signal // default SIGHUP

	Restart      RestartPolicy // default RestartAlways
	BackoffMin   time.Duration // first delay after a crash; default 0 (immediate)
	BackoffMax   time.Duration // cap of the exponential delay; default 30s
	HealthyAfter time.Duration // up this long resets the backoff; default 10s

	MemoryMax  int64 // bytes; 0 means no limit
	MemoryHigh int64 // bytes; 0 means none (cgroup v2 only)

	Ready *Readiness // nil: ready as soon as started

	LogMaxBytes int64 // rotate the log file past this size; default 10 MiB
	LogKeep     int   // rotated files kept; default 3
}

// Readiness says how to tell that a started service is ready. Exactly one of
// Notify, TCP, HTTP and Command is set.
type Readiness struct {
	Notify   bool          // sd_notify READY=1 through NOTIFY_SOCKET
	TCP      string        // host:port accepts a connection
	HTTP     string        // URL answers 2xx
	Command  []string      // exits 0
	Timeout  time.Duration // default 60s
	Interval time.Duration // between probes; default 50ms
}

// State is where a service is in its life.
type State string

const (
	StateStopped  State = "stopped"  // not running and not meant to be
	StateWaiting  State = "waiting"  // meant to run, waiting for its dependencies
	StateStarting State = "starting" // running, not ready yet
	StateRunning  State = "running"  // running and ready
	StateBackoff  State = "backoff"  // ended, waiting to be started again
	StateStopping State = "stopping"
	StateFailed   State = "failed" // ended and will not be started again by itself
)

// Status is a snapshot of one service, as status commands show it.
type Status struct {
	Name      string    `json:"name"`
	State     State     `json:"state"`
	PID       int       `json:"pid,omitempty"` // main process; 0 if none
	Processes int       `json:"processes"`     // processes in the service's cgroup
	Ready     bool      `json:"ready"`
	Restarts  int       `json:"restarts"`            // crashes restarted since the agent first started it
	Since     time.Time `json:"since"`               // when the current state began
	LastExit  string    `json:"last_exit,omitempty"` // "exit 1", "signal KILL", "oom"
	LastError string    `json:"last_error,omitempty"`
	OOMKills  int       `json:"oom_kills,omitempty"`
	NextStart time.Time `json:"next_start,omitzero"` // in backoff: when the next start is due
	Adopted   bool      `json:"adopted,omitempty"`   // found running at agent start and adopted
	// Isolation is "cgroup2" (a double fork cannot escape, no duplicate is
	// ever started) or "fallback" (process group + subreaper + lock: weaker).
	Isolation string `json:"isolation"`
	Cgroup    string `json:"cgroup,omitempty"`
	Log       string `json:"log"` // the service's log file (stdout and stderr); rotated copies are log.1, log.2, ...
	// Message is the last STATUS= the service sent through NOTIFY_SOCKET.
	Message string `json:"message,omitempty"`
}
