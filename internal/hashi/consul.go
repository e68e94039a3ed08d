// Package hashi runs the operations steppe performs on a cluster's Consul
// and Nomad through their official Go API clients: ACL bootstrap, the
// policies and tokens of the plan, waiting for a leader, members and
// autopilot health.
package hashi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/steppe/steppe/internal/cluster"
)

// TLSFiles are the files a client presents and trusts.
type TLSFiles struct {
	CAFile   string
	CertFile string
	KeyFile  string
}

// ConsulClient is a Consul API client for the HTTPS address addr
// ("127.0.0.11:8501"), authenticating with the given client certificate
// and token ("" for none).
func ConsulClient(addr string, tls TLSFiles, token cluster.Secret) (*consulapi.Client, error) {
	cfg := consulapi.DefaultNonPooledConfig()
	cfg.Address = addr
	cfg.Scheme = "https"
	cfg.Token = token.Reveal()
	cfg.TLSConfig = consulapi.TLSConfig{CAFile: tls.CAFile, CertFile: tls.CertFile, KeyFile: tls.KeyFile}
	// The server's certificate is verified against addr's IP (every node
	// certificate has its address as an IP SAN).
	c, err := consulapi.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("consul client for %s: %w", addr, err)
	}
	return c, nil
}

// poll calls f every interval until it returns true, an error that is not
// retryable, or ctx ends; the last error is reported with the deadline.
func poll(ctx context.Context, what string, f func() (bool, error)) error {
	var last error
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		done, err := f()
		if done && err == nil {
			return nil
		}
		var perm *permanentError
		if errors.As(err, &perm) {
			return fmt.Errorf("%s: %w", what, perm.err)
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), last)
			}
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-tick.C:
		}
	}
}

type permanentError struct{ err error }

func (p *permanentError) Error() string { return p.err.Error() }

func permanent(err error) error { return &permanentError{err} }

func statusCode(err error) int {
	var se consulapi.StatusError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

// WaitConsulLeader waits until the Consul cluster has a leader and returns
// its RPC address.
func WaitConsulLeader(ctx context.Context, c *consulapi.Client) (string, error) {
	return waitLeader(ctx, "Consul", c.Status().Leader)
}

// waitLeader polls leader until it names one.
func waitLeader(ctx context.Context, product string, leader func() (string, error)) (string, error) {
	var addr string
	err := poll(ctx, "wait for a "+product+" leader", func() (bool, error) {
		l, err := leader()
		if err != nil {
			return false, err
		}
		addr = l
		return l != "", nil
	})
	return addr, err
}

// BootstrapConsulACL waits until Consul accepts its initial management
// token and returns it. steppe chose the token before the servers started
// (cluster.TokenConsulBootstrap in the state directory, given to the
// servers as acl.tokens.initial_management), and Consul's leader creates
// it when it first sets up ACLs: no API call bootstraps anything, so a
// crash at any point of `up` loses no token. Idempotent.
//
// A Consul whose ACLs were set up without that token (bootstrapped outside
// steppe, or servers given another state directory's secrets) is an error
// that says so, once it has refused the token for consulACLSetupGrace:
// Consul answers a token it does not know (yet) with the same 403 whether
// or not its leader has set up ACLs, and has no read-only way to ask.
func BootstrapConsulACL(ctx context.Context, c *consulapi.Client, src SecretSource) (cluster.Secret, error) {
	tok, err := src.Token(cluster.TokenConsulBootstrap)
	if err != nil {
		return "", err
	}
	var refusedSince time.Time
	err = poll(ctx, "wait until Consul accepts its initial management token", func() (bool, error) {
		self, _, err := c.ACL().TokenReadSelf((&consulapi.QueryOptions{Token: tok.Reveal()}).WithContext(ctx))
		if err == nil {
			if !slices.ContainsFunc(self.Policies, func(p *consulapi.ACLTokenPolicyLink) bool { return p.Name == "global-management" }) {
				return false, permanent(errors.New("the state directory's Consul management token is not a management token"))
			}
			return true, nil
		}
		if code := statusCode(err); code != http.StatusForbidden && code != http.StatusUnauthorized {
			refusedSince = time.Time{}
			return false, err // no leader yet: retry
		}
		if refusedSince.IsZero() {
			refusedSince = time.Now()
		}
		if time.Since(refusedSince) > consulACLSetupGrace {
			return false, permanent(fmt.Errorf("consul's ACLs were bootstrapped outside steppe: for %v they refused the state directory's management token (%v), which its servers were given as acl.tokens.initial_management; use the state directory that made this cluster, or reset with Consul's acl-bootstrap-reset procedure", consulACLSetupGrace, err))
		}
		return false, err // the leader has not set up ACLs yet
	})
	if err != nil {
		return "", err
	}
	return tok, nil
}

// ApplyConsulACL creates or updates the plan's policies and tokens. c
// must carry a management token. Idempotent: run again, it changes
// nothing that is already as planned.
func ApplyConsulACL(ctx context.Context, c *consulapi.Client, plan *cluster.ConsulACLPlan) error {
	acl := c.ACL()
	if err := WaitConsulToken(ctx, c); err != nil {
		return err
	}
	wo := (&consulapi.WriteOptions{}).WithContext(ctx)
	for _, p := range plan.Policies {
		// Consul 1.14 answers 403 "ACL not found" for a policy that does
		// not exist (the token itself was checked above).
		existing, _, err := acl.PolicyReadByName(p.Name, (&consulapi.QueryOptions{}).WithContext(ctx))
		if err != nil && !isACLNotFound(err) {
			return fmt.Errorf("consul policy %s: %w", p.Name, err)
		}
		want := &consulapi.ACLPolicy{Name: p.Name, Description: p.Description, Rules: p.Rules}
		switch {
		case existing == nil:
			if _, _, err := acl.PolicyCreate(want, wo); err != nil {
				return fmt.Errorf("create consul policy %s: %w", p.Name, err)
			}
		case existing.Rules != p.Rules || existing.Description != p.Description:
			want.ID = existing.ID
			if _, _, err := acl.PolicyUpdate(want, wo); err != nil {
				return fmt.Errorf("update consul policy %s: %w", p.Name, err)
			}
		}
	}
	for _, t := range plan.Tokens {
		want := &consulapi.ACLToken{SecretID: t.SecretID.Reveal(), Description: t.Description}
		for _, p := range t.Policies {
			want.Policies = append(want.Policies, &consulapi.ACLTokenPolicyLink{Name: p})
		}
		if t.NodeIdentity != "" {
			want.NodeIdentities = []*consulapi.ACLNodeIdentity{{NodeName: t.NodeIdentity, Datacenter: t.Datacenter}}
		}
		existing, _, err := acl.TokenReadSelf((&consulapi.QueryOptions{Token: t.SecretID.Reveal()}).WithContext(ctx))
		if err != nil && !isACLNotFound(err) {
			return fmt.Errorf("consul token %s: %w", t.Name, err)
		}
		if existing == nil {
			if _, _, err := acl.TokenCreate(want, wo); err != nil {
				return fmt.Errorf("create consul token %s: %w", t.Name, err)
			}
			continue
		}
		if tokenMatches(existing, want) {
			continue
		}
		want.AccessorID = existing.AccessorID
		if _, _, err := acl.TokenUpdate(want, wo); err != nil {
			return fmt.Errorf("update consul token %s: %w", t.Name, err)
		}
	}
	if plan.Anonymous == nil {
		return nil
	}
	return applyAnonymous(ctx, acl, plan.Anonymous)
}

// consulACLSetupGrace is how long a leader may take to create the initial
// management token: it does so as it takes up leadership, in well under a
// second; a loaded machine gets thirty times that.
const consulACLSetupGrace = 30 * time.Second

// consulAnonymousAccessor is the accessor ID Consul gives its anonymous
// token in every cluster.
const consulAnonymousAccessor = "00000000-0000-0000-0000-000000000002"

// applyAnonymous makes the anonymous token's policies exactly policies.
func applyAnonymous(ctx context.Context, acl *consulapi.ACL, policies []string) error {
	anon, _, err := acl.TokenRead(consulAnonymousAccessor, (&consulapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("consul anonymous token: %w", err)
	}
	var have []string
	for _, p := range anon.Policies {
		have = append(have, p.Name)
	}
	want := slices.Sorted(slices.Values(policies))
	if slices.Equal(slices.Sorted(slices.Values(have)), want) {
		return nil
	}
	anon.Policies = nil
	for _, p := range want {
		anon.Policies = append(anon.Policies, &consulapi.ACLTokenPolicyLink{Name: p})
	}
	if _, _, err := acl.TokenUpdate(anon, (&consulapi.WriteOptions{}).WithContext(ctx)); err != nil {
		return fmt.Errorf("update consul anonymous token: %w", err)
	}
	return nil
}

// WaitConsulToken waits until the server behind c resolves c's token: a
// follower resolves tokens from its own copy of the raft log, so right
// after a token is created through another server it may not know it.
func WaitConsulToken(ctx context.Context, c *consulapi.Client) error {
	return poll(ctx, "wait until Consul knows the token", func() (bool, error) {
		// Stale: answered from the server's own state, not the leader's.
		_, _, err := c.ACL().TokenReadSelf((&consulapi.QueryOptions{AllowStale: true}).WithContext(ctx))
		return err == nil, err
	})
}

// isACLNotFound is Consul's answer to a secret it does not know.
func isACLNotFound(err error) bool {
	code := statusCode(err)
	return (code == http.StatusForbidden || code == http.StatusNotFound) && strings.Contains(err.Error(), "ACL not found")
}

func tokenMatches(have, want *consulapi.ACLToken) bool {
	if have.Description != want.Description || len(have.Policies) != len(want.Policies) || len(have.NodeIdentities) != len(want.NodeIdentities) {
		return false
	}
	var hp, wp []string
	for _, p := range have.Policies {
		hp = append(hp, p.Name)
	}
	for _, p := range want.Policies {
		wp = append(wp, p.Name)
	}
	slices.Sort(hp)
	slices.Sort(wp)
	if !slices.Equal(hp, wp) {
		return false
	}
	for i := range have.NodeIdentities {
		if *have.NodeIdentities[i] != *want.NodeIdentities[i] {
			return false
		}
	}
	return true
}

// ConsulMember is one agent of the LAN pool.
type ConsulMember struct {
	Name   string
	Addr   string
	Server bool
	Alive  bool
}

// ConsulMembers lists the LAN members as the agent behind c sees them.
func ConsulMembers(c *consulapi.Client) ([]ConsulMember, error) {
	ms, err := c.Agent().Members(false)
	if err != nil {
		return nil, fmt.Errorf("consul members: %w", err)
	}
	out := make([]ConsulMember, 0, len(ms))
	for _, m := range ms {
		out = append(out, ConsulMember{
			Name:   m.Name,
			Addr:   m.Addr,
			Server: m.Tags["role"] == "consul",
			Alive:  m.Status == serfAlive,
		})
	}
	slices.SortFunc(out, func(a, b ConsulMember) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// WaitConsulHealthy waits until autopilot reports every one of servers
// servers healthy and voting, the state in which one can be lost (or
// upgraded) without losing quorum.
func WaitConsulHealthy(ctx context.Context, c *consulapi.Client, servers int) (ClusterHealth, error) {
	return waitHealthy(ctx, "wait for Consul autopilot health", servers, func() (ClusterHealth, error) {
		return ConsulAutopilotHealth(ctx, c)
	})
}

// waitHealthy polls read until it reports a healthy cluster of servers
// healthy voters.
func waitHealthy(ctx context.Context, what string, servers int, read func() (ClusterHealth, error)) (ClusterHealth, error) {
	var h ClusterHealth
	err := poll(ctx, what, func() (bool, error) {
		var err error
		if h, err = read(); err != nil {
			return false, err
		}
		voters := 0
		for _, s := range h.Servers {
			if s.Healthy && s.Voter {
				voters++
			}
		}
		if !h.Healthy || voters != servers {
			return false, fmt.Errorf("%d of %d servers healthy voters", voters, servers)
		}
		return true, nil
	})
	return h, err
}

// serfAlive is serf's MemberStatus for a live member (api v1.18 has no
// constant for it).
const serfAlive = 1

// TokenDeleter forgets tokens; *cluster.State is one.
type TokenDeleter interface {
	LookupToken(name string) (cluster.Secret, bool)
	DeleteToken(name string) error
}

// DeleteConsulTokens deletes the tokens named (as the state directory
// names them) from Consul, then from the store: a removed machine's
// tokens must not outlive it. A token Consul or the store does not know
// is already deleted. c must carry a management token.
func DeleteConsulTokens(ctx context.Context, c *consulapi.Client, store TokenDeleter, names []string) error {
	acl := c.ACL()
	for _, name := range names {
		secret, ok := store.LookupToken(name)
		if !ok {
			continue
		}
		tok, _, err := acl.TokenReadSelf((&consulapi.QueryOptions{Token: secret.Reveal()}).WithContext(ctx))
		switch {
		case err != nil && !isACLNotFound(err):
			return fmt.Errorf("consul token %s: %w", name, err)
		case err == nil:
			if _, err := acl.TokenDelete(tok.AccessorID, (&consulapi.WriteOptions{}).WithContext(ctx)); err != nil {
				return fmt.Errorf("delete consul token %s: %w", name, err)
			}
		}
		if err := store.DeleteToken(name); err != nil {
			return fmt.Errorf("delete token %s: %w", name, err)
		}
	}
	return nil
}

// ConsulForceLeave removes a node that is gone for good from the LAN
// pool at once (force-leave with prune), rather than leaving it failed
// for 72 hours. A node Consul does not know is already gone.
func ConsulForceLeave(ctx context.Context, c *consulapi.Client, node string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// This version of the client takes no context for it; the request is
	// one PUT answered at once.
	err := c.Agent().ForceLeaveOpts(node, consulapi.ForceLeaveOpts{Prune: true})
	if err != nil && !strings.Contains(err.Error(), "No node found") {
		return fmt.Errorf("consul force-leave %s: %w", node, err)
	}
	return nil
}
