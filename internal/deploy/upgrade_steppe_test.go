package deploy

import (
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/supervise"
)

func TestUntouchedNamesWhatChanged(t *testing.T) {
	st := func(agentPID int, svcs ...supervise.Status) agent.StatusReport {
		return agent.StatusReport{Agent: agent.AgentInfo{PID: agentPID}, Services: svcs}
	}
	consul := supervise.Status{Name: "consul", PID: 10, Restarts: 0}
	nomad := supervise.Status{Name: "nomad", PID: 11, Restarts: 1}
	before := st(1, consul, nomad)
	if err := untouched("m1", before, st(1, consul, nomad)); err != nil {
		t.Errorf("nothing changed: %v", err)
	}
	for _, c := range []struct {
		after agent.StatusReport
		want  string
	}{
		{st(2, consul, nomad), "the agent's pid changed from 1 to 2"},
		{st(1, consul, supervise.Status{Name: "nomad", PID: 12, Restarts: 2}), "nomad restarted (pid 11 → 12, restarts 1 → 2)"},
		{st(1, consul, supervise.Status{Name: "nomad", PID: 11, Restarts: 2}), "nomad restarted"},
		{st(1, nomad), "consul is gone"},
	} {
		err := untouched("m1", before, c.after)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "machine m1") {
			t.Errorf("untouched = %v, want an error naming m1 and saying %q", err, c.want)
		}
	}
}
