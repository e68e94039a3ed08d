package deploy

import "testing"

func TestNotAliveMembers(t *testing.T) {
	s := &Status{
		Agents: []AgentStatus{{Machine: "s1"}, {Machine: "s2"}, {Machine: "c1"}},
		Consul: []ConsulMember{{Name: "s1", Status: "alive"}, {Name: "s2", Status: "failed"}},
	}
	if got, want := notAliveMembers(s), "; not alive: s2 (failed), c1 (no member)"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	s.Consul = append(s.Consul[:1], ConsulMember{Name: "s2", Status: "alive"}, ConsulMember{Name: "c1", Status: "alive"})
	if got := notAliveMembers(s); got != "" {
		t.Fatalf("all alive: %q", got)
	}
}
