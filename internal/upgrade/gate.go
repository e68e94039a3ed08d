package upgrade

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// Gate is what a restarted server must show before the next one is
// touched: it is back (an alive member on the new version), autopilot
// calls the whole cluster healthy with every server a voter, its raft log
// has caught up with the leader's, and all of that has held for Stable.
type Gate struct {
	// MaxLag is how many raft entries the server may trail the leader by
	// (default 10: writes go on during an upgrade).
	MaxLag uint64
	// Stable is how long every condition must hold without a break
	// (default 10s, autopilot's own server stabilisation time).
	Stable time.Duration
	// Timeout bounds the whole gate of one server (default 5m).
	Timeout time.Duration
	// Interval is the time between checks (default 250ms; each is a
	// few API calls to the servers).
	Interval time.Duration
}

func (g Gate) withDefaults() Gate {
	if g.MaxLag == 0 {
		g.MaxLag = 10
	}
	if g.Stable == 0 {
		g.Stable = 10 * time.Second
	}
	if g.Timeout == 0 {
		g.Timeout = 5 * time.Minute
	}
	if g.Interval == 0 {
		g.Interval = 250 * time.Millisecond
	}
	return g
}

// check says what keeps the server of step s from passing, "" if nothing.
// back reports whether it is an alive member on the target version.
func (g Gate) check(ctx context.Context, p product, s Step, servers int) (back bool, problem string) {
	members, err := p.members(ctx, s.Address)
	if err != nil {
		return false, err.Error()
	}
	m := memberAt(members, s.Address)
	switch {
	case m == nil:
		return false, fmt.Sprintf("%s is not a %s server member", s.Machine, p.name())
	case !m.Alive:
		return false, fmt.Sprintf("%s is %s", s.Machine, m.Status)
	case m.Version != s.To:
		return false, fmt.Sprintf("%s runs %s %s, not %s", s.Machine, p.name(), m.Version, s.To)
	}
	// Its own API answers and knows the leader: autopilot's report may
	// still be the one it made before the restart.
	if err := p.ping(ctx, s.Address); err != nil {
		return true, fmt.Sprintf("%s's %s API: %v", s.Machine, p.name(), err)
	}
	h, err := p.health(ctx, s.Address)
	if err != nil {
		return true, err.Error()
	}
	if probs := h.Problems(servers); len(probs) > 0 {
		return true, strings.Join(probs, "; ")
	}
	me, ok := h.ByHost(s.Address)
	if !ok {
		return true, fmt.Sprintf("%s is not in autopilot's report", s.Machine)
	}
	l, _ := h.Leader()
	if me.LastIndex+g.MaxLag < l.LastIndex {
		return true, fmt.Sprintf("%s's raft log is at index %d, the leader's at %d (more than %d behind)", s.Machine, me.LastIndex, l.LastIndex, g.MaxLag)
	}
	return true, ""
}

// server runs the gate of step i, recording its phases: back, healthy
// (caught up included) and stable. A failed gate says what is wrong.
func (g Gate) server(parent context.Context, u *Upgrader, i int, p product, s Step, servers int) error {
	ctx, cancel := context.WithTimeout(parent, g.Timeout)
	defer cancel()
	start := time.Now()
	var (
		last       string
		backAt     time.Time
		healthyAt  time.Time // since when every condition holds
		breaks     int
		wasHealthy bool
	)
	for {
		back, problem := g.check(ctx, p, s, servers)
		if ctx.Err() != nil {
			// A check cut short says nothing about the server: report the
			// last complete one.
			break
		}
		now := time.Now()
		if back && backAt.IsZero() {
			backAt = now
			u.record(i, "back", backAt.Sub(start))
		}
		switch {
		case problem != "":
			if !healthyAt.IsZero() {
				breaks++
				u.progress(&s, "stable", fmt.Sprintf("%s: stability broken after %v: %s", s.ID, now.Sub(healthyAt).Round(time.Millisecond), problem))
			}
			healthyAt = time.Time{}
			last = problem
		case healthyAt.IsZero():
			healthyAt = now
			if !wasHealthy {
				wasHealthy = true
				u.record(i, "healthy", now.Sub(backAt))
			}
		case now.Sub(healthyAt) >= g.Stable:
			u.record(i, "stable", now.Sub(healthyAt))
			if breaks > 0 {
				u.update(i, func(st *Step) { st.Note = joinNote(st.Note, fmt.Sprintf("stability broken %d times", breaks)) })
			}
			return nil
		}
		// Check again after Interval, or right when the stable period
		// ends if that comes first: the wall time of an upgrade is mostly
		// these periods, and a tick past their end is waste.
		wait := g.Interval
		if !healthyAt.IsZero() {
			wait = min(wait, g.Stable-time.Since(healthyAt))
		}
		select {
		case <-ctx.Done():
		case <-time.After(max(wait, 0)):
			continue
		}
		break
	}
	if err := parent.Err(); err != nil {
		return fmt.Errorf("gate of %s: %w", s.Machine, err)
	}
	if un := u.unanswered(); un != "" {
		// What held the checks up, whether or not one completed.
		last = joinNote(last, un)
	}
	if last == "" {
		last = "not stable for long enough"
	}
	return fmt.Errorf("gate: %s not back and healthy within %v: %s", s.Machine, g.Timeout, last)
}

// record adds a phase measured elsewhere to step i.
func (u *Upgrader) record(i int, name string, d time.Duration) {
	u.update(i, func(s *Step) { s.Phases = append(s.Phases, Phase{Name: name, Seconds: d.Seconds()}) })
	u.mu.Lock()
	s := u.st.Steps[i]
	u.mu.Unlock()
	u.progress(&s, name, fmt.Sprintf("%s: %s after %v", s.ID, name, d.Round(time.Millisecond)))
}
