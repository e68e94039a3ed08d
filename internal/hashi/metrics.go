package hashi

import (
	"context"
	"fmt"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/steppe/steppe/internal/cluster"
)

// The metrics a Prometheus scrapes, and the least it needs to be allowed.
//
// Consul 1.14 answers /v1/agent/metrics only for a token with agent read
// on the agent's own node (agent/agent_endpoint.go, AgentMetrics:
// AgentReadAllowed(NodeName)), ?format=prometheus included: one policy
// of agent read on every node, and nothing else. Agent read also opens
// the agent's self, metrics/stream and monitor endpoints (its config and
// its log); no KV, catalog, ACL, operator endpoint or write.
//
// Nomad 1.9 and 1.10 check no ACL on /v1/metrics (command/agent/
// metrics_endpoint.go, MetricsRequest): no token is made for it.
const (
	// PolicyConsulMetrics is the Consul policy of the metrics token.
	PolicyConsulMetrics = "steppe-metrics"
	// TokenConsulMetrics names the metrics token in the state directory.
	TokenConsulMetrics = "consul/metrics"

	consulMetricsRules = `agent_prefix "" { policy = "read" }
`
)

// EnsureConsulMetricsToken creates, or brings back to what it must be,
// the Consul token a Prometheus scrapes /v1/agent/metrics with, and
// returns its secret. The secret is the state directory's (src, created
// when absent), so running it again changes nothing. c must carry a
// management token.
func EnsureConsulMetricsToken(ctx context.Context, c *consulapi.Client, src SecretSource) (cluster.Secret, error) {
	secret, err := src.Token(TokenConsulMetrics)
	if err != nil {
		return "", fmt.Errorf("consul metrics token: %w", err)
	}
	plan := &cluster.ConsulACLPlan{
		Policies: []cluster.ConsulPolicy{{
			Name: PolicyConsulMetrics, Description: "steppe: Prometheus metrics (agent read)", Rules: consulMetricsRules,
		}},
		Tokens: []cluster.ConsulToken{{
			Name: TokenConsulMetrics, Description: "steppe: Prometheus metrics", SecretID: secret,
			Policies: []string{PolicyConsulMetrics},
		}},
		// Anonymous nil: the anonymous token is not this plan's.
	}
	if err := ApplyConsulACL(ctx, c, plan); err != nil {
		return "", fmt.Errorf("consul metrics token: %w", err)
	}
	return secret, nil
}
