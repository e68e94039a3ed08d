package hashi

import (
	"context"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
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

// jwk is the part of a JSON Web Key Nomad publishes that matters here.
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Crv string `json:"crv"`
	N   string `json:"n"`
	E   string `json:"e"`
	X   string `json:"x"`
}

// NomadJWKSPEM reads the public keys Nomad signs workload identities with
// (/.well-known/jwks.json) and returns them as PEM.
//
// A Nomad leader makes its signing keys moments after it is elected: until
// ctx ends, an answer with no key (or no answer) is asked again.
func NomadJWKSPEM(ctx context.Context, c *nomadapi.Client) ([]string, error) {
	var pems []string
	err := poll(ctx, "nomad jwks", func() (bool, error) {
		p, err := nomadJWKSOnce(ctx, c)
		if err != nil {
			return false, err
		}
		pems = p
		return true, nil
	})
	return pems, err
}

// nomadJWKSOnce reads Nomad's public keys once; a key it cannot decode is
// a permanent error.
func nomadJWKSOnce(ctx context.Context, c *nomadapi.Client) ([]string, error) {
	var set struct {
		Keys []jwk `json:"keys"`
	}
	if _, err := c.Raw().Query("/.well-known/jwks.json", &set, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return nil, err
	}
	var pems []string
	for _, k := range set.Keys {
		var pub any
		switch k.Kty {
		case "RSA":
			n, err := base64.RawURLEncoding.DecodeString(k.N)
			if err != nil {
				return nil, permanent(fmt.Errorf("nomad jwks key %s: n: %w", k.Kid, err))
			}
			e, err := base64.RawURLEncoding.DecodeString(k.E)
			if err != nil {
				return nil, permanent(fmt.Errorf("nomad jwks key %s: e: %w", k.Kid, err))
			}
			pub = &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
		case "OKP":
			if k.Crv != "Ed25519" {
				continue
			}
			x, err := base64.RawURLEncoding.DecodeString(k.X)
			if err != nil || len(x) != ed25519.PublicKeySize {
				return nil, permanent(fmt.Errorf("nomad jwks key %s: bad Ed25519 key", k.Kid))
			}
			pub = ed25519.PublicKey(x)
		default:
			continue
		}
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return nil, permanent(fmt.Errorf("nomad jwks key %s: %w", k.Kid, err))
		}
		pems = append(pems, string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})))
	}
	if len(pems) == 0 {
		return nil, fmt.Errorf("nomad jwks: no RSA or Ed25519 key among %d", len(set.Keys))
	}
	slices.Sort(pems)
	return pems, nil
}

// SetupConsulWorkloadIdentity lets Nomad workloads log in to Consul with
// their workload identities: a JWT auth method trusting Nomad's signing
// keys, a binding rule that makes a service's identity a Consul service
// identity, and one that gives a task's identity the role
// nomad-<namespace>-tasks (read-only discovery).
//
// The auth method fetches Nomad's JWKS URL (the server nomad talks to,
// https://ADDR:4646/.well-known/jwks.json) trusting the cluster's CA
// (caPEM), not a copy of the keys: when Nomad rotates its root keys, a
// workload identity signed with a key Consul has not seen makes Consul
// fetch the key set again, so new allocations keep getting tokens. Nomad's
// HTTPS API takes requests without a client certificate for this
// (verify_https_client = false; ACLs guard the API). The URL names one
// server: Consul caches the keys it fetched, so that server being down
// matters only for a key rotated while it is. Idempotent.
func SetupConsulWorkloadIdentity(ctx context.Context, consul *consulapi.Client, nomad *nomadapi.Client, caPEM []byte, namespaces []string) error {
	// Nomad's leader makes its keys moments after its election: wait for
	// them, so that Consul's first fetch finds one.
	if _, err := NomadJWKSPEM(ctx, nomad); err != nil {
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
		Description:   "steppe: Nomad workload identities",
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
	} else if existing.Config["JWKSURL"] != jwksURL || existing.Config["JWKSCACert"] != string(caPEM) || existing.Config["JWTValidationPubKeys"] != nil {
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
