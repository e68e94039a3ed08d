package bundle

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/backoff"
)

// fleetAgents is how many agents the fleet benchmarks run: 10,000 unless
// STEPPE_BENCH_AGENTS says otherwise (for a quick look at the shape).
func fleetAgents(tb testing.TB) int {
	n := 10000
	if s := os.Getenv("STEPPE_BENCH_AGENTS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 {
			tb.Fatalf("STEPPE_BENCH_AGENTS=%q: want a positive number", s)
		}
		n = v
	}
	return n
}

// steppeBinary is $STEPPE_BIN, or ./cmd/steppe built into a temporary
// directory (the benchmark measures the real `steppe bundle serve`).
func steppeBinary(tb testing.TB) string {
	if p := os.Getenv("STEPPE_BIN"); p != "" {
		return p
	}
	out := filepath.Join(tb.TempDir(), "steppe")
	cmd := exec.Command("go", "build", "-o", out, "github.com/steppe/steppe/cmd/steppe")
	if b, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build ./cmd/steppe: %v\n%s", err, b)
	}
	return out
}

// fleet is a set of simulated agents: each runs the agent's pull loop
// (fetch with the real store client, verify signature, expiry, version
// and every file against the manifest, record the version) with a store
// of its own, so that each has its own HTTP client and connection as a
// machine would.
type fleet struct {
	key PublicKey
	// countOnly reads the bundle and counts its bytes instead of verifying
	// it (STEPPE_BENCH_VERIFY=0): what the server's delivery costs without
	// the agents' verification, which real machines do on their own CPUs.
	countOnly bool
	requests  atomic.Int64 // fetches sent (200s, 304s and errors)
	errs      atomic.Int64
	lastErr   atomic.Value // string
	mu        sync.Mutex
	got       map[uint64][]time.Time // version → when each agent had it verified
	recv      map[uint64][]time.Time // version → when each agent's fetch answered
	wg        sync.WaitGroup
}

func newFleet(key PublicKey) *fleet {
	return &fleet{key: key, got: map[uint64][]time.Time{}, recv: map[uint64][]time.Time{}}
}

// run is one agent: the loop of internal/agent's puller, minus rendering
// and applying (the bundle is read, verified and counted, not unpacked).
func (f *fleet) run(ctx context.Context, st Store, wait time.Duration) {
	defer f.wg.Done()
	pause := backoff.Policy{Min: 250 * time.Millisecond, Max: 30 * time.Second, Factor: 2, Jitter: 0.5}
	etag, after, fails := "", uint64(0), 0
	for ctx.Err() == nil {
		f.requests.Add(1)
		fe, err := st.Fetch(ctx, "prod", "server", etag, wait)
		answered := time.Now()
		if errors.Is(err, ErrNotModified) {
			fails = 0
			continue
		}
		if err == nil {
			m := &Manifest{Version: after + 1}
			if f.countOnly {
				var n int64
				n, err = io.Copy(io.Discard, fe.Body)
				if err == nil && n == 0 {
					err = errors.New("empty bundle")
				}
			} else {
				m, _, err = Verify(ctx, fe.Body, Policy{Keys: []PublicKey{f.key}, Cluster: "prod", Role: "server", After: after})
			}
			fe.Body.Close()
			if err == nil {
				now := time.Now()
				f.mu.Lock()
				f.got[m.Version] = append(f.got[m.Version], now)
				f.recv[m.Version] = append(f.recv[m.Version], answered)
				f.mu.Unlock()
				etag, after, fails = fe.ETag, m.Version, 0
				continue
			}
		}
		if ctx.Err() != nil {
			return
		}
		f.errs.Add(1)
		f.lastErr.Store(err.Error())
		t := time.NewTimer(pause.Delay(fails))
		fails++
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// have returns when each agent had version, waiting until n have it.
func (f *fleet) have(tb testing.TB, version uint64, n int, timeout time.Duration) []time.Time {
	deadline := time.Now().Add(timeout)
	for {
		f.mu.Lock()
		got := len(f.got[version])
		at := append([]time.Time(nil), f.got[version]...)
		f.mu.Unlock()
		if got >= n {
			return at
		}
		if time.Now().After(deadline) {
			last, _ := f.lastErr.Load().(string)
			tb.Fatalf("%d of %d agents have version %d after %v (%d errors, last: %s)", got, n, version, timeout, f.errs.Load(), last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func openFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

// BenchmarkFleetLongPoll: 10,000 agents (goroutines of this process, each
// with its own HTTP client and TCP connection) long-poll a real `steppe
// bundle serve` process. It reports the server's RSS and CPU per 1,000
// waiting agents, the requests per second while nothing changes, and the
// time from a publish until every agent has the new version verified.
//
// Limits: both processes hold one descriptor per agent, so the hard limit
// of open files (20,000 here) caps one process at about 19,900 agents;
// loopback's ephemeral ports (net.ipv4.ip_local_port_range, about 28,000)
// cap one client address. The agents' verification (Ed25519, SHA-256 of
// every file, gunzip) shares the two cores with the server.
func BenchmarkFleetLongPoll(b *testing.B) {
	agents := fleetAgents(b)
	wait := 30 * time.Second // the agent's default long poll
	raiseNofile(b, uint64(agents)+500)
	key := mustKey(b)
	dir := b.TempDir()
	st := NewDirStore(dir)
	files := map[string]string{}
	for i := 0; i < 12; i++ {
		files[fmt.Sprintf("conf/%02d.hcl", i)] = strings.Repeat(fmt.Sprintf("key_%d = \"value\"\n", i), 300)
	}
	publishDir(b, st, buildBundle(b, &key, baseManifest(1), files))

	cmd := exec.Command(steppeBinary(b), "bundle", "serve", "-addr", "127.0.0.1:0", dir)
	cmd.Stderr = nil // one log line per publish; nothing worth reading
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("steppe bundle serve: %v", err)
	}
	// "serving DIR on http://ADDR/v1/bundles/"
	base := strings.TrimSuffix(strings.TrimSpace(line[strings.LastIndex(line, " ")+1:]), "/v1/bundles/")
	pid := cmd.Process.Pid
	_, rss0 := procStat(b, pid)
	fds0 := openFDs(pid)

	ctx, cancel := context.WithCancel(context.Background())
	fl := newFleet(key.Public())
	fl.countOnly = os.Getenv("STEPPE_BENCH_VERIFY") == "0"
	defer func() { cancel(); fl.wg.Wait() }()
	cpuStart, _ := procStat(b, pid)
	for a := 0; a < agents; a++ {
		// A machine's own client: its own transport and connection.
		hs, err := NewHTTPStore(base, &http.Client{Transport: &http.Transport{
			DialContext: (&net.Dialer{Timeout: 10 * time.Second}).DialContext, MaxIdleConnsPerHost: 1,
		}})
		if err != nil {
			b.Fatal(err)
		}
		fl.wg.Add(1)
		go fl.run(ctx, hs, wait)
		if a%500 == 499 {
			time.Sleep(50 * time.Millisecond) // under the listen backlog
		}
	}
	fl.have(b, 1, agents, 5*time.Minute)
	// Every agent has version 1 and is back in a long poll once the server
	// holds a connection per agent.
	for deadline := time.Now().Add(time.Minute); openFDs(pid)-fds0 < agents; {
		if time.Now().After(deadline) {
			b.Fatalf("server holds %d connections, want %d", openFDs(pid)-fds0, agents)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	cpu1, rss1 := procStat(b, pid)

	// Idle for longer than one long poll, so that every agent asks again.
	idle := wait + 10*time.Second
	req0 := fl.requests.Load()
	time.Sleep(idle)
	cpu2, rss2 := procStat(b, pid)
	idleReqs := fl.requests.Load() - req0

	for i := 0; i < b.N; i++ {
		v := uint64(i + 2)
		files["conf/00.hcl"] = strings.Repeat(fmt.Sprintf("key_0 = \"value %d\"\n", v), 300)
		bundle := buildBundle(b, &key, baseManifest(v), files)
		c0, _ := procStat(b, pid)
		self0 := selfCPU(b)
		start := time.Now()
		publishDir(b, st, bundle)
		at := fl.have(b, v, agents, 5*time.Minute)
		c1, _ := procStat(b, pid)
		self1 := selfCPU(b)
		var lat, ans []time.Duration
		for _, t := range at {
			lat = append(lat, t.Sub(start))
		}
		fl.mu.Lock()
		for _, t := range fl.recv[v] {
			ans = append(ans, t.Sub(start))
		}
		fl.mu.Unlock()
		b.ReportMetric(float64(percentile(ans, 0.5))/float64(time.Millisecond), "answered-p50-ms")
		b.ReportMetric(float64(percentile(ans, 0.99))/float64(time.Millisecond), "answered-p99-ms")
		b.ReportMetric(float64(self1-self0)/float64(time.Millisecond)/float64(agents), "agent-cpu-ms/update")
		b.ReportMetric(float64(percentile(lat, 0.5))/float64(time.Millisecond), "converge-p50-ms")
		b.ReportMetric(float64(percentile(lat, 0.99))/float64(time.Millisecond), "converge-p99-ms")
		b.ReportMetric(float64(percentile(lat, 1))/float64(time.Millisecond), "converge-max-ms")
		b.ReportMetric(float64(c1-c0)/float64(time.Millisecond)/float64(agents)*1000, "server-cpu-ms-to-send/1000-agents")
	}
	per1000 := 1000 / float64(agents)
	b.ReportMetric(float64(rss1)/(1<<20), "server-RSS-MiB-all-waiting")
	b.ReportMetric(float64(rss1-rss0)/(1<<20)*per1000, "server-MiB/1000-waiting")
	b.ReportMetric(float64(cpu1-cpuStart)/float64(time.Millisecond)*per1000, "server-cpu-ms-first-pull/1000-agents")
	b.ReportMetric(float64(cpu2-cpu1)/float64(time.Millisecond)/idle.Seconds()*per1000, "server-cpu-ms/s-idle/1000-agents")
	b.ReportMetric(float64(idleReqs)/idle.Seconds(), "requests/s-idle")
	b.ReportMetric(float64(fl.errs.Load()), "agent-errors")
	b.Logf("%d agents; server RSS %d MiB before, %d MiB all waiting, %d MiB after %v idle", agents, rss0>>20, rss1>>20, rss2>>20, idle)
	if last, _ := fl.lastErr.Load().(string); last != "" {
		b.Logf("agents' errors (each retried after a backoff): %d, the last: %s", fl.errs.Load(), last)
	}
}
