package upgrade

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/hashi"
)

// A GuideNote is a version-specific step of a HashiCorp upgrade guide
// ("upgrade-specific" pages), for upgrades that install Release for the
// first time.
type GuideNote struct {
	Product string // "consul", "nomad"
	Release string // the release whose notes these are
	Title   string
	URL     string
	// Check verifies that the cluster is ready, or says why not. Nil for
	// a note steppe cannot check: it is reported, not enforced.
	Check func(ctx context.Context, env GuideEnv) error
}

// GuideEnv is what the checks of GuideNotes read: management clients.
type GuideEnv struct {
	Consul *consulapi.Client
	// NomadServers is a client of every Nomad server: some checks read
	// each server's own configuration.
	NomadServers []*nomadapi.Client
}

// GuideNotes lists the notes steppe knows, oldest release first.
func GuideNotes() []GuideNote {
	return []GuideNote{
		{
			Product: "consul", Release: "1.14.0",
			Title: "gRPC: ports.grpc no longer serves TLS; agents that serve gRPC over TLS (Envoy, consul-dataplane) must use ports.grpc_tls",
			URL:   "https://developer.hashicorp.com/consul/docs/upgrading/upgrade-specific#consul-1-14-x",
		},
		{
			Product: "nomad", Release: "1.10.0",
			Title: "Consul integration: the token-based workflow is removed; Nomad servers must sign workload identities for services and tasks, and Consul must have the JWT auth method that accepts them",
			URL:   "https://developer.hashicorp.com/nomad/docs/upgrade/upgrade-specific#nomad-1-10-0",
			Check: checkConsulWorkloadIdentity,
		},
		{
			Product: "nomad", Release: "1.10.0",
			Title: "Vault integration: the token-based workflow is removed; servers need vault.default_identity, no vault.token, and no job, node or Vault token may still use the legacy flow",
			URL:   "https://developer.hashicorp.com/nomad/docs/upgrade/upgrade-specific#nomad-1-10-0",
			Check: checkVaultWorkloadIdentity,
		},
	}
}

// GuideResult is one note that applies to an upgrade.
type GuideResult struct {
	Note    GuideNote
	Checked bool  // false: reported only
	Err     error // why the cluster is not ready; nil when ready
}

// CheckGuides runs the notes of the releases an upgrade of product from →
// to crosses. It returns every note that applies and an error naming
// each failed check.
func CheckGuides(ctx context.Context, env GuideEnv, product, from, to string) ([]GuideResult, error) {
	var out []GuideResult
	var errs []error
	for _, n := range GuideNotes() {
		if n.Product != product {
			continue
		}
		ok, err := crosses(from, to, n.Release)
		if err != nil {
			return nil, fmt.Errorf("upgrade guide %s %s: %w", product, n.Release, err)
		}
		if !ok {
			continue
		}
		r := GuideResult{Note: n}
		if n.Check != nil {
			r.Checked = true
			r.Err = n.Check(ctx, env)
			if r.Err != nil {
				errs = append(errs, fmt.Errorf("%s %s upgrade guide (%s): %s: %w", product, n.Release, n.URL, n.Title, r.Err))
			}
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// nomadSelf is the part of /v1/agent/self the checks read.
type nomadSelf struct {
	Config struct {
		Name    string
		Consuls []struct {
			Name                      string
			ServiceIdentity           map[string]any
			TaskIdentity              map[string]any
			ServiceIdentityAuthMethod string
		}
		Vaults []struct {
			Name            string
			Enabled         *bool
			Token           string
			DefaultIdentity map[string]any
		}
	} `json:"config"`
}

func readSelf(ctx context.Context, c *nomadapi.Client) (nomadSelf, error) {
	var s nomadSelf
	if _, err := c.Raw().Query("/v1/agent/self", &s, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return s, fmt.Errorf("nomad agent self at %s: %w", c.Address(), err)
	}
	return s, nil
}

func checkConsulWorkloadIdentity(ctx context.Context, env GuideEnv) error {
	if len(env.NomadServers) == 0 || env.Consul == nil {
		return errors.New("no Nomad servers or Consul to check")
	}
	var problems []string
	methods := map[string]bool{}
	for _, c := range env.NomadServers {
		s, err := readSelf(ctx, c)
		if err != nil {
			return err
		}
		for _, cc := range s.Config.Consuls {
			if cc.ServiceIdentity == nil {
				problems = append(problems, fmt.Sprintf("server %s: consul %q has no service_identity", s.Config.Name, cc.Name))
			}
			if cc.TaskIdentity == nil {
				problems = append(problems, fmt.Sprintf("server %s: consul %q has no task_identity", s.Config.Name, cc.Name))
			}
			m := cc.ServiceIdentityAuthMethod
			if m == "" {
				m = hashi.ConsulAuthMethod // Nomad's default name
			}
			methods[m] = true
		}
	}
	for m := range methods {
		am, _, err := env.Consul.ACL().AuthMethodRead(m, (&consulapi.QueryOptions{}).WithContext(ctx))
		var se consulapi.StatusError
		switch {
		case err != nil && !(errors.As(err, &se) && se.Code == http.StatusNotFound):
			return fmt.Errorf("consul auth method %s: %w", m, err)
		case am == nil:
			problems = append(problems, fmt.Sprintf("consul has no auth method %q for Nomad workload identities (steppe up sets it up)", m))
		case am.Type != "jwt":
			problems = append(problems, fmt.Sprintf("consul auth method %q is of type %s, not jwt", m, am.Type))
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

func checkVaultWorkloadIdentity(ctx context.Context, env GuideEnv) error {
	if len(env.NomadServers) == 0 {
		return errors.New("no Nomad servers to check")
	}
	var problems []string
	enabled := false
	for _, c := range env.NomadServers {
		s, err := readSelf(ctx, c)
		if err != nil {
			return err
		}
		for _, v := range s.Config.Vaults {
			if v.Enabled == nil || !*v.Enabled {
				continue
			}
			enabled = true
			if v.Token != "" {
				problems = append(problems, fmt.Sprintf("server %s: vault %q has a token (the legacy workflow)", s.Config.Name, v.Name))
			}
			if v.DefaultIdentity == nil {
				problems = append(problems, fmt.Sprintf("server %s: vault %q has no default_identity", s.Config.Name, v.Name))
			}
		}
	}
	if !enabled {
		return nil
	}
	r, _, err := env.NomadServers[0].Operator().UpgradeCheckVaultWorkloadIdentity((&nomadapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("nomad vault workload identity upgrade check: %w", err)
	}
	if n := len(r.JobsWithoutVaultIdentity); n > 0 {
		problems = append(problems, fmt.Sprintf("%d jobs use Vault without an identity", n))
	}
	if n := len(r.OutdatedNodes); n > 0 {
		problems = append(problems, fmt.Sprintf("%d client nodes are too old for Vault workload identities", n))
	}
	if n := len(r.VaultTokens); n > 0 {
		problems = append(problems, fmt.Sprintf("%d Vault tokens of the legacy workflow are in use", n))
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}
