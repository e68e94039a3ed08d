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
	PolicyDNS         = "steppe-dns"
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
	// Anonymous are the policies of Consul's anonymous token, which
	// answers every request that carries no token, DNS queries included;
	// nil leaves the token as it is (a plan of only some policies).
	Anonymous []string
}

// Policies from Nomad's "Integrate Consul ACL" guide, narrowed: agents
// read what they discover, clients write only services (registration of
// workloads), servers also write mesh config entries (Connect gateways).
// No acl = "write": with workload identity (DESIGN: decision 13) Consul
// mints the workloads' tokens through its auth method, and only the
// deprecated service-identity-token flow needed Nomad servers to manage
// ACLs.
const (
	nomadServerRules = `agent_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "write" }
mesh = "write"
`
	nomadClientRules = `agent_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "write" }
`
	// dnsRules are what Consul's DNS interface needs and nothing else:
	// HashiCorp's guidance before Consul 1.17 (which adds acl.tokens.dns)
	// is a DNS-read policy on the anonymous or the default token. steppe
	// gives it to the anonymous token (see DESIGN: decision 12): one
	// cluster-wide place, no token in any machine's files. Over HTTPS the
	// same reads (catalog services and nodes, prepared queries) are then
	// open to any client holding a certificate of the cluster's CA, which
	// the HTTPS API demands; nothing is writable and no KV, ACL or agent
	// endpoint opens.
	dnsRules = `node_prefix "" { policy = "read" }
service_prefix "" { policy = "read" }
query_prefix "" { policy = "read" }
`
)

// ConsulACL plans the Consul policies and tokens of the machines ms. The
// token secrets come from the state directory, created when absent, so the
// same secrets the machines were given are the ones registered.
func ConsulACL(spec *Spec, st *State, ms []Machine) (*ConsulACLPlan, error) {
	p := &ConsulACLPlan{Policies: []ConsulPolicy{
		{Name: PolicyNomadServer, Description: "steppe: Nomad servers", Rules: nomadServerRules},
		{Name: PolicyNomadClient, Description: "steppe: Nomad clients", Rules: nomadClientRules},
		{Name: PolicyDNS, Description: "steppe: DNS (read services, nodes and prepared queries)", Rules: dnsRules},
	}, Anonymous: []string{PolicyDNS}}
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
