// Package backoff computes the delays between retries: growing by a
// factor from a first delay up to a cap, with jitter.
package backoff

import (
	"math"
	"math/rand/v2"
	"time"
)

// Policy says how the delays of a run of failures grow: Min before the
// first retry, Factor times the one before after each further failure,
// never above Max; then a random part of up to Jitter (a fraction) of
// each delay is taken off, so that callers failing together do not retry
// in lockstep, and no delay exceeds Max.
type Policy struct {
	Min    time.Duration // the first delay
	Max    time.Duration // the cap; 0 means none
	Factor float64       // growth per failure; below 1 means 2
	Jitter float64       // the fraction taken off at most, 0 (none) to 1
}

// Delay returns the delay before retry n of a run of failures, counted
// from 0.
func (p Policy) Delay(n int) time.Duration {
	if p.Min <= 0 {
		return 0
	}
	f := p.Factor
	if f < 1 {
		f = 2
	}
	d := float64(p.Min) * math.Pow(f, float64(max(n, 0)))
	if p.Max > 0 {
		d = min(d, float64(p.Max))
	}
	// Float64 of MaxInt64 rounds up: stay a step below it.
	d = min(d, math.Nextafter(math.MaxInt64, 0))
	delay := time.Duration(d)
	if off := time.Duration(float64(delay) * min(max(p.Jitter, 0), 1)); off > 0 {
		delay -= rand.N(off + 1)
	}
	return delay
}
