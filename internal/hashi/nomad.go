package hashi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/cluster"
)

// NomadClient is a Nomad API client for the HTTPS address addr
// ("127.0.0.11:4646") with the given client certificate and token.
func NomadClient(addr string, tls TLSFiles, token cluster.Secret) (*nomadapi.Client, error) {
	cfg := nomadapi.DefaultConfig()
	cfg.Address = "https://" + addr
	cfg.SecretID = token.Reveal()
	cfg.TLSConfig = &nomadapi.TLSConfig{CACert: tls.CAFile, ClientCert: tls.CertFile, ClientKey: tls.KeyFile}
	c, err := nomadapi.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("nomad client for %s: %w", addr, err)
	}
	return c, nil
}

// SecretSource gives the token called name, creating it when absent.
// *cluster.State is one.
type SecretSource interface {
	Token(name string) (cluster.Secret, error)
}

// BootstrapNomadACL bootstraps Nomad's ACL system with the management
// secret kept in the state directory (cluster.TokenNomadBootstrap), which
// Nomad accepts as the bootstrap secret: the token is known before the
// call, so a crash cannot lose it. Idempotent: when ACLs are already
// bootstrapped it checks that the stored token is the management token.
func BootstrapNomadACL(ctx context.Context, c *nomadapi.Client, src SecretSource) (cluster.Secret, error) {
	tok, err := src.Token(cluster.TokenNomadBootstrap)
	if err != nil {
		return "", err
	}
	err = poll(ctx, "bootstrap Nomad ACLs", func() (bool, error) {
		_, _, err := c.ACLTokens().BootstrapOpts(tok.Reveal(), (&nomadapi.WriteOptions{}).WithContext(ctx))
		if err == nil {
			return true, nil
		}
		if !strings.Contains(err.Error(), "ACL bootstrap already done") {
			return false, err // no leader yet: retry
		}
		self, _, serr := c.ACLTokens().Self((&nomadapi.QueryOptions{AuthToken: tok.Reveal()}).WithContext(ctx))
		if serr != nil {
			return false, permanent(fmt.Errorf("nomad's ACLs were bootstrapped outside steppe and refuse the state directory's token: %w", serr))
		}
		if self.Type != "management" {
			return false, permanent(errors.New("the state directory's Nomad token is not a management token"))
		}
		return true, nil
	})
	if err != nil {
		return "", err
	}
	return tok, nil
}

// WaitNomadToken waits until the server behind c resolves c's token:
// followers know a token created through another server only once they
// applied its raft entry.
func WaitNomadToken(ctx context.Context, c *nomadapi.Client) error {
	return poll(ctx, "wait until Nomad knows the token", func() (bool, error) {
		// A stale read is answered from the server's own state, which is
		// what its agent endpoints resolve tokens against; a default read
		// would be forwarded to the leader, which knows the token first.
		_, _, err := c.ACLTokens().Self((&nomadapi.QueryOptions{AllowStale: true}).WithContext(ctx))
		return err == nil, err
	})
}

// WaitNomadLeader waits until Nomad has a leader and returns its address.
func WaitNomadLeader(ctx context.Context, c *nomadapi.Client) (string, error) {
	return waitLeader(ctx, "Nomad", c.Status().Leader)
}

// NomadServer is one server of the raft configuration.
type NomadServer struct {
	Name   string
	Addr   string
	Leader bool
	Voter  bool
}

// NomadServers lists the raft peers (needs operator:read).
func NomadServers(ctx context.Context, c *nomadapi.Client) ([]NomadServer, error) {
	rc, err := c.Operator().RaftGetConfiguration((&nomadapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("nomad raft configuration: %w", err)
	}
	var out []NomadServer
	for _, s := range rc.Servers {
		out = append(out, NomadServer{Name: s.Node, Addr: s.Address, Leader: s.Leader, Voter: s.Voter})
	}
	slices.SortFunc(out, func(a, b NomadServer) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// WaitNomadHealthy waits until autopilot reports servers healthy voters.
func WaitNomadHealthy(ctx context.Context, c *nomadapi.Client, servers int) (ClusterHealth, error) {
	return waitHealthy(ctx, "wait for Nomad autopilot health", servers, func() (ClusterHealth, error) {
		return NomadAutopilotHealth(ctx, c)
	})
}

// WaitNomadClients waits until n client nodes are ready and eligible, and
// returns them.
func WaitNomadClients(ctx context.Context, c *nomadapi.Client, n int) ([]*nomadapi.NodeListStub, error) {
	var ready []*nomadapi.NodeListStub
	err := poll(ctx, fmt.Sprintf("wait for %d ready Nomad clients", n), func() (bool, error) {
		nodes, _, err := c.Nodes().List((&nomadapi.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return false, err
		}
		ready = ready[:0]
		for _, nd := range nodes {
			if nd.Status == nomadapi.NodeStatusReady && nd.SchedulingEligibility == nomadapi.NodeSchedulingEligible && !nd.Drain {
				ready = append(ready, nd)
			}
		}
		if len(ready) < n {
			return false, fmt.Errorf("%d of %d nodes ready (%d known)", len(ready), n, len(nodes))
		}
		return true, nil
	})
	return ready, err
}

// EnsureNodePools makes each of pools a Nomad node pool described as
// steppe's, so that jobs can target a steppe pool (node_pool in the job).
// Nomad's built-in pools ("default", "all") are left alone. Idempotent.
func EnsureNodePools(ctx context.Context, c *nomadapi.Client, pools []string) error {
	for _, name := range pools {
		if name == "default" || name == "all" {
			continue
		}
		desc := "steppe pool " + name
		have, _, err := c.NodePools().Info(name, (&nomadapi.QueryOptions{}).WithContext(ctx))
		if err == nil && have != nil && have.Description == desc {
			continue
		}
		if _, err := c.NodePools().Register(&nomadapi.NodePool{Name: name, Description: desc}, (&nomadapi.WriteOptions{}).WithContext(ctx)); err != nil {
			return fmt.Errorf("nomad node pool %s: %w", name, err)
		}
	}
	return nil
}
