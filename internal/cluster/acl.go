package cluster

import "fmt"

// Names of the tokens kept in the state directory (State.Token).
const (
	// TokenConsulBootstrap is Consul's initial management token.
	TokenConsulBootstrap = "consul/bootstrap"
	// TokenNomadBootstrap is Nomad's initial management token.
	TokenNomadBootstrap = "nomad/bootstrap"
)

// TokenConsulAgent names the Consul agent token of one machine.
func TokenConsulAgent(machine string) string { return "consul/agent/" + machine }

// TokenNomadConsul names the Consul token the Nomad agent of one machine
// uses.
func TokenNomadConsul(machine string) string { return "consul/nomad/" + machine }

// Consul policies steppe creates.
const (
	PolicyNomadServer = "steppe-nomad-server"
	PolicyNomadClient = "steppe-nomad-client"
)

// ConsulPolicy is a Consul ACL policy.
type ConsulPolicy struct {
	Name        string
	Description string
	Rules       string
}

// ConsulToken is a Consul ACL token with a secret chosen by steppe.
type ConsulToken struct {
	Name        string // the state directory's name for it
	Description string
	SecretID    Secret
	Policies    []string
	// NodeIdentity, when set, gives the token what a Consul agent of that
	// node needs (node write on itself, service read) and nothing more.
	NodeIdentity string
	Datacenter   string
}

// ConsulACLPlan is every policy and token the cluster's Consul needs.
type ConsulACLPlan struct {
	Policies []ConsulPolicy
	Tokens   []ConsulToken
}

// Policies from Nomad's "Integrate Consul ACL" guide, narrowed: agents
// read what they discover, clients write only services (registration of
// workloads), servers also manage ACLs and mesh config entries (service
// identity tokens, Connect).
const (
	nomadServerRules = `agent_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "write" }
acl = "write"
mesh = "write"
`
	nomadClientRules = `agent_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "write" }
`
)

// ConsulACL plans the Consul policies and tokens of the machines ms. The
// token secrets come from the state directory, created when absent, so the
// same secrets the machines were given are the ones registered.
func ConsulACL(spec *Spec, st *State, ms []Machine) (*ConsulACLPlan, error) {
	p := &ConsulACLPlan{Policies: []ConsulPolicy{
		{Name: PolicyNomadServer, Description: "steppe: Nomad servers", Rules: nomadServerRules},
		{Name: PolicyNomadClient, Description: "steppe: Nomad clients", Rules: nomadClientRules},
	}}
	tok := func(name, desc string, policies []string, node string) error {
		s, err := st.Token(name)
		if err != nil {
			return err
		}
		t := ConsulToken{Name: name, Description: desc, SecretID: s, Policies: policies}
		if node != "" {
			t.NodeIdentity, t.Datacenter = node, spec.Datacenter
		}
		p.Tokens = append(p.Tokens, t)
		return nil
	}
	for _, m := range ms {
		if err := tok(TokenConsulAgent(m.Name), "steppe: Consul agent "+m.Name, nil, m.Name); err != nil {
			return nil, fmt.Errorf("consul acl plan: %w", err)
		}
		pol := PolicyNomadClient
		if m.Role == RoleServer {
			pol = PolicyNomadServer
		}
		if err := tok(TokenNomadConsul(m.Name), "steppe: Nomad agent "+m.Name, []string{pol}, ""); err != nil {
			return nil, fmt.Errorf("consul acl plan: %w", err)
		}
	}
	return p, nil
}
