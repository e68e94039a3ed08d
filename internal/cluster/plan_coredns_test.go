package cluster

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/render"
	"github.com/steppe/steppe/internal/testenv"
)

func TestPlanCoreDNSEveryMachine(t *testing.T) {
	spec, err := ParseSpec([]byte("versions {\n  coredns = \"1.12.9\"\n}\n"), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.MachineList()
	for i := range ms {
		ms[i].Address = fmt.Sprintf("127.0.0.%d", 20+i)
	}
	plans, err := Plan(spec, servers(ms))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range plans {
		var dns *ServiceDef
		for i := range p.Services {
			if p.Services[i].Name == "coredns" {
				dns = &p.Services[i]
			}
		}
		if dns == nil || dns.Artifact != CoreDNSProduct || dns.Ready == nil || !strings.HasSuffix(dns.Ready.HTTP, ":8053/health") || dns.MemoryMax != DefaultCoreDNSMemory {
			t.Fatalf("%s: coredns service %+v", p.Role, dns)
		}
		if p.Artifacts[len(p.Artifacts)-1] != (ArtifactRef{CoreDNSProduct, "1.12.9"}) || p.Vars["coredns_version"] != "1.12.9" {
			t.Fatalf("%s: artifacts %v vars %v", p.Role, p.Artifacts, p.Vars)
		}
		cf := string(p.Files[RoleCoreDNSConfig])
		// The local provider's machines share the host's loopback: no
		// 127.0.0.53, no upstream, no query log.
		if !strings.Contains(cf, "bind "+factAddress+"\n") || strings.Contains(cf, "127.0.0.53") || strings.Contains(cf, "\n.:53") || strings.Contains(cf, "\n  log") {
			t.Fatalf("%s: Corefile\n%s", p.Role, cf)
		}
	}
	if DefaultSpec().Versions.CoreDNS != DefaultCoreDNSVersion {
		t.Fatal("no default CoreDNS version")
	}
}

func TestSpecDNSUpstream(t *testing.T) {
	s, err := ParseSpec([]byte("dns {\n  upstream = [\"10.0.0.2\", \"10.0.0.3:5353\", \"fd00::1\"]\n}\n"), "cluster.hcl")
	if err != nil {
		t.Fatal(err)
	}
	cf, err := coreDNSCorefile(s)
	if err != nil || !strings.Contains(string(cf), "forward . 10.0.0.2:53 10.0.0.3:5353 [fd00::1]:53\n") {
		t.Fatalf("Corefile %v\n%s", err, cf)
	}
	for _, bad := range []string{`["dns.google"]`, `["10.0.0.2:0"]`, `["10.0.0.300"]`} {
		_, err := ParseSpec([]byte("dns {\n  upstream = "+bad+"\n}\n"), "cluster.hcl")
		if err == nil || !strings.Contains(err.Error(), "cluster.hcl:2:") || !strings.Contains(err.Error(), "Invalid dns upstream") {
			t.Errorf("upstream %s: %v", bad, err)
		}
	}
	if _, err := ParseSpec([]byte("versions {\n  coredns = \"1.12\"\n}\n"), "cluster.hcl"); err == nil || !strings.Contains(err.Error(), "Invalid coredns version") {
		t.Errorf("coredns 1.12: %v", err)
	}
}

// TestCoreDNSCorefileServes runs the real CoreDNS on the Corefile as a
// netns machine renders it: consul. goes to the machine's Consul DNS port
// (a fake Consul here) on the machine's address and on 127.0.0.53, other
// names are refused and sent nowhere; with an upstream they go there.
func TestCoreDNSCorefileServes(t *testing.T) {
	testenv.NeedRoot(t, "CoreDNS on port 53")
	cache, err := artifact.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := artifact.BinaryPath(cache, CoreDNSProduct, DefaultCoreDNSVersion)
	if err != nil {
		testenv.Lacks(t, "CoreDNS %s is not built (steppe artifact build coredns@%s): %v", DefaultCoreDNSVersion, DefaultCoreDNSVersion, err)
	}
	const machine, upstreamAddr = "127.77.0.2", "127.77.0.3"
	consul := fakeDNS(t, machine+":8600", netip.MustParseAddr("127.77.0.9"))
	upstream := fakeDNS(t, upstreamAddr+":53", netip.MustParseAddr("127.77.0.10"))

	run := func(spec *Spec) (stop func()) {
		t.Helper()
		cf, err := coreDNSCorefile(spec)
		if err != nil {
			t.Fatal(err)
		}
		text, err := render.Execute("Corefile", string(cf), render.Facts{Name: "m", Address: machine, Tags: map[string]string{}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "Corefile"), text, 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cmd := exec.CommandContext(ctx, bin, "-conf="+filepath.Join(dir, "Corefile"))
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		stopped := false
		stop = func() {
			if !stopped {
				stopped = true
				cancel()
				_ = cmd.Wait()
			}
		}
		t.Cleanup(stop)
		deadline := time.Now().Add(20 * time.Second)
		for {
			r, err := http.Get("http://" + machine + ":8053/health")
			if err == nil && r.StatusCode == 200 {
				r.Body.Close()
				return stop
			}
			if time.Now().After(deadline) {
				t.Fatalf("CoreDNS not healthy: %v\n%s", err, out.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	spec := DefaultSpec()
	spec.Provider.Name = "netns"
	stop := run(spec)
	for _, at := range []string{machine, ResolverStubAddress} {
		if rc, a := ask(t, at, "web.service.consul."); rc != dnsmessage.RCodeSuccess || a != netip.MustParseAddr("127.77.0.9") {
			t.Errorf("web.service.consul at %s: %v %v", at, rc, a)
		}
	}
	if rc, _ := ask(t, machine, "example.com."); rc != dnsmessage.RCodeRefused {
		t.Errorf("example.com without upstream: %v, want REFUSED", rc)
	}
	if consul.Load() == 0 || upstream.Load() != 0 {
		t.Errorf("queries: consul %d, upstream %d (want some, none)", consul.Load(), upstream.Load())
	}

	spec.DNS.Upstream = []string{upstreamAddr}
	spec.Provider.Name = "local"
	stop() // it holds the machine's port 53
	run(spec)
	if rc, a := ask(t, machine, "example.com."); rc != dnsmessage.RCodeSuccess || a != netip.MustParseAddr("127.77.0.10") || upstream.Load() == 0 {
		t.Errorf("example.com with upstream: %v %v (upstream asked %d times)", rc, a, upstream.Load())
	}
}

// fakeDNS answers every A query on addr (UDP) with answer and counts them.
func fakeDNS(t *testing.T, addr string, answer netip.Addr) *atomic.Int64 {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	var n atomic.Int64
	go func() {
		buf := make([]byte, 1500)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var m dnsmessage.Message
			if m.Unpack(buf[:k]) != nil || len(m.Questions) != 1 {
				continue
			}
			n.Add(1)
			m.Header.Response, m.Header.Authoritative = true, true
			if m.Questions[0].Type == dnsmessage.TypeA {
				m.Answers = []dnsmessage.Resource{{
					Header: dnsmessage.ResourceHeader{Name: m.Questions[0].Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET},
					Body:   &dnsmessage.AResource{A: answer.As4()},
				}}
			}
			m.Additionals = nil
			if b, err := m.Pack(); err == nil {
				_, _ = pc.WriteTo(b, from)
			}
		}
	}()
	return &n
}

// ask queries at:53 for name A and returns the rcode and first address.
func ask(t *testing.T, at, name string) (dnsmessage.RCode, netip.Addr) {
	t.Helper()
	q := dnsmessage.Message{Header: dnsmessage.Header{ID: 7, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}
	b, _ := q.Pack()
	c, err := net.Dial("udp", at+":53")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("ask %s for %s: %v", at, name, err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	for _, a := range m.Answers {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			return m.Header.RCode, netip.AddrFrom4(r.A)
		}
	}
	return m.Header.RCode, netip.Addr{}
}
