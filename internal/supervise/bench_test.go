package supervise

import (
	"context"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkCrashToRestart: a running service is SIGKILLed; the time until
// its new main process is started. HealthyAfter is tiny so that every
// crash is "the first" (the first restart is immediate by design).
func BenchmarkCrashToRestart(b *testing.B) {
	sup := newSup(b, testOptions(b))
	ctx := ctxT(b)
	spec := Spec{Name: "victim", Command: "/bin/sleep", Args: []string{"100000"}, HealthyAfter: time.Nanosecond}
	if err := sup.Apply(ctx, []Spec{spec}); err != nil {
		b.Fatal(err)
	}
	if err := sup.WaitReady(ctx, "victim"); err != nil {
		b.Fatal(err)
	}
	svc, _ := sup.get("victim")
	var lat []time.Duration
	b.ResetTimer()
	for b.Loop() {
		pid := svc.snapshot().PID
		t0 := time.Now()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		for {
			st := svc.snapshot()
			if st.PID != 0 && st.PID != pid {
				break
			}
			if time.Since(t0) > 10*time.Second {
				b.Fatalf("not restarted: %+v", st)
			}
			time.Sleep(20 * time.Microsecond)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
}

// BenchmarkAdopt100: 100 services run; a new supervisor on the same state
// adopts them all (New + Apply), as after an agent restart.
func BenchmarkAdopt100(b *testing.B) {
	opts := testOptions(b)
	ctx := ctxT(b)
	var specs []Spec
	var names []string
	for i := range 100 {
		n := "s" + strconv.Itoa(i)
		names = append(names, n)
		specs = append(specs, Spec{Name: n, Command: "/bin/sleep", Args: []string{"100000"}})
	}
	first := newSup(b, opts)
	if err := first.Apply(ctx, specs); err != nil {
		b.Fatal(err)
	}
	if err := first.WaitReady(ctx, names...); err != nil {
		b.Fatal(err)
	}
	pids := pidsOf(first.Status())
	first.Close()
	var total time.Duration
	n := 0
	var last *Supervisor
	for b.Loop() {
		t0 := time.Now()
		sup, err := New(ctx, opts)
		if err != nil {
			b.Fatal(err)
		}
		if err := sup.Apply(ctx, specs); err != nil {
			b.Fatal(err)
		}
		total += time.Since(t0)
		n++
		b.StopTimer()
		for _, st := range sup.Status() {
			if !st.Adopted || st.PID != pids[st.Name] || !st.Ready {
				b.Fatalf("not adopted: %+v", st)
			}
		}
		if last != nil {
			last.Close()
		}
		last = sup
		last.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(total)/float64(n)/float64(time.Millisecond), "ms/adopt100")
	// Stop them all.
	sup, err := New(ctx, opts)
	if err != nil {
		b.Fatal(err)
	}
	if err := sup.Apply(ctx, specs); err != nil {
		b.Fatal(err)
	}
	if err := sup.Shutdown(context.Background()); err != nil {
		b.Fatal(err)
	}
	sup.Close()
}

// BenchmarkAgentRSS: resident memory of an agent process (the test binary
// in agent mode: an upper bound for steppe, which lacks the test framework)
// supervising 10 services.
func BenchmarkAgentRSS(b *testing.B) {
	opts := testOptions(b)
	var specs []Spec
	n := 10
	if v, err := strconv.Atoi(os.Getenv("STEPPE_BENCH_SERVICES")); err == nil {
		n = v // to see what the services themselves cost
	}
	for i := range n {
		specs = append(specs, Spec{Name: "s" + strconv.Itoa(i), Command: "/bin/sleep", Args: []string{"100000"}})
	}
	// The status file stands in for the local API: refreshed every second,
	// not at the 20ms other tests use.
	agent := startAgent(b, agentConfig{StateDir: opts.StateDir, CgroupParent: opts.CgroupParent, Specs: specs, StatusEvery: time.Second})
	agent.waitStatus("services running", func(st []Status) bool {
		if len(st) != n {
			return false
		}
		for _, s := range st {
			if !s.Ready {
				return false
			}
		}
		return true
	})
	var rss int
	for b.Loop() {
		time.Sleep(100 * time.Millisecond) // let it settle
		data, err := os.ReadFile("/proc/" + strconv.Itoa(agent.cmd.Process.Pid) + "/status")
		if err != nil {
			b.Fatal(err)
		}
		for line := range strings.Lines(string(data)) {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				rss, _ = strconv.Atoi(f[1])
			}
		}
	}
	b.ReportMetric(float64(rss)/1024, "RSS-MiB")
	agent.terminate()
}
