package hashi

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/cluster"
)

// Names of what SetupConsulWorkloadIdentity creates in Consul. The auth
// method's name is Nomad's default (consul.service_auth_method and
// task_auth_method), so the Nomad config needs no name.
const (
	ConsulAuthMethod  = "nomad-workloads"
	ConsulAudience    = "consul.io"
	PolicyNomadTasks  = "steppe-nomad-tasks"
	nomadTasksRoleFmt = "nomad-%s-tasks"
)

// nomadTasksRules is what a task's Consul token may do by default:
// discover services and nodes, nothing more.
const nomadTasksRules = `service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
`

// nomadSigningKeys are the IDs of the RS256 keys in Nomad's JWKS (the
// keys that sign workload identities), sorted.
//
// A Nomad leader makes its signing keys moments after it is elected: until
// ctx ends, an answer with no such key (or no answer) is asked again.
func nomadSigningKeys(ctx context.Context, c *nomadapi.Client) ([]string, error) {
	var kids []string
	err := poll(ctx, "nomad jwks", func() (bool, error) {
		var set struct {
			Keys []struct {
				Kid string `json:"kid"`
				Alg string `json:"alg"`
			} `json:"keys"`
		}
		if _, err := c.Raw().Query("/.well-known/jwks.json", &set, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
			return false, err
		}
		kids = nil
		for _, k := range set.Keys {
			if k.Alg == "RS256" {
				kids = append(kids, k.Kid)
			}
		}
		if len(kids) == 0 {
			return false, fmt.Errorf("nomad jwks: no RS256 key among %d", len(set.Keys))
		}
		slices.Sort(kids)
		return true, nil
	})
	return kids, err
}

// SetupConsulWorkloadIdentity lets Nomad workloads log in to Consul with
// their workload identities: a JWT auth method trusting Nomad's signing
// keys, a binding rule that makes a service's identity a Consul service
// identity, and one that gives a task's identity the role
// nomad-<namespace>-tasks (read-only discovery).
//
// The auth method fetches Nomad's JWKS URL (the server nomad talks to,
// https://ADDR:4646/.well-known/jwks.json) trusting the cluster's CA
// (caPEM), not a copy of the keys. Consul keeps the key set it fetched for
// as long as Nomad's Cache-Control says, which Nomad sets to half the time
// left until its next scheduled rotation; Nomad publishes the next key
// before it signs with it (root_key_rotation_threshold), so Consul has it
// in time and a scheduled rotation needs nothing from steppe. A rotation
// with -now signs at once with a key Consul has not fetched: the method's
// description names the key IDs it was set up with, and a run after such a
// rotation (each `up` does one) rewrites it, which makes Consul build its
// validator, and fetch the keys, anew. Nomad's HTTPS API takes requests
// without a client certificate for this (verify_https_client = false;
// ACLs guard the API). The URL names one server: Consul fetches only when
// its copy expires or the method changes. Idempotent.
func SetupConsulWorkloadIdentity(ctx context.Context, consul *consulapi.Client, nomad *nomadapi.Client, caPEM []byte, namespaces []string) error {
	kids, err := nomadSigningKeys(ctx, nomad)
	if err != nil {
		return err
	}
	jwksURL := strings.TrimSuffix(nomad.Address(), "/") + "/.well-known/jwks.json"
	acl := consul.ACL()
	wo := (&consulapi.WriteOptions{}).WithContext(ctx)
	qo := (&consulapi.QueryOptions{}).WithContext(ctx)

	method := &consulapi.ACLAuthMethod{
		Name:          ConsulAuthMethod,
		Type:          "jwt",
		DisplayName:   "Nomad workload identities",
		Description:   "steppe: Nomad workload identities (keys " + strings.Join(kids, ", ") + ")",
		TokenLocality: "local",
		Config: map[string]any{
			"JWKSURL":          jwksURL,
			"JWKSCACert":       string(caPEM),
			"JWTSupportedAlgs": []string{"RS256"}, // Consul 1.14 refuses EdDSA here; Nomad signs with RS256
			"BoundAudiences":   []string{ConsulAudience},
			"ClaimMappings": map[string]string{
				"nomad_namespace": "nomad_namespace",
				"nomad_job_id":    "nomad_job_id",
				"nomad_task":      "nomad_task",
				"nomad_service":   "nomad_service",
			},
		},
	}
	existing, _, err := acl.AuthMethodRead(ConsulAuthMethod, qo)
	if err != nil && statusCode(err) != http.StatusNotFound && !isACLNotFound(err) {
		return fmt.Errorf("consul auth method %s: %w", ConsulAuthMethod, err)
	}
	if existing == nil {
		if _, _, err := acl.AuthMethodCreate(method, wo); err != nil {
			return fmt.Errorf("create consul auth method %s: %w", ConsulAuthMethod, err)
		}
	} else if existing.Description != method.Description || existing.Config["JWKSURL"] != jwksURL || existing.Config["JWKSCACert"] != string(caPEM) || existing.Config["JWTValidationPubKeys"] != nil {
		if _, _, err := acl.AuthMethodUpdate(method, wo); err != nil {
			return fmt.Errorf("update consul auth method %s: %w", ConsulAuthMethod, err)
		}
	}

	tasks := &cluster.ConsulACLPlan{Policies: []cluster.ConsulPolicy{{Name: PolicyNomadTasks, Description: "steppe: Nomad tasks", Rules: nomadTasksRules}}}
	if err := ApplyConsulACL(ctx, consul, tasks); err != nil {
		return err
	}
	for _, ns := range namespaces {
		name := fmt.Sprintf(nomadTasksRoleFmt, ns)
		r, _, err := acl.RoleReadByName(name, qo)
		if err != nil && statusCode(err) != http.StatusNotFound && !isACLNotFound(err) {
			return fmt.Errorf("consul role %s: %w", name, err)
		}
		if r == nil {
			role := &consulapi.ACLRole{Name: name, Description: "steppe: Nomad tasks of namespace " + ns,
				Policies: []*consulapi.ACLRolePolicyLink{{Name: PolicyNomadTasks}}}
			if _, _, err := acl.RoleCreate(role, wo); err != nil {
				return fmt.Errorf("create consul role %s: %w", name, err)
			}
		}
	}

	rules := []*consulapi.ACLBindingRule{
		{Description: "steppe: Nomad services", AuthMethod: ConsulAuthMethod, BindType: consulapi.BindingRuleBindTypeService,
			BindName: "${value.nomad_service}", Selector: `"nomad_service" in value`},
		{Description: "steppe: Nomad tasks", AuthMethod: ConsulAuthMethod, BindType: consulapi.BindingRuleBindTypeRole,
			BindName: "nomad-${value.nomad_namespace}-tasks", Selector: `"nomad_service" not in value`},
	}
	have, _, err := acl.BindingRuleList(ConsulAuthMethod, qo)
	if err != nil {
		return fmt.Errorf("consul binding rules: %w", err)
	}
	for _, want := range rules {
		found := slices.ContainsFunc(have, func(r *consulapi.ACLBindingRule) bool {
			return r.BindType == want.BindType && r.BindName == want.BindName && r.Selector == want.Selector
		})
		if found {
			continue
		}
		if _, _, err := acl.BindingRuleCreate(want, wo); err != nil {
			return fmt.Errorf("create consul binding rule %q: %w", want.BindName, err)
		}
	}
	return nil
}
