package deploy

import (
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/supervise"
)

func TestResolverStatus(t *testing.T) {
	now := time.Now()
	coredns := []supervise.Status{{Name: "consul"}, {Name: "coredns"}}
	started := agent.AgentInfo{StartedAt: now.Add(-time.Minute)}
	for _, c := range []struct {
		name          string
		st            agent.StatusReport
		summary, prob string // substrings; "" for none
	}{
		{"local", agent.StatusReport{Services: coredns}, "host's, not switched", ""},
		{"no coredns", agent.StatusReport{}, "", ""},
		{"switched", agent.StatusReport{Agent: started, Resolver: &agent.ResolverStatus{State: agent.ResolverSwitched, Address: "10.0.0.5"}}, "switched to CoreDNS at 10.0.0.5", ""},
		{"fallback", agent.StatusReport{Agent: started, Resolver: &agent.ResolverStatus{State: agent.ResolverFallback, Address: "10.0.0.5", LastError: "timeout"}}, "back on the previous one", "m1: its resolver (CoreDNS at 10.0.0.5) stopped answering"},
		{"waiting, new", agent.StatusReport{Agent: agent.AgentInfo{StartedAt: now}, Resolver: &agent.ResolverStatus{State: agent.ResolverWaiting, Address: "10.0.0.5"}}, "not switched yet", ""},
		{"waiting, long", agent.StatusReport{Agent: started, Resolver: &agent.ResolverStatus{State: agent.ResolverWaiting, Address: "10.0.0.5"}}, "not switched yet", "has not answered a consul. query"},
	} {
		s, p := resolverStatus("m1", c.st, now)
		if (c.summary == "") != (s == "") || !strings.Contains(s, c.summary) || (c.prob == "") != (p == "") || !strings.Contains(p, c.prob) {
			t.Errorf("%s: %q / %q", c.name, s, p)
		}
	}
	spec := cluster.DefaultSpec()
	if s := dnsSummary(spec); !strings.Contains(s, "consul. only") {
		t.Errorf("no upstream: %q", s)
	}
	spec.DNS.Upstream = []string{"10.0.0.2"}
	if s := dnsSummary(spec); !strings.Contains(s, "10.0.0.2") {
		t.Errorf("upstream: %q", s)
	}
	if v := withCoreDNS(spec, map[string][]string{"consul": {"1.14.11"}}); len(v["coredns"]) != 1 || v["coredns"][0] != cluster.DefaultCoreDNSVersion || len(v["consul"]) != 1 {
		t.Errorf("withCoreDNS: %v", v)
	}
}
