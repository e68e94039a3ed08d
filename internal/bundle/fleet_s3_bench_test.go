package bundle

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/testenv"
)

// BenchmarkFleetS3: 10,000 agents (goroutines, each with its own S3 client,
// HTTP transport and connection) poll a real SeaweedFS S3 gateway on
// 127.0.0.1 for the pointer with If-None-Match every 10 s (up to a fifth
// early, at random), as the agent does with an s3:// bundle store. It
// reports the time from a publish until every agent has the new version
// verified, the gateway's RSS and CPU per 1,000 agents and the requests
// per second while nothing changes. Target: p99 ≤ interval + 2 s.
func BenchmarkFleetS3(b *testing.B) {
	agents := fleetAgents(b)
	const interval = 10 * time.Second
	raiseNofile(b, uint64(agents)+500)
	w := testenv.StartWeed(b)
	w.Env(b)
	key := mustKey(b)
	loc := "s3://fleet/bundles?endpoint=" + url.QueryEscape(w.Endpoint)
	pub, err := NewS3Store(context.Background(), loc, S3Options{})
	if err != nil {
		b.Fatal(err)
	}
	w.CreateBucket(b, pub.Bucket)
	files := map[string]string{}
	for i := 0; i < 12; i++ {
		files[fmt.Sprintf("conf/%02d.hcl", i)] = strings.Repeat(fmt.Sprintf("key_%d = \"value\"\n", i), 300)
	}
	publishS3 := func(v uint64) {
		files["conf/00.hcl"] = strings.Repeat(fmt.Sprintf("key_0 = \"value %d\"\n", v), 300)
		if _, err := pub.Publish(context.Background(), strings.NewReader(string(buildBundle(b, &key, baseManifest(v), files))), PublishOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	publishS3(1)
	_, rss0 := procStat(b, w.Pid)
	fds0 := openFDs(w.Pid)

	ctx, cancel := context.WithCancel(context.Background())
	fl := newFleet(key.Public())
	defer func() { cancel(); fl.wg.Wait() }()
	cpuStart, _ := procStat(b, w.Pid)
	// Opening 10,000 stores reads the AWS configuration 10,000 times: do
	// it on both cores.
	var sent atomic.Int64 // HTTP requests of all agents
	stores := make([]*S3Store, agents)
	var wg sync.WaitGroup
	for part := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a := part; a < agents; a += 2 {
				st, err := NewS3Store(context.Background(), loc, S3Options{Interval: interval, HTTPClient: &http.Client{Transport: countingTransport{
					rt: &http.Transport{DialContext: (&net.Dialer{Timeout: 10 * time.Second}).DialContext, MaxIdleConnsPerHost: 1},
					n:  &sent,
				}}})
				if err != nil {
					b.Error(err)
					return
				}
				stores[a] = st
			}
		}()
	}
	wg.Wait()
	if b.Failed() {
		return
	}
	// Agents start over one interval, as machines of a fleet do.
	for _, st := range stores {
		fl.wg.Add(1)
		go fl.run(ctx, st, 30*time.Second)
		time.Sleep(interval / time.Duration(agents))
	}
	fl.have(b, 1, agents, 5*time.Minute)
	time.Sleep(interval + time.Second) // every agent polling
	cpu1, rss1 := procStat(b, w.Pid)
	fds1 := openFDs(w.Pid)
	idle := 2 * interval
	req0 := sent.Load()
	time.Sleep(idle)
	cpu2, rss2 := procStat(b, w.Pid)
	idleReqs := sent.Load() - req0

	for i := 0; i < b.N; i++ {
		v := uint64(i + 2)
		c0, _ := procStat(b, w.Pid)
		start := time.Now()
		publishS3(v)
		at := fl.have(b, v, agents, 5*time.Minute)
		c1, _ := procStat(b, w.Pid)
		var lat []time.Duration
		for _, t := range at {
			lat = append(lat, t.Sub(start))
		}
		b.ReportMetric(float64(percentile(lat, 0.5))/float64(time.Millisecond), "converge-p50-ms")
		b.ReportMetric(float64(percentile(lat, 0.99))/float64(time.Millisecond), "converge-p99-ms")
		b.ReportMetric(float64(percentile(lat, 1))/float64(time.Millisecond), "converge-max-ms")
		b.ReportMetric(float64(c1-c0)/float64(time.Millisecond)/float64(agents)*1000, "gateway-cpu-ms-to-converge/1000-agents")
	}
	per1000 := 1000 / float64(agents)
	b.ReportMetric(float64(rss1)/(1<<20), "gateway-RSS-MiB-all-polling")
	b.ReportMetric(float64(rss1-rss0)/(1<<20)*per1000, "gateway-MiB/1000-agents")
	b.ReportMetric(float64(cpu1-cpuStart)/float64(time.Millisecond)*per1000, "gateway-cpu-ms-first-pull/1000-agents")
	b.ReportMetric(float64(cpu2-cpu1)/float64(time.Millisecond)/idle.Seconds()*per1000, "gateway-cpu-ms/s-idle/1000-agents")
	b.ReportMetric(float64(idleReqs)/idle.Seconds(), "requests/s-idle")
	b.ReportMetric(float64(fl.errs.Load()), "agent-errors")
	b.Logf("%d agents; gateway RSS %d MiB before, %d MiB polling, %d MiB after %v; %d connections held",
		agents, rss0>>20, rss1>>20, rss2>>20, idle, fds1-fds0)
	if last, _ := fl.lastErr.Load().(string); last != "" {
		b.Logf("agents' errors (each retried after a backoff): %d, the last: %s", fl.errs.Load(), last)
	}
}

// countingTransport counts the requests it sends.
type countingTransport struct {
	rt http.RoundTripper
	n  *atomic.Int64
}

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.rt.RoundTrip(r)
}
