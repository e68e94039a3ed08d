package upgrade

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/hashi"
)

// product is what an upgrade does with Consul or Nomad servers. Every
// query goes to the first server that answers, skipping the address
// except (a server being restarted).
type product interface {
	name() string
	health(ctx context.Context, except string) (hashi.ClusterHealth, error)
	// members are the servers' gossip members with their versions.
	members(ctx context.Context, except string) ([]hashi.Member, error)
	canTransfer() bool
	transfer(ctx context.Context, id, except string) error
	snapshot(ctx context.Context, path string) (hashi.SnapshotInfo, error)
	// ping asks the server at addr itself who leads: autopilot and gossip
	// take seconds to notice a server that just died, its API does not.
	ping(ctx context.Context, addr string) error
}

// pingAll says which servers do not answer, but the one at except.
func pingAll(ctx context.Context, u *Upgrader, p product, except string) error {
	var errs []error
	for _, s := range u.cfg.Servers {
		if s.Address == except {
			continue
		}
		if err := p.ping(ctx, s.Address); err != nil {
			errs = append(errs, fmt.Errorf("%s server %s (%s) does not answer: %w", p.name(), s.Machine, s.Address, err))
		}
	}
	return errors.Join(errs...)
}

// queryLimit bounds one query of one server: a server that accepts
// connections but does not answer must not stall the upgrade; the next
// one is asked.
const queryLimit = 30 * time.Second

// anyServer calls f with the API of each server in turn until one
// answers, each call bounded by limit (0: by ctx only, for drains and
// transfers that take as long as they take). Servers that failed to
// answer lately are asked last: a partitioned server costs a whole limit
// per query, and a gate that asked it first would never finish a check.
func anyServer[C any](ctx context.Context, u *Upgrader, except string, connect func(string) (C, error), limit time.Duration, f func(context.Context, C) error) error {
	var errs []error
	for _, s := range u.serverOrder() {
		if s.Address == except {
			continue
		}
		c, err := connect(s.Address)
		if err != nil {
			return err
		}
		cctx, cancel := ctx, context.CancelFunc(func() {})
		if limit > 0 {
			cctx, cancel = context.WithTimeout(ctx, limit)
		}
		err = f(cctx, c)
		cancel()
		if err == nil {
			u.answered(s)
			return nil
		}
		if ctx.Err() != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.Machine, err))
			break
		}
		u.failed(s, err)
		errs = append(errs, fmt.Errorf("%s: %w", s.Machine, err))
	}
	if len(errs) == 0 {
		return errors.New("no server to ask")
	}
	return errors.Join(errs...)
}

// slowFor is how long a server that failed to answer is asked last.
const slowFor = time.Minute

// serverOrder is the servers in their order, those that failed to answer
// within slowFor moved to the end.
func (u *Upgrader) serverOrder() []Server {
	u.slowMu.Lock()
	defer u.slowMu.Unlock()
	var ok, slow []Server
	for _, s := range u.cfg.Servers {
		if f, bad := u.slow[s.Address]; bad && time.Since(f.at) < slowFor {
			slow = append(slow, s)
		} else {
			ok = append(ok, s)
		}
	}
	return append(ok, slow...)
}

func (u *Upgrader) answered(s Server) {
	u.slowMu.Lock()
	delete(u.slow, s.Address)
	u.slowMu.Unlock()
}

func (u *Upgrader) failed(s Server, err error) {
	u.slowMu.Lock()
	if u.slow == nil {
		u.slow = map[string]slowServer{}
	}
	u.slow[s.Address] = slowServer{machine: s.Machine, at: time.Now(), err: err}
	u.slowMu.Unlock()
}

// unanswered says which servers failed to answer within slowFor, "" if
// none.
func (u *Upgrader) unanswered() string {
	u.slowMu.Lock()
	defer u.slowMu.Unlock()
	var parts []string
	for _, s := range u.cfg.Servers {
		if f, bad := u.slow[s.Address]; bad && time.Since(f.at) < slowFor {
			parts = append(parts, fmt.Sprintf("%s (%s) does not answer: %v", f.machine, s.Address, f.err))
		}
	}
	return strings.Join(parts, "; ")
}

type consulProduct struct{ u *Upgrader }

func (p *consulProduct) name() string { return Consul }

func (p *consulProduct) health(ctx context.Context, except string) (h hashi.ClusterHealth, err error) {
	err = anyServer(ctx, p.u, except, p.u.cfg.APIs.Consul, queryLimit, func(ctx context.Context, c *consulapi.Client) error {
		h, err = hashi.ConsulAutopilotHealth(ctx, c)
		return err
	})
	return h, err
}

func (p *consulProduct) members(ctx context.Context, except string) (ms []hashi.Member, err error) {
	err = anyServer(ctx, p.u, except, p.u.cfg.APIs.Consul, queryLimit, func(ctx context.Context, c *consulapi.Client) error {
		ms, err = hashi.ConsulMemberVersions(ctx, c)
		return err
	})
	return ms, err
}

func (p *consulProduct) canTransfer() bool { return hashi.ConsulCanTransferLeadership() }

func (p *consulProduct) transfer(ctx context.Context, id, except string) error {
	return errors.New("consul 1.14 cannot transfer leadership")
}

func (p *consulProduct) snapshot(ctx context.Context, path string) (info hashi.SnapshotInfo, err error) {
	err = anyServer(ctx, p.u, "", p.u.cfg.APIs.Consul, 0, func(ctx context.Context, c *consulapi.Client) error {
		info, err = hashi.SaveConsulSnapshot(ctx, c, path)
		return err
	})
	return info, err
}

func (p *consulProduct) ping(ctx context.Context, addr string) error {
	c, err := p.u.cfg.APIs.Consul(addr)
	if err != nil {
		return err
	}
	var leader string
	if _, err := c.Raw().Query("/v1/status/leader", &leader, (&consulapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return err
	}
	if leader == "" {
		return errors.New("it knows no leader")
	}
	return nil
}

type nomadProduct struct{ u *Upgrader }

func (p *nomadProduct) ping(ctx context.Context, addr string) error {
	c, err := p.u.cfg.APIs.Nomad(addr)
	if err != nil {
		return err
	}
	var leader string
	if _, err := c.Raw().Query("/v1/status/leader", &leader, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return err
	}
	if leader == "" {
		return errors.New("it knows no leader")
	}
	return nil
}

func (p *nomadProduct) name() string { return Nomad }

func (p *nomadProduct) health(ctx context.Context, except string) (h hashi.ClusterHealth, err error) {
	err = anyServer(ctx, p.u, except, p.u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) error {
		h, err = hashi.NomadAutopilotHealth(ctx, c)
		return err
	})
	return h, err
}

func (p *nomadProduct) members(ctx context.Context, except string) (ms []hashi.Member, err error) {
	err = anyServer(ctx, p.u, except, p.u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) error {
		ms, err = hashi.NomadServerVersions(ctx, c)
		return err
	})
	return ms, err
}

// Nomad transfers leadership since 1.8.3 (operator raft
// transfer-leadership), so the versions steppe upgrades from have it.
func (p *nomadProduct) canTransfer() bool { return true }

func (p *nomadProduct) transfer(ctx context.Context, id, except string) error {
	return anyServer(ctx, p.u, except, p.u.cfg.APIs.Nomad, 0, func(ctx context.Context, c *nomadapi.Client) error {
		return hashi.NomadTransferLeadership(ctx, c, id)
	})
}

func (p *nomadProduct) snapshot(ctx context.Context, path string) (info hashi.SnapshotInfo, err error) {
	err = anyServer(ctx, p.u, "", p.u.cfg.APIs.Nomad, 0, func(ctx context.Context, c *nomadapi.Client) error {
		info, err = hashi.SaveNomadSnapshot(ctx, c, path)
		return err
	})
	return info, err
}
