package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/supervise"
)

// A Nomad client whose own state will not open crash-loops for ever: a
// corrupt client/state.db makes it panic in bbolt at every start (seen:
// "panic: assertion failed: Page expected to be: 2, but self identifies
// as ..."), and the seed's operator moved client/ and alloc/ aside by
// hand. The agent does it: it recognises that failure in the log of the
// run that just ended, and only that one (any other crash loop is left to
// the restart policy), stops the client, kills the task processes it had
// left (nothing can re-attach to them any more), unmounts what Nomad had
// mounted below its data dir, moves client/ and alloc/ aside (the newest
// recoverKeep are kept for inspection), puts the node identity back and
// starts it again, so that it rejoins as the same node and the servers
// give it back its allocations.
const (
	// recoverPoll is how often the watcher looks at the services. A
	// failed start shows as one more restart, and the log of the run
	// that ended is read only then.
	recoverPoll = 250 * time.Millisecond
	// recoverKeep bounds the state directories kept aside per service.
	recoverKeep = 3
	// recoverQuiet is how long after a recovery a second one of the same
	// service is refused: a state that breaks again at once is not the
	// state's fault (a full or failing disk), and a person must look.
	recoverQuiet = 2 * time.Minute
	// recoverLogLines is how much of the service's log is read: Nomad's
	// panic and its stack are about 60 lines.
	recoverLogLines = 400
	// recoveredSuffix names the directory beside the data dir that holds
	// what was moved aside: <data_dir>.recovered/<UTC time>/.
	recoveredSuffix = ".recovered"
)

// Recovery is one recovery of a service's state, as status reports it.
type Recovery struct {
	Service string    `json:"service"`
	At      time.Time `json:"at"`
	// Reason is the log line of the failed run that was recognised.
	Reason string `json:"reason"`
	// MovedTo holds the client/ and alloc/ directories that were moved.
	MovedTo string `json:"moved_to"`
	// KeptIdentity: the node's client-id and secret-id were put back, so
	// it rejoins as the same node.
	KeptIdentity bool `json:"kept_identity"`
	// Killed is how many processes the client had left (task executors
	// and their tasks) that were killed; Unmounted how many mounts below
	// its data dir were removed.
	Killed    int    `json:"killed"`
	Unmounted int    `json:"unmounted"`
	Error     string `json:"error,omitempty"` // what went wrong; the service may still be down
	Took      string `json:"took"`
}

// Nomad's own words for a client state it cannot use (client/client.go,
// client/state/db_bolt.go of 1.9 and 1.10), found in the output of a run
// that ended. A panic counts only when its stack passes through the
// client's state package: bbolt's assertions on a corrupt page. Another
// Nomad holding the database (nomadStateBusy) is not corruption: moving
// the state aside under it would lose a live client's state.
const (
	nomadStateOpen    = "failed to open state database"
	nomadStateUpgrade = "failed to upgrade state database"
	nomadStateCorrupt = "Nomad is unable to start due to corrupt state"
	nomadStateBusy    = "timed out while opening database"
	nomadStatePackage = "github.com/hashicorp/nomad/client/state."
)

// The supervisor's own lines in a service's log (internal/supervise).
func isStartedLine(l string) bool {
	return strings.Contains(l, "steppe: started ") && strings.HasSuffix(l, ")")
}

func isEndedLine(l string) bool {
	_, after, ok := strings.Cut(l, "steppe: main process ")
	return ok && strings.Contains(after, " ended: ")
}

// lastRun is the output of the last run that ended, from the log's tail:
// the lines after the start before the last "main process N ended" line,
// up to it. nil when the tail holds no ended run.
func lastRun(lines []string) []string {
	end := -1
	for i := len(lines) - 1; i >= 0; i-- {
		if isEndedLine(lines[i]) {
			end = i
			break
		}
	}
	if end < 0 {
		return nil
	}
	start := 0
	for i := end - 1; i >= 0; i-- {
		if isStartedLine(lines[i]) {
			start = i + 1
			break
		}
	}
	return lines[start : end+1]
}

// nomadStateFailure says whether a run's output shows a Nomad client
// that failed because of its own state, and the line that says so.
func nomadStateFailure(run []string) (string, bool) {
	for _, l := range run {
		if strings.Contains(l, nomadStateBusy) {
			return "", false
		}
	}
	for _, l := range run {
		for _, e := range []string{nomadStateOpen, nomadStateUpgrade, nomadStateCorrupt} {
			if strings.Contains(l, e) {
				return strings.TrimSpace(l), true
			}
		}
	}
	panicLine := ""
	for _, l := range run {
		if panicLine == "" && strings.HasPrefix(l, "panic: ") {
			panicLine = strings.TrimSpace(l)
		}
		if panicLine != "" && strings.Contains(l, nomadStatePackage) {
			return panicLine, true
		}
	}
	return "", false
}

// nomadClientDataDir is the data dir of a Nomad agent service that runs a
// client, read from the JSON config files its -config arguments name (the
// files steppe renders). ok is false for anything else: a Nomad server,
// another program, a config it cannot read.
func nomadClientDataDir(spec supervise.Spec) (string, bool) {
	if len(spec.Args) == 0 || spec.Args[0] != "agent" {
		return "", false
	}
	dataDir, client := "", false
	for i, a := range spec.Args {
		var file string
		switch {
		case strings.HasPrefix(a, "-config="):
			file = strings.TrimPrefix(a, "-config=")
		case a == "-config" && i+1 < len(spec.Args):
			file = spec.Args[i+1]
		default:
			continue
		}
		if !filepath.IsAbs(file) && spec.Dir != "" {
			file = filepath.Join(spec.Dir, file)
		}
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		var c struct {
			DataDir string `json:"data_dir"`
			Client  *struct {
				Enabled bool `json:"enabled"`
			} `json:"client"`
		}
		if json.Unmarshal(b, &c) != nil {
			continue
		}
		if c.DataDir != "" {
			dataDir = c.DataDir
		}
		if c.Client != nil && c.Client.Enabled {
			client = true
		}
	}
	return dataDir, client && filepath.IsAbs(dataDir)
}

// watchStateFailures looks for services that ended because of a state
// they cannot open, and recovers them, until ctx ends.
func (a *Agent) watchStateFailures(ctx context.Context) {
	t := time.NewTicker(recoverPoll)
	defer t.Stop()
	seen := map[string]string{} // service -> the ended run last looked at
	last := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, s := range a.sup.Status() {
			key := strconv.Itoa(s.Restarts)
			if s.State == supervise.StateFailed {
				key += "/failed/" + s.Since.String()
			}
			if seen[s.Name] == key {
				continue
			}
			seen[s.Name] = key
			if s.LastExit == "" || s.LastExit == "exit 0" || s.State == supervise.StateRunning {
				continue
			}
			spec, ok := a.serviceSpec(s.Name)
			if !ok {
				continue
			}
			dataDir, ok := nomadClientDataDir(spec)
			if !ok {
				continue
			}
			lines, err := a.sup.Logs(s.Name, recoverLogLines)
			if err != nil {
				continue
			}
			reason, ok := nomadStateFailure(lastRun(lines))
			if !ok {
				continue
			}
			if at, ok := last[s.Name]; ok && time.Since(at) < recoverQuiet {
				a.log.Error("nomad client state failed again soon after a recovery: not recovering it again (look at the disk and the log)",
					"service", s.Name, "recovered", at, "reason", reason)
				continue
			}
			last[s.Name] = time.Now()
			a.recoverNomadClient(ctx, s.Name, dataDir, reason)
		}
	}
}

// serviceSpec is the spec the agent runs service name with.
func (a *Agent) serviceSpec(name string) (supervise.Spec, bool) {
	if rel := a.runningRelease(); rel != nil {
		for _, d := range rel.Services {
			if d.Spec.Name == name {
				return d.Spec, true
			}
		}
	}
	for _, s := range a.currentConfig().Services {
		if s.Name == name {
			return s, true
		}
	}
	return supervise.Spec{}, false
}

// recoverNomadClient moves the state of the Nomad client service name
// aside and starts it again; the event is logged and kept for status and
// metrics whatever the outcome.
func (a *Agent) recoverNomadClient(ctx context.Context, name, dataDir, reason string) {
	start := time.Now()
	a.log.Warn("nomad client cannot open its own state: recovering it", "service", name, "data_dir", dataDir, "reason", reason)
	// No apply may start it meanwhile.
	a.applyMu.Lock()
	rec, err := a.moveClientState(ctx, name, dataDir, start)
	a.applyMu.Unlock()
	rec.Service, rec.At, rec.Reason = name, start, reason
	if err == nil {
		startCtx, cancel := context.WithTimeout(ctx, time.Minute)
		err = a.sup.Start(startCtx, name)
		cancel()
		if err != nil {
			err = fmt.Errorf("start %s again: %w", name, err)
		}
	}
	rec.Took = time.Since(start).Round(time.Millisecond).String()
	if err != nil {
		rec.Error = err.Error()
		a.log.Error("nomad client state recovery failed", "service", name, "moved_to", rec.MovedTo, "err", err)
	} else {
		a.log.Warn("nomad client state recovered: moved to "+rec.MovedTo, "service", name, "moved_to", rec.MovedTo,
			"kept_identity", rec.KeptIdentity, "killed", rec.Killed, "unmounted", rec.Unmounted, "took", rec.Took)
	}
	a.mu.Lock()
	a.recoveries = append(a.recoveries, rec)
	if len(a.recoveries) > 20 {
		a.recoveries = slices.Delete(a.recoveries, 0, len(a.recoveries)-20)
	}
	a.mu.Unlock()
}

// moveClientState stops the client and moves its client/ and alloc/
// directories to <data_dir>.recovered/<time>/, keeping its identity.
func (a *Agent) moveClientState(ctx context.Context, name, dataDir string, at time.Time) (Recovery, error) {
	var rec Recovery
	stopCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := a.sup.Stop(stopCtx, name); err != nil {
		return rec, fmt.Errorf("stop %s: %w", name, err)
	}
	n, err := a.sup.KillLeftovers(stopCtx, name)
	rec.Killed = n
	if err != nil {
		// Without its cgroup the tasks cannot be found; they would hold
		// their ports against the allocations that replace them.
		a.log.Warn("nomad client: the task processes it left were not killed", "service", name, "err", err)
	}
	if rec.Unmounted, err = unmountBelow(dataDir); err != nil {
		return rec, err
	}
	clientDir := filepath.Join(dataDir, "client")
	ids := readNodeIdentity(clientDir)

	aside := dataDir + recoveredSuffix
	dest := filepath.Join(aside, at.UTC().Format("20060102T150405.000Z"))
	if err := os.MkdirAll(dest, 0o700); err != nil {
		return rec, fmt.Errorf("nomad client state: %w", err)
	}
	rec.MovedTo = dest
	for _, d := range []string{"client", "alloc"} {
		err := os.Rename(filepath.Join(dataDir, d), filepath.Join(dest, d))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return rec, fmt.Errorf("nomad client state: move %s aside: %w", d, err)
		}
	}
	if len(ids) > 0 {
		if err := os.MkdirAll(clientDir, 0o700); err != nil {
			return rec, fmt.Errorf("nomad client state: %w", err)
		}
		for f, b := range ids {
			if err := os.WriteFile(filepath.Join(clientDir, f), b, 0o600); err != nil {
				return rec, fmt.Errorf("nomad client state: keep the node identity: %w", err)
			}
		}
		rec.KeptIdentity = true
	}
	if err := pruneRecovered(aside, recoverKeep); err != nil {
		a.log.Warn("nomad client: removing old recovered state", "dir", aside, "err", err)
	}
	return rec, nil
}

// readNodeIdentity reads the client's node ID and secret ID (Nomad's
// client/client-id and client/secret-id), when both are intact UUIDs:
// only then is it safe for the client to rejoin as the same node.
func readNodeIdentity(clientDir string) map[string][]byte {
	out := map[string][]byte{}
	for _, f := range []string{"client-id", "secret-id"} {
		b, err := os.ReadFile(filepath.Join(clientDir, f))
		if err != nil || !isUUID(strings.TrimSpace(string(b))) {
			return nil
		}
		out[f] = b
	}
	return out
}

// isUUID: 8-4-4-4-12 lower-case hex digits, as Nomad writes them.
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// unmountBelow detaches every mount at or below dir (Nomad's secrets
// tmpfs and task directories, Docker's), the later first, since a later
// mount may sit on an earlier one.
func unmountBelow(dir string) (int, error) {
	ms, err := supervise.Mounts()
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for i := len(ms) - 1; i >= 0; i-- {
		p := ms[i].Point
		if p != dir && !strings.HasPrefix(p, dir+"/") {
			continue
		}
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// pruneRecovered removes all but the newest keep directories of aside.
// Their names are UTC times, so the newest sort last.
func pruneRecovered(aside string, keep int) error {
	ents, err := os.ReadDir(aside)
	if err != nil {
		return err
	}
	var names []string
	for _, e := range ents {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	var errs []error
	for len(names) > keep {
		if err := os.RemoveAll(filepath.Join(aside, names[0])); err != nil {
			errs = append(errs, err)
		}
		names = names[1:]
	}
	return errors.Join(errs...)
}

// recoveryMetrics adds the count of state recoveries per service: every
// service the agent runs, 0 for those never recovered, so that a rate
// can be alerted on from the first scrape.
func recoveryMetrics(e *expo, st StatusReport) {
	e.family("steppe_agent_state_recoveries_total", "counter", "Times the agent moved a service's state aside because it would not open (a Nomad client's client/ and alloc/), since the agent started.")
	n := map[string]int{}
	for _, r := range st.Recoveries {
		n[r.Service]++
	}
	names := []string{}
	for _, s := range st.Services {
		names = append(names, s.Name)
	}
	for s := range n {
		if !slices.Contains(names, s) {
			names = append(names, s)
		}
	}
	slices.Sort(names)
	for _, s := range names {
		e.sample("steppe_agent_state_recoveries_total", float64(n[s]), "service", s)
	}
}
