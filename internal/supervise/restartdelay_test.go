package supervise

import (
	"testing"
	"time"
)

// The crash loop's delays: BackoffMin at once, then doubling from twice it
// (100ms from 0), up to a quarter off, never above BackoffMax.
func TestRestartDelay(t *testing.T) {
	ms := time.Millisecond
	for _, c := range []struct {
		min, max time.Duration
		want     []time.Duration // nominal, before jitter
	}{
		{0, 30 * time.Second, []time.Duration{0, 100 * ms, 200 * ms, 400 * ms, 800 * ms}},
		{time.Second, 5 * time.Second, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}},
		{10 * ms, time.Second, []time.Duration{10 * ms, 200 * ms, 400 * ms, 800 * ms, time.Second}},
	} {
		s := Spec{BackoffMin: c.min, BackoffMax: c.max}
		for n, want := range c.want {
			for range 200 {
				d := restartDelay(s, n)
				lo := want - want/4
				if n == 0 {
					lo = want // the first restart is not jittered
				}
				if d < lo || d > want {
					t.Fatalf("min %v max %v, restart %d: %v, want in [%v, %v]", c.min, c.max, n, d, lo, want)
				}
			}
		}
	}
}
