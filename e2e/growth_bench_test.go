package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// BenchmarkUpGrowth is how `steppe up` grows (issue 15): the default
// cluster (3 servers with Vault, CoreDNS everywhere) with 2, 10 and 30
// clients (STEPPE_GROWTH="2,10,30" changes the sizes), on netns and on
// local. Each run prints the wall time to healthy, up's phases, the
// operator's CPU seconds (up's own rusage), and the peak RSS of the whole
// cluster and of its largest machine (every agent and daemon, sampled
// from /proc every 250 ms), then takes the cluster down.
func BenchmarkUpGrowth(b *testing.B) {
	consul, nomad := daemonBinaries(b)
	bin := steppeBinary(b)
	sizes := []int{2, 10, 30}
	if s := os.Getenv("STEPPE_GROWTH"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				b.Fatalf("STEPPE_GROWTH %q: %v", s, err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, prov := range []string{"netns", "local"} {
		for _, n := range sizes {
			b.Run(fmt.Sprintf("%s/3+%d", prov, n), func(b *testing.B) {
				for i := range b.N {
					upGrowthOnce(b, bin, consul, nomad, prov, n, i)
				}
			})
		}
	}
}

func upGrowthOnce(b *testing.B, bin, consul, nomad, prov string, clients, run int) {
	b.StopTimer()
	c := &upCluster{t: b, bin: bin, dir: b.TempDir(), consul: consul, nomad: nomad}
	c.spec = filepath.Join(c.dir, "cluster.hcl")
	c.state = filepath.Join(c.dir, "state")
	name := fmt.Sprintf("grow%d", clients)
	block := "provider \"local\" {\n  first_address = \"127.0.9.11\"\n}\n"
	if prov == "netns" {
		block = "provider \"netns\" {\n  subnet = \"10.213.20.0/24\"\n}\n"
	}
	spec := fmt.Sprintf("name = %q\npool \"default\" {\n  count = %d\n}\n%s", name, clients, block)
	if err := os.WriteFile(c.spec, []byte(spec), 0o644); err != nil {
		b.Fatal(err)
	}
	mem := startRSSSampler(filepath.Join(c.state, "machines"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "up", "-spec", c.spec, "-state", c.state)
	cmd.Env = c.baseEnv()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	b.StartTimer()
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	b.StopTimer()
	// The cluster as it settles after up, too: a second of samples more.
	time.Sleep(time.Second)
	peak, peakMachine, biggest, machines := mem.stop()
	defer func() {
		if out, err := c.steppe(10*time.Minute, "down", "-state", c.state); err != nil {
			b.Errorf("down: %v\n%s", err, out)
		}
	}()
	if err != nil {
		b.Fatalf("up of 3+%d on %s: %v\n%s", clients, prov, err, out.String())
	}
	phases := ""
	for _, l := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(l, "phases: ") {
			phases = strings.TrimPrefix(l, "phases: ")
		}
	}
	cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	b.Logf("%s 3+%d run %d: up to healthy in %v; operator CPU %.2f s; peak RSS of the cluster %d MiB (%d machines sampled), largest machine %s %d MiB; phases: %s",
		prov, clients, run+1, took.Round(10*time.Millisecond), cpu.Seconds(), peak>>20, machines, biggest, peakMachine>>20, phases)
	b.ReportMetric(took.Seconds(), "s/up")
	b.ReportMetric(cpu.Seconds(), "operator-cpu-s")
	b.ReportMetric(float64(peak>>20), "peak-MiB")
	b.ReportMetric(float64(peakMachine>>20), "machine-peak-MiB")
}

// rssSampler sums the RSS of every process that belongs to a machine of
// one cluster: the agents (started with a config under machinesDir) and
// the daemons (in cgroups named after their machine below the cluster's
// parent), every 250 ms, keeping the peaks.
type rssSampler struct {
	machinesDir string
	stopCh      chan struct{}
	done        chan struct{}

	mu          sync.Mutex
	peak        int64
	peakMachine map[string]int64
}

func startRSSSampler(machinesDir string) *rssSampler {
	s := &rssSampler{machinesDir: machinesDir, stopCh: make(chan struct{}), done: make(chan struct{}), peakMachine: map[string]int64{}}
	go func() {
		defer close(s.done)
		for {
			s.sample()
			select {
			case <-s.stopCh:
				return
			case <-time.After(250 * time.Millisecond):
			}
		}
	}()
	return s
}

// stop ends the sampling: the cluster's peak, the largest machine's peak
// and name, and how many machines were seen.
func (s *rssSampler) stop() (peak, machinePeak int64, machine string, machines int) {
	close(s.stopCh)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range slices.Sorted(maps.Keys(s.peakMachine)) {
		if v := s.peakMachine[m]; v > machinePeak {
			machinePeak, machine = v, m
		}
	}
	return s.peak, machinePeak, machine, len(s.peakMachine)
}

func (s *rssSampler) sample() {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	by := map[string]int64{}
	var total int64
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		m := s.machineOf(pid)
		if m == "" {
			continue
		}
		rss := rssOf(pid)
		by[m] += rss
		total += rss
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peak = max(s.peak, total)
	for m, v := range by {
		s.peakMachine[m] = max(s.peakMachine[m], v)
	}
}

// machineOf is the machine a process belongs to, "" for none of the
// cluster's: an agent by its -config path, a daemon by its cgroup (the
// machine is the cgroup below the cluster's steppe-* parent).
func (s *rssSampler) machineOf(pid int) string {
	if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		args := strings.Split(string(cmd), "\x00")
		if i := slices.Index(args, "-config"); i >= 0 && i+1 < len(args) && strings.HasPrefix(args[i+1], s.machinesDir+"/") {
			return strings.SplitN(strings.TrimPrefix(args[i+1], s.machinesDir+"/"), "/", 2)[0]
		}
	}
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(cg), "\n") {
		if !strings.HasPrefix(l, "0::") {
			continue
		}
		parts := strings.Split(strings.TrimPrefix(l, "0::/"), "/")
		// The machines' directory names the cluster's parent cgroup only
		// through a hash: match the parent's prefix and the machine's
		// directory existing.
		if len(parts) >= 2 && strings.HasPrefix(parts[0], "steppe-") {
			if _, err := os.Stat(filepath.Join(s.machinesDir, parts[1])); err == nil {
				return parts[1]
			}
		}
	}
	return ""
}

func rssOf(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}
