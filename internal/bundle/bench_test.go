package bundle

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// benchServerEnv makes the test binary a bundle server (see TestMain): the
// long-poll benchmark measures the server's CPU and memory in a process of
// its own, apart from the clients.
const benchServerEnv = "STEPPE_BENCH_BUNDLE_SERVER_DIR"

func TestMain(m *testing.M) {
	if dir := os.Getenv(benchServerEnv); dir != "" {
		if err := serveForBench(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// serveForBench serves dir on a free port of 127.0.0.1, prints the address,
// answers GET /waiting with the number of waiting long polls, and exits
// when its stdin closes.
func serveForBench(dir string) error {
	srv := NewServer(dir, ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	mux := http.NewServeMux()
	mux.Handle("/v1/", srv.Handler())
	mux.HandleFunc("/waiting", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, srv.Waiting()) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr())
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	return (&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}).Serve(ln)
}

func raiseNofile(tb testing.TB, want uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatal(err)
	}
	if lim.Cur >= want {
		return
	}
	lim.Cur = min(want, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < want {
		tb.Fatalf("RLIMIT_NOFILE: want %d, can have %d (%v)", want, lim.Cur, err)
	}
}

// procStat returns a process's CPU time (the sum of its threads' on-CPU
// time from /proc/PID/task/*/schedstat, in nanoseconds, where
// /proc/PID/stat would count 10 ms ticks) and resident memory.
func procStat(tb testing.TB, pid int) (time.Duration, int64) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		tb.Fatalf("no threads of %d: %v", pid, err)
	}
	var cpu time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		ns, _ := strconv.ParseInt(strings.Fields(string(b))[0], 10, 64)
		cpu += time.Duration(ns)
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	var rssKB int64
	for _, line := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rssKB, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return cpu, rssKB << 10
}

// selfCPU is this process's user+system CPU time so far.
func selfCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p)
	return s[i]
}

// BenchmarkLongPollServer: 1,000 clients (real TCP connections) wait in
// long polls on a bundle server running in its own process. It reports
// the server's resident memory and CPU per 1,000 waiting clients, and,
// after a publish into the directory, how long the waiting clients took
// to get the new bundle and the CPU the server spent sending it.
func BenchmarkLongPollServer(b *testing.B) {
	const clients = 1000
	raiseNofile(b, 3*clients+200)
	key := mustKey(b)
	dir := b.TempDir()
	st := NewDirStore(dir)
	publishDir(b, st, buildBundle(b, &key, baseManifest(1), sampleFiles))

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchServerEnv+"="+dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatal(err)
	}
	addr = strings.TrimSpace(addr)
	pid := cmd.Process.Pid
	waiting := func() int {
		resp, err := http.Get("http://" + addr + "/waiting")
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		n, _ := strconv.Atoi(string(body))
		return n
	}
	hs, err := NewHTTPStore("http://"+addr, nil)
	if err != nil {
		b.Fatal(err)
	}

	for i := 0; i < b.N; i++ {
		version := uint64(i + 1)
		f, err := hs.Fetch(context.Background(), "prod", "server", "", 0)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, f.Body)
		f.Body.Close()
		etag := f.ETag
		time.Sleep(500 * time.Millisecond)
		cpu0, rss0 := procStat(b, pid)

		got := make([]time.Time, clients)
		var wg sync.WaitGroup
		errs := make(chan error, clients)
		for c := 0; c < clients; c++ {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			fmt.Fprintf(conn, "GET /v1/bundles/prod/server?wait=10m HTTP/1.1\r\nHost: %s\r\nIf-None-Match: %s\r\n\r\n", addr, etag)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					errs <- err
					return
				}
				got[c] = time.Now()
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK || n == 0 {
					errs <- fmt.Errorf("client %d: %s, %d bytes, %v", c, resp.Status, n, err)
				}
			}()
		}
		deadline := time.Now().Add(2 * time.Minute)
		for waiting() < clients {
			if time.Now().After(deadline) {
				b.Fatalf("only %d of %d clients waiting after 2 minutes", waiting(), clients)
			}
			time.Sleep(100 * time.Millisecond)
		}
		cpu1, rss1 := procStat(b, pid)
		const idle = 10 * time.Second
		time.Sleep(idle)
		cpu2, _ := procStat(b, pid)

		publishDir(b, st, buildBundle(b, &key, baseManifest(version+1), sampleFiles))
		published := time.Now()
		wg.Wait()
		cpu3, _ := procStat(b, pid)
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		var lat []time.Duration
		for _, t := range got {
			lat = append(lat, t.Sub(published))
		}
		b.ReportMetric(float64(rss1-rss0)/(1<<20), "server-MiB/1000-waiting")
		b.ReportMetric(float64(cpu1-cpu0)/float64(time.Millisecond), "server-cpu-ms-to-accept-1000")
		b.ReportMetric(float64(cpu2-cpu1)/float64(time.Millisecond)/idle.Seconds(), "server-cpu-ms/s-idle-1000-waiting")
		b.ReportMetric(float64(cpu3-cpu2)/float64(time.Millisecond), "server-cpu-ms-to-send-1000")
		b.ReportMetric(float64(percentile(lat, 0.5))/float64(time.Millisecond), "notify-p50-ms")
		b.ReportMetric(float64(percentile(lat, 0.99))/float64(time.Millisecond), "notify-p99-ms")
		b.ReportMetric(float64(percentile(lat, 1))/float64(time.Millisecond), "notify-max-ms")
		b.Logf("server rss %d MiB idle, %d MiB with %d waiting", rss0>>20, rss1>>20, clients)
	}
}

// BenchmarkPublishToPullers: 200 pullers (goroutines, each with its own
// HTTP client, connection, releases and state directory) long-poll a real
// bundle server on 127.0.0.1. Each iteration publishes a new version and
// measures, per puller, the time from the publish to the new release being
// fetched, verified, unpacked (with fsync), recorded as accepted and
// activated.
func BenchmarkPublishToPullers(b *testing.B) {
	const pullers = 200
	raiseNofile(b, 4*pullers+200)
	key := mustKey(b)
	dir := b.TempDir()
	st := NewDirStore(dir)
	// A realistic configuration bundle: a dozen files, 60 KB.
	files := map[string]string{}
	for i := 0; i < 12; i++ {
		files[fmt.Sprintf("conf/%02d.hcl", i)] = strings.Repeat(fmt.Sprintf("key_%d = \"value\"\n", i), 300)
	}
	publishDir(b, st, buildBundle(b, &key, baseManifest(1), files))

	srv := NewServer(dir, ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	hsrv := &http.Server{Handler: srv.Handler()}
	go hsrv.Serve(ln)
	defer hsrv.Close()

	type done struct {
		version uint64
		at      time.Time
		err     error
	}
	results := make(chan done, pullers*4)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	root := b.TempDir()
	for p := 0; p < pullers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hs, _ := NewHTTPStore("http://"+ln.Addr().String(), &http.Client{Transport: &http.Transport{}})
			base := filepath.Join(root, strconv.Itoa(p))
			rel, state := filepath.Join(base, "releases"), filepath.Join(base, "state")
			etag := ""
			for ctx.Err() == nil {
				f, err := hs.Fetch(ctx, "prod", "server", etag, 60*time.Second)
				if errors.Is(err, ErrNotModified) {
					continue
				}
				if err != nil {
					if ctx.Err() == nil {
						results <- done{err: err}
					}
					return
				}
				after, err := LoadAccepted(state)
				if err == nil {
					var r *Release
					pol := Policy{Keys: []PublicKey{key.Public()}, Cluster: "prod", Role: "server", After: after}
					if r, err = Unpack(ctx, f.Body, rel, pol); err == nil {
						if err = SaveAccepted(state, r.Version); err == nil {
							err = Activate(rel, r.Version)
						}
						// Converged once activated; pruning old releases
						// comes after, as in the agent.
						results <- done{version: r.Version, at: time.Now(), err: err}
						if err == nil {
							_, err = Prune(rel, 3)
						}
					}
				}
				f.Body.Close()
				if err != nil {
					results <- done{err: err}
					return
				}
				etag = f.ETag
			}
		}()
	}
	defer func() { cancel(); wg.Wait() }()

	collect := func(version uint64) []time.Time {
		var at []time.Time
		timeout := time.After(5 * time.Minute)
		for len(at) < pullers {
			select {
			case d := <-results:
				if d.err != nil {
					b.Fatal(d.err)
				}
				if d.version == version {
					at = append(at, d.at)
				}
			case <-timeout:
				b.Fatalf("%d of %d pullers have version %d after 5 minutes", len(at), pullers, version)
			}
		}
		return at
	}
	collect(1) // every puller has the first version and is waiting

	var lat []time.Duration
	cpu0 := selfCPU(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v := uint64(i + 2)
		// Like a real update: one file of the dozen changes.
		files["conf/00.hcl"] = strings.Repeat(fmt.Sprintf("key_0 = \"value %d\"\n", v), 300)
		bundle := buildBundle(b, &key, baseManifest(v), files)
		time.Sleep(500 * time.Millisecond) // all back in their long polls
		start := time.Now()
		publishDir(b, st, bundle)
		for _, t := range collect(v) {
			lat = append(lat, t.Sub(start))
		}
	}
	b.StopTimer()
	// Server and pullers share this process: the CPU per update covers
	// both sides of one agent's update.
	b.ReportMetric(float64(selfCPU(b)-cpu0)/float64(time.Millisecond)/float64(pullers*b.N), "cpu-ms/update")
	b.ReportMetric(float64(percentile(lat, 0.5))/float64(time.Millisecond), "converge-p50-ms")
	b.ReportMetric(float64(percentile(lat, 0.99))/float64(time.Millisecond), "converge-p99-ms")
	b.ReportMetric(float64(percentile(lat, 1))/float64(time.Millisecond), "converge-max-ms")
}
