package upgrade

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	version "github.com/hashicorp/go-version"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/hashi"
)

// MachineVersions is what a machine runs: product → version ("" when the
// daemon is not found).
type MachineVersions struct {
	Machine  string
	Address  string
	Server   bool
	Versions map[string]string
}

// PreflightReport is what the preflight found.
type PreflightReport struct {
	From     map[string]string // product → the oldest version running
	Machines []MachineVersions
	Guides   []GuideResult
}

// Preflight checks that the upgrade may start, and refuses otherwise,
// saying why: the version policy (CheckVersions), the target artifacts,
// every server present, alive, healthy and a voter, every client ready,
// and the checks of the upgrade guides for the releases crossed.
func (u *Upgrader) Preflight(ctx context.Context) (*PreflightReport, error) {
	rep := &PreflightReport{From: map[string]string{}}
	var refusals []error
	byAddr := map[string]*MachineVersions{}
	for _, s := range u.cfg.Servers {
		mv := &MachineVersions{Machine: s.Machine, Address: s.Address, Server: true, Versions: map[string]string{}}
		byAddr[s.Address] = mv
	}
	for _, c := range u.cfg.Clients {
		byAddr[c.Address] = &MachineVersions{Machine: c.Machine, Address: c.Address, Versions: map[string]string{}}
	}

	for _, prod := range slices.Sorted(maps.Keys(u.cfg.Target)) {
		to := u.cfg.Target[prod]
		p := u.prods[prod]
		h, err := p.health(ctx, "")
		if err != nil {
			// No leader, or none reachable: as unhealthy as it gets.
			refusals = append(refusals, fmt.Errorf("the %s cluster's health cannot be read: %w", prod, err))
		} else if probs := h.Problems(len(u.cfg.Servers)); len(probs) > 0 {
			refusals = append(refusals, fmt.Errorf("the %s cluster is not healthy: %s", prod, strings.Join(probs, "; ")))
		}
		if err := pingAll(ctx, u, p, ""); err != nil {
			refusals = append(refusals, err)
		}
		members, err := p.members(ctx, "")
		if err != nil {
			refusals = append(refusals, fmt.Errorf("the %s members cannot be read: %w", prod, err))
			continue
		}
		for _, s := range u.cfg.Servers {
			m := memberAt(members, s.Address)
			switch {
			case m == nil:
				refusals = append(refusals, fmt.Errorf("%s server %s (%s) is not a member", prod, s.Machine, s.Address))
			case !m.Alive:
				refusals = append(refusals, fmt.Errorf("%s server %s (%s) is %s", prod, s.Machine, s.Address, m.Status))
			default:
				byAddr[s.Address].Versions[prod] = m.Version
			}
		}
		if err := u.clientVersions(ctx, prod, byAddr, &refusals); err != nil {
			return nil, fmt.Errorf("preflight: %w", err)
		}
		from, err := oldest(byAddr, prod)
		if err != nil {
			return nil, fmt.Errorf("preflight: %w", err)
		}
		if from == "" {
			refusals = append(refusals, fmt.Errorf("no %s version found running", prod))
			continue
		}
		rep.From[prod] = from
		if err := CheckVersions(prod, from, to, u.cfg.Force); err != nil {
			refusals = append(refusals, err)
		}
		if err := u.cfg.Artifacts.Check(ctx, prod, to); err != nil {
			refusals = append(refusals, fmt.Errorf("target artifact %s %s: %w", prod, to, err))
		}
	}
	if len(refusals) == 0 {
		env, err := u.guideEnv()
		if err != nil {
			return nil, err
		}
		for _, prod := range slices.Sorted(maps.Keys(u.cfg.Target)) {
			res, err := CheckGuides(ctx, env, prod, rep.From[prod], u.cfg.Target[prod])
			rep.Guides = append(rep.Guides, res...)
			if err != nil {
				refusals = append(refusals, err)
			}
		}
	}
	for _, s := range u.cfg.Servers {
		rep.Machines = append(rep.Machines, *byAddr[s.Address])
	}
	for _, c := range u.cfg.Clients {
		rep.Machines = append(rep.Machines, *byAddr[c.Address])
	}
	if len(refusals) > 0 {
		return rep, &RefusedError{Reasons: refusals}
	}
	return rep, nil
}

// RefusedError is a preflight's refusal, with every reason.
type RefusedError struct{ Reasons []error }

func (e *RefusedError) Error() string {
	var b strings.Builder
	b.WriteString("upgrade refused:")
	for _, r := range e.Reasons {
		b.WriteString("\n  - ")
		b.WriteString(r.Error())
	}
	return b.String()
}

func (e *RefusedError) Unwrap() []error { return e.Reasons }

// clientVersions records what the client machines run of prod, and
// refuses clients that are not alive (Consul) or ready (Nomad).
func (u *Upgrader) clientVersions(ctx context.Context, prod string, byAddr map[string]*MachineVersions, refusals *[]error) error {
	if len(u.cfg.Clients) == 0 {
		return nil
	}
	switch prod {
	case Consul:
		var ms []hashi.Member
		err := anyServer(ctx, u, "", u.cfg.APIs.Consul, queryLimit, func(ctx context.Context, c *consulapi.Client) (err error) {
			ms, err = hashi.ConsulMemberVersions(ctx, c)
			return err
		})
		if err != nil {
			return err
		}
		for _, c := range u.cfg.Clients {
			var found *hashi.Member
			for i := range ms {
				if ms[i].Addr == c.Address && !ms[i].Server {
					found = &ms[i]
				}
			}
			switch {
			case found == nil:
				*refusals = append(*refusals, fmt.Errorf("consul client %s (%s) is not a member", c.Machine, c.Address))
			case !found.Alive:
				*refusals = append(*refusals, fmt.Errorf("consul client %s (%s) is %s", c.Machine, c.Address, found.Status))
			default:
				byAddr[c.Address].Versions[prod] = found.Version
			}
		}
	case Nomad:
		var nodes []hashi.NomadNode
		err := anyServer(ctx, u, "", u.cfg.APIs.Nomad, queryLimit, func(ctx context.Context, c *nomadapi.Client) (err error) {
			nodes, err = hashi.NomadNodes(ctx, c)
			return err
		})
		if err != nil {
			return err
		}
		for _, c := range u.cfg.Clients {
			n := nodeNamed(nodes, c.Machine)
			switch {
			case n == nil:
				*refusals = append(*refusals, fmt.Errorf("nomad client %s is not a node", c.Machine))
			case n.Status != nomadapi.NodeStatusReady:
				*refusals = append(*refusals, fmt.Errorf("nomad client %s is %s, not ready", c.Machine, n.Status))
			default:
				byAddr[c.Address].Versions[prod] = n.Version
			}
		}
	}
	return nil
}

func nodeNamed(nodes []hashi.NomadNode, name string) *hashi.NomadNode {
	for i := range nodes {
		if nodes[i].Name == name {
			return &nodes[i]
		}
	}
	return nil
}

func oldest(byAddr map[string]*MachineVersions, prod string) (string, error) {
	var min *version.Version
	for _, mv := range byAddr {
		s := mv.Versions[prod]
		if s == "" {
			continue
		}
		v, err := version.NewVersion(s)
		if err != nil {
			return "", fmt.Errorf("%s on %s reports version %q: %w", prod, mv.Machine, s, err)
		}
		if min == nil || v.LessThan(min) {
			min = v
		}
	}
	if min == nil {
		return "", nil
	}
	return min.Original(), nil
}

func (u *Upgrader) guideEnv() (GuideEnv, error) {
	var env GuideEnv
	var err error
	if env.Consul, err = u.cfg.APIs.Consul(u.cfg.Servers[0].Address); err != nil {
		return env, err
	}
	for _, s := range u.cfg.Servers {
		c, err := u.cfg.APIs.Nomad(s.Address)
		if err != nil {
			return env, err
		}
		env.NomadServers = append(env.NomadServers, c)
	}
	return env, nil
}

// plan orders the steps: a snapshot of each product first, then the
// servers of each product (Consul, Nomad, Vault), then the clients. Only
// machines not already on the target get a step.
func (u *Upgrader) plan(pre *PreflightReport) *State {
	st := &State{Format: stateFormat, Created: time.Now().UTC(), From: pre.From, Target: u.cfg.Target, Clients: u.cfg.ClientStrategy}
	prods := []string{}
	for _, p := range []string{Consul, Nomad, Vault} {
		if _, ok := u.cfg.Target[p]; ok {
			prods = append(prods, p)
		}
	}
	for _, p := range prods {
		st.Steps = append(st.Steps, Step{ID: "snapshot/" + p, Kind: KindSnapshot, Product: p, From: pre.From[p], Status: StatusPending})
	}
	for _, p := range prods {
		for _, mv := range pre.Machines {
			if mv.Server && mv.Versions[p] != u.cfg.Target[p] {
				st.Steps = append(st.Steps, Step{ID: "server/" + p + "/" + mv.Machine, Kind: KindServer, Product: p,
					Machine: mv.Machine, Address: mv.Address, From: mv.Versions[p], To: u.cfg.Target[p], Status: StatusPending})
			}
		}
	}
	for _, c := range u.cfg.Clients {
		var mv MachineVersions
		for _, m := range pre.Machines {
			if m.Address == c.Address {
				mv = m
			}
		}
		var from, to []string
		for _, p := range prods {
			if p == Vault {
				continue // clients run no Vault
			}
			if mv.Versions[p] != u.cfg.Target[p] {
				from = append(from, p+" "+mv.Versions[p])
				to = append(to, p+" "+u.cfg.Target[p])
			}
		}
		if len(to) > 0 {
			st.Steps = append(st.Steps, Step{ID: "client/" + c.Machine, Kind: KindClient, Machine: c.Machine, Address: c.Address,
				Pool: c.Pool, From: strings.Join(from, ", "), To: strings.Join(to, ", "), Status: StatusPending})
		}
	}
	return st
}
