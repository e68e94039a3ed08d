package backoff

import (
	"math"
	"testing"
	"time"
)

func TestDelayGrowsToTheCap(t *testing.T) {
	p := Policy{Min: 5 * time.Millisecond, Max: time.Second}
	var got []time.Duration
	for n := range 10 {
		got = append(got, p.Delay(n))
	}
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("delays %v, want %v ms", got, want)
		}
	}
	if d := (Policy{Min: time.Second, Factor: 1.5}).Delay(2); d != 2250*time.Millisecond {
		t.Errorf("factor 1.5, retry 2: %v, want 2.25s", d)
	}
	if d := (Policy{Min: time.Second, Factor: 1}).Delay(50); d != time.Second {
		t.Errorf("factor 1: %v, want the first delay every time", d)
	}
	if d := (Policy{Max: time.Second}).Delay(3); d != 0 {
		t.Errorf("no first delay: %v, want 0", d)
	}
}

// A delay never overflows, however many failures came before it.
func TestDelayHuge(t *testing.T) {
	for _, n := range []int{62, 63, 64, 1000, math.MaxInt} {
		if d := (Policy{Min: time.Second, Max: time.Minute, Jitter: 0.5}).Delay(n); d < 30*time.Second || d > time.Minute {
			t.Errorf("capped, retry %d: %v", n, d)
		}
		if d := (Policy{Min: time.Second}).Delay(n); d <= 0 {
			t.Errorf("no cap, retry %d: %v", n, d)
		}
	}
}

// Jitter takes up to its fraction off, never adds, and spreads the delays.
func TestJitterRange(t *testing.T) {
	for _, j := range []float64{0.25, 0.5, 2.0 / 3, 1} {
		p := Policy{Min: 100 * time.Millisecond, Max: 400 * time.Millisecond, Jitter: j}
		for n := range 4 {
			nominal := (Policy{Min: p.Min, Max: p.Max}).Delay(n)
			lo, hi := time.Duration(math.MaxInt64), time.Duration(0)
			for range 2000 {
				d := p.Delay(n)
				lo, hi = min(lo, d), max(hi, d)
			}
			floor := nominal - time.Duration(float64(nominal)*j)
			if lo < floor || hi > nominal {
				t.Errorf("jitter %v, retry %d: delays in [%v, %v], want within [%v, %v]", j, n, lo, hi, floor, nominal)
			}
			// 2000 draws cover most of the range.
			if spread := float64(hi-lo) / float64(nominal-floor); spread < 0.9 {
				t.Errorf("jitter %v, retry %d: delays in [%v, %v] cover %.0f%% of [%v, %v]", j, n, lo, hi, 100*spread, floor, nominal)
			}
		}
	}
	if d := (Policy{Min: time.Second, Jitter: -1}).Delay(0); d != time.Second {
		t.Errorf("negative jitter: %v, want none", d)
	}
}
