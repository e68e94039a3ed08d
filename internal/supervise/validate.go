package supervise

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Defaults returns spec with every unset optional field given its default.
func Defaults(spec Spec) Spec {
	if spec.StopSignal == 0 {
		spec.StopSignal = syscall.SIGTERM
	}
	if spec.StopTimeout == 0 {
		spec.StopTimeout = 10 * time.Second
	}
	if spec.StopMode == "" {
		spec.StopMode = StopCgroup
	}
	if spec.ReloadSignal == 0 {
		spec.ReloadSignal = syscall.SIGHUP
	}
	if spec.Restart == "" {
		spec.Restart = RestartAlways
	}
	if spec.BackoffMax == 0 {
		spec.BackoffMax = 30 * time.Second
	}
	if spec.HealthyAfter == 0 {
		spec.HealthyAfter = 10 * time.Second
	}
	if spec.LogMaxBytes == 0 {
		spec.LogMaxBytes = 10 << 20
	}
	if spec.LogKeep == 0 {
		spec.LogKeep = 3
	}
	if spec.Dir == "" {
		spec.Dir = "/"
	}
	if spec.Ready != nil {
		r := *spec.Ready
		if r.Timeout == 0 {
			r.Timeout = 60 * time.Second
		}
		if r.Interval == 0 {
			r.Interval = 50 * time.Millisecond
		}
		spec.Ready = &r
	}
	return spec
}

// validName keeps service names usable as cgroup and file names.
func validName(name string) error {
	if name == "" {
		return errors.New("empty service name")
	}
	if len(name) > 64 {
		return fmt.Errorf("service %q: name longer than 64 characters", name)
	}
	if name == "." || name == ".." {
		return fmt.Errorf("service %q: invalid name", name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("service %q: invalid character %q in name (use letters, digits, '-', '_', '.')", name, r)
		}
	}
	return nil
}

// validateOne checks what can be checked of one service alone.
func validateOne(s Spec) error {
	if err := validName(s.Name); err != nil {
		return err
	}
	var errs []error
	bad := func(format string, a ...any) {
		errs = append(errs, fmt.Errorf("service %q: "+format, append([]any{s.Name}, a...)...))
	}
	switch {
	case s.Command == "":
		bad("no command")
	case !filepath.IsAbs(s.Command):
		bad("command %q is not an absolute path", s.Command)
	default:
		if err := checkExecutable(s.Command); err != nil {
			bad("command %s", err)
		}
	}
	if !filepath.IsAbs(s.Dir) {
		bad("dir %q is not an absolute path", s.Dir)
	} else if st, err := os.Stat(s.Dir); err != nil || !st.IsDir() {
		bad("dir %q is not a directory", s.Dir)
	}
	for _, e := range s.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			bad("env entry %q is not KEY=VALUE", e)
		}
	}
	switch s.StopMode {
	case StopCgroup, StopMain:
	default:
		bad("unknown stop mode %q (want %q or %q)", s.StopMode, StopCgroup, StopMain)
	}
	switch s.Restart {
	case RestartAlways, RestartOnFailure, RestartNever:
	default:
		bad("unknown restart policy %q (want always, on-failure or never)", s.Restart)
	}
	if s.StopTimeout < 0 || s.BackoffMin < 0 || s.BackoffMax < 0 || s.HealthyAfter < 0 {
		bad("negative duration")
	}
	if s.BackoffMin > s.BackoffMax {
		bad("backoff min %v is above backoff max %v", s.BackoffMin, s.BackoffMax)
	}
	if s.MemoryMax < 0 || s.MemoryHigh < 0 {
		bad("negative memory limit")
	}
	if s.LogMaxBytes < 0 || s.LogKeep < 0 {
		bad("negative log limit")
	}
	if r := s.Ready; r != nil {
		n := 0
		if r.Notify {
			n++
		}
		if r.TCP != "" {
			n++
		}
		if r.HTTP != "" {
			n++
		}
		if len(r.Command) > 0 {
			n++
			if !filepath.IsAbs(r.Command[0]) {
				bad("readiness command %q is not an absolute path", r.Command[0])
			} else if err := checkExecutable(r.Command[0]); err != nil {
				bad("readiness command %s", err)
			}
		}
		if n != 1 {
			bad("readiness needs exactly one of notify, tcp, http, command (got %d)", n)
		}
		if r.Timeout < 0 || r.Interval < 0 {
			bad("negative readiness duration")
		}
	}
	for _, d := range s.After {
		if d == s.Name {
			bad("depends on itself")
		}
	}
	return errors.Join(errs...)
}

func checkExecutable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%q: no such file", path)
		}
		return fmt.Errorf("%q: %w", path, err)
	}
	if st.IsDir() {
		return fmt.Errorf("%q is a directory", path)
	}
	if st.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%q is not executable", path)
	}
	return nil
}

// Validate checks a whole set of specs (after Defaults): each service alone,
// duplicate names, unknown dependencies and dependency cycles. The error
// names every service at fault.
func Validate(specs []Spec) error {
	var errs []error
	byName := make(map[string]Spec, len(specs))
	for _, s := range specs {
		if err := validateOne(s); err != nil {
			errs = append(errs, err)
		}
		if _, dup := byName[s.Name]; dup && s.Name != "" {
			errs = append(errs, fmt.Errorf("service %q: declared twice", s.Name))
		}
		byName[s.Name] = s
	}
	for _, s := range specs {
		for _, d := range s.After {
			if _, ok := byName[d]; !ok {
				errs = append(errs, fmt.Errorf("service %q: after unknown service %q", s.Name, d))
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if cyc := findCycle(byName); cyc != nil {
		return fmt.Errorf("dependency cycle: %s", strings.Join(cyc, " -> "))
	}
	return nil
}

// findCycle returns one dependency cycle as a path of names, or nil.
func findCycle(byName map[string]Spec) []string {
	const (
		white = iota
		grey
		black
	)
	color := map[string]int{}
	var stack []string
	var visit func(n string) []string
	visit = func(n string) []string {
		color[n] = grey
		stack = append(stack, n)
		for _, d := range byName[n].After {
			switch color[d] {
			case grey:
				i := slices.Index(stack, d)
				return append(slices.Clone(stack[i:]), d)
			case white:
				if c := visit(d); c != nil {
					return c
				}
			}
		}
		stack = stack[:len(stack)-1]
		color[n] = black
		return nil
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if color[n] == white {
			if c := visit(n); c != nil {
				return c
			}
		}
	}
	return nil
}

// levels groups names by dependency depth: level 0 needs nothing, level k
// needs something of level k-1. deps maps a name to what it needs; names
// outside the map are ignored. The graph must be acyclic.
func levels(deps map[string][]string) [][]string {
	depth := map[string]int{}
	var get func(n string) int
	get = func(n string) int {
		if d, ok := depth[n]; ok {
			return d
		}
		depth[n] = 0
		d := 0
		for _, x := range deps[n] {
			if _, ok := deps[x]; ok {
				d = max(d, get(x)+1)
			}
		}
		depth[n] = d
		return d
	}
	var out [][]string
	for n := range deps {
		d := get(n)
		for len(out) <= d {
			out = append(out, nil)
		}
		out[d] = append(out[d], n)
	}
	for _, l := range out {
		slices.Sort(l)
	}
	return out
}

// execHash identifies what a running process was started with: a change
// of any of these needs a restart, anything else is updated in place.
func execHash(s Spec) string {
	b, _ := json.Marshal(struct {
		Command, Dir, User, Group string
		Args, Env                 []string
		MemoryMax, MemoryHigh     int64
	}{s.Command, s.Dir, s.User, s.Group, s.Args, s.Env, s.MemoryMax, s.MemoryHigh})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:12])
}
