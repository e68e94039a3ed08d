package upgrade

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/atomicfile"
)

// StepKind is what a step does.
type StepKind string

const (
	// KindSnapshot saves and checks a snapshot of a product's raft state.
	KindSnapshot StepKind = "snapshot"
	// KindServer upgrades one server of a product and gates on it.
	KindServer StepKind = "server"
	// KindClient drains a client machine, upgrades its daemons in place
	// and makes it eligible again.
	KindClient StepKind = "client"
)

// StepStatus is where a step is.
type StepStatus string

const (
	StatusPending StepStatus = "pending"
	// StatusRunning is recorded before a step does anything: a step found
	// running by a new run was interrupted, and is verified before
	// anything is redone.
	StatusRunning StepStatus = "running"
	StatusDone    StepStatus = "done"
	StatusFailed  StepStatus = "failed"
)

// Phase is a timed part of a step.
type Phase struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

// Step is one step of a plan, with what happened to it.
type Step struct {
	ID      string     `json:"id"` // "server/consul/c-server-1"
	Kind    StepKind   `json:"kind"`
	Product string     `json:"product,omitempty"` // snapshot, server
	Machine string     `json:"machine,omitempty"` // server, client
	Address string     `json:"address,omitempty"`
	Pool    string     `json:"pool,omitempty"`
	From    string     `json:"from,omitempty"` // server: product version; client: "consul 1.14.8, nomad 1.9.3"
	To      string     `json:"to,omitempty"`
	Status  StepStatus `json:"status"`

	Attempts int       `json:"attempts,omitempty"`
	Started  time.Time `json:"started,omitzero"`
	Finished time.Time `json:"finished,omitzero"`
	Phases   []Phase   `json:"phases,omitempty"`
	// Resumed says the step was found interrupted and verified.
	Resumed  bool   `json:"resumed,omitempty"`
	Note     string `json:"note,omitempty"`     // leadership, "already on the target version"
	Snapshot string `json:"snapshot,omitempty"` // path of the snapshot saved
	Drained  int    `json:"drained,omitempty"`  // allocations on a client when its drain began
	// Replacement is the machine a surge created for this client machine
	// (recorded as soon as it exists, so a resumed upgrade does not create
	// another).
	Replacement        string `json:"replacement,omitempty"`
	ReplacementAddress string `json:"replacement_address,omitempty"`
	Error              string `json:"error,omitempty"`
}

// Duration is how long the step took (to now if it is not finished).
func (s *Step) Duration() time.Duration {
	if s.Started.IsZero() {
		return 0
	}
	if s.Finished.IsZero() {
		return time.Since(s.Started)
	}
	return s.Finished.Sub(s.Started)
}

// State is an upgrade's plan and progress, kept in the operator's state
// directory (StateFile) and replaced atomically after every change.
type State struct {
	Format  int               `json:"format"`
	Created time.Time         `json:"created"`
	From    map[string]string `json:"from"`   // product → version the cluster ran
	Target  map[string]string `json:"target"` // product → version asked for
	Clients ClientStrategy    `json:"clients"`
	Steps   []Step            `json:"steps"`
	Done    bool              `json:"done"`
}

const stateFormat = 1

// Files in Config.StateDir.
const (
	StateFile    = "upgrade.json"
	lockFile     = "upgrade.lock"
	SnapshotsDir = "snapshots"
)

// LoadState reads the state of the last upgrade in dir; nil, nil when
// there is none.
func LoadState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("upgrade state: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("upgrade state %s: %w", filepath.Join(dir, StateFile), err)
	}
	if s.Format != stateFormat {
		return nil, fmt.Errorf("upgrade state %s: format %d, this steppe reads %d", filepath.Join(dir, StateFile), s.Format, stateFormat)
	}
	return &s, nil
}

// save replaces the state file atomically: a crash leaves the old file or
// the new one, never a mix.
func (s *State) save(dir string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("upgrade state: %w", err)
	}
	path := filepath.Join(dir, StateFile)
	if err := atomicfile.WriteFile(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// lock takes the upgrade lock of dir: one upgrade at a time per state
// directory. The lock goes with the process, so a killed upgrade leaves
// none behind.
func lock(dir string) (release func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("upgrade lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another steppe upgrade is running on %s", dir)
		}
		return nil, fmt.Errorf("upgrade lock: %w", err)
	}
	return func() { f.Close() }, nil
}
