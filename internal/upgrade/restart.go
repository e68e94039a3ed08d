package upgrade

import (
	"context"
	"fmt"
	"log/slog"
	"os"
)

// WaitRestarted holds a server whose daemon prod was restarted on
// the same version (to read new secrets, not to upgrade) to the gate of
// an upgrade: back as an alive member on version, autopilot healthy with
// every server a voter, its raft log caught up, all of it for g.Stable.
// Progress gets the gate's lines. servers are all the cluster's servers.
func WaitRestarted(ctx context.Context, apis APIs, servers []Server, prod string, s Server, version string, g Gate, progress func(Event)) error {
	if prod != Consul && prod != Nomad {
		return fmt.Errorf("gate: unknown product %q", prod)
	}
	// The gate records its phases in a step of an upgrade's state; a
	// restart is no upgrade, so that state goes to a scratch directory
	// and never becomes the operator's upgrade.json.
	dir, err := os.MkdirTemp("", "steppe-gate-")
	if err != nil {
		return fmt.Errorf("gate of %s: %w", s.Machine, err)
	}
	defer os.RemoveAll(dir)
	u := &Upgrader{
		cfg: Config{StateDir: dir, Servers: servers, APIs: CacheClients(apis), Progress: progress},
		log: slog.New(slog.DiscardHandler),
	}
	u.prods = products(u)
	step := Step{ID: "restart/" + prod + "/" + s.Machine, Kind: KindServer, Product: prod, Machine: s.Machine, Address: s.Address, From: version, To: version, Status: StatusRunning}
	u.st = &State{Format: stateFormat, Steps: []Step{step}}
	return g.withDefaults().server(ctx, u, 0, u.prods[prod], step, len(servers))
}
