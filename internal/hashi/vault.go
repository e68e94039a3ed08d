package hashi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/steppe/steppe/internal/cluster"
)

// Names of what SetupVault makes in Vault.
const (
	VaultOperatorPolicy  = "steppe-operator"
	VaultWorkloadsPolicy = "nomad-workloads"
	VaultWorkloadsRole   = "nomad-workloads"
	VaultKVPath          = "secret"
)

// vaultOperatorRules is the operator token's policy: everything, as the
// root token could, but the token is periodic, revocable and not root.
const vaultOperatorRules = `path "*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list", "sudo"]
}
`

// vaultWorkloadsRules is HashiCorp's per-job policy for Nomad workloads
// (nomad setup vault): a job reads the KV secrets under its namespace and
// job ID, nothing else. %[1]s is the JWT auth method's accessor.
const vaultWorkloadsRules = `path "secret/data/{{identity.entity.aliases.%[1]s.metadata.nomad_namespace}}/{{identity.entity.aliases.%[1]s.metadata.nomad_job_id}}/*" {
  capabilities = ["read"]
}
path "secret/data/{{identity.entity.aliases.%[1]s.metadata.nomad_namespace}}/{{identity.entity.aliases.%[1]s.metadata.nomad_job_id}}" {
  capabilities = ["read"]
}
path "secret/metadata/{{identity.entity.aliases.%[1]s.metadata.nomad_namespace}}/*" {
  capabilities = ["list"]
}
`

// VaultClient is a Vault API client for the HTTPS address addr
// ("127.0.0.11:8200") trusting the CA of tls, with token ("" for none).
// Nothing is taken from the environment (VAULT_TOKEN, VAULT_ADDR): steppe
// talks to its own cluster with its own token only.
func VaultClient(addr string, tls TLSFiles, token cluster.Secret) (*vaultapi.Client, error) {
	cfg := vaultapi.DefaultConfig()
	cfg.Address = "https://" + addr
	cfg.MaxRetries = 0 // steppe's own loops retry, with their deadlines
	cfg.Timeout = 30 * time.Second
	if err := cfg.ConfigureTLS(&vaultapi.TLSConfig{CACert: tls.CAFile, ClientCert: tls.CertFile, ClientKey: tls.KeyFile}); err != nil {
		return nil, fmt.Errorf("vault client for %s: %w", addr, err)
	}
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("vault client for %s: %w", addr, err)
	}
	c.ClearNamespace()
	c.SetToken(token.Reveal())
	if token == "" {
		c.ClearToken()
	}
	return c, nil
}

// VaultHealth is what one Vault server says of itself (sys/health, which
// needs no token).
type VaultHealth struct {
	Initialized bool   `json:"initialized"`
	Sealed      bool   `json:"sealed"`
	Standby     bool   `json:"standby"`
	Version     string `json:"version"`
}

// GetVaultHealth asks one Vault server how it is.
func GetVaultHealth(ctx context.Context, c *vaultapi.Client) (VaultHealth, error) {
	h, err := c.Sys().HealthWithContext(ctx)
	if err != nil {
		return VaultHealth{}, fmt.Errorf("vault health of %s: %w", c.Address(), err)
	}
	return VaultHealth{Initialized: h.Initialized, Sealed: h.Sealed, Standby: h.Standby, Version: h.Version}, nil
}

// WaitVaultAPI waits until the Vault server answers sys/health.
func WaitVaultAPI(ctx context.Context, c *vaultapi.Client) (VaultHealth, error) {
	var h VaultHealth
	err := poll(ctx, "vault "+c.Address(), func() (bool, error) {
		var err error
		h, err = GetVaultHealth(ctx, c)
		return err == nil, err
	})
	return h, err
}

// InitVault initialises Vault with a Shamir split of shares, threshold of
// them to unseal; recovery is for an auto-unsealing Vault (transit seal),
// whose shares are recovery keys.
func InitVault(ctx context.Context, c *vaultapi.Client, shares, threshold int, recovery bool) (*cluster.VaultInit, error) {
	req := &vaultapi.InitRequest{SecretShares: shares, SecretThreshold: threshold}
	if recovery {
		req = &vaultapi.InitRequest{RecoveryShares: shares, RecoveryThreshold: threshold}
	}
	resp, err := c.Sys().InitWithContext(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("initialise vault on %s: %w", c.Address(), err)
	}
	v := &cluster.VaultInit{RootToken: cluster.Secret(resp.RootToken), Threshold: threshold, Recovery: recovery}
	keys := resp.KeysB64
	if recovery {
		keys = resp.RecoveryKeysB64
	}
	for _, k := range keys {
		v.Keys = append(v.Keys, cluster.Secret(k))
	}
	if len(v.Keys) != shares || resp.RootToken == "" {
		return nil, fmt.Errorf("initialise vault on %s: got %d key shares and a root token of %d bytes, want %d shares", c.Address(), len(v.Keys), len(resp.RootToken), shares)
	}
	return v, nil
}

// ErrVaultKeys is an unseal share the Vault does not accept: the state
// directory's keys are not this Vault's.
var ErrVaultKeys = errors.New("vault refuses the state directory's unseal keys")

// UnsealVault unseals one Vault server with the kept key shares. A Vault
// that joins raft (retry_join) accepts shares only once it has fetched
// the leader's challenge, so "not initialised" is asked again until ctx
// ends. An unseal already in progress (a run cut short) is started anew.
func UnsealVault(ctx context.Context, c *vaultapi.Client, keys []cluster.Secret) error {
	if len(keys) == 0 {
		return errors.New("unseal vault: no key shares")
	}
	return poll(ctx, "unseal vault on "+c.Address(), func() (bool, error) {
		st, err := c.Sys().SealStatusWithContext(ctx)
		if err != nil {
			return false, err
		}
		if !st.Sealed {
			return true, nil
		}
		if st.Progress > 0 {
			if _, err := c.Sys().ResetUnsealProcessWithContext(ctx); err != nil {
				return false, err
			}
		}
		for _, k := range keys {
			st, err = c.Sys().UnsealWithContext(ctx, k.Reveal())
			if err != nil {
				// A wrong share is a 400 ("Unseal failed, invalid key");
				// a server still fetching raft's challenge answers 500s
				// ("invalid key size 0") until it has it: asked again.
				if isVaultStatus(err, http.StatusBadRequest) && (strings.Contains(err.Error(), "invalid key") || strings.Contains(err.Error(), "message authentication failed")) {
					return false, permanent(fmt.Errorf("%w (%v)", ErrVaultKeys, err))
				}
				return false, err
			}
			if !st.Sealed {
				return true, nil
			}
		}
		return false, fmt.Errorf("still sealed after %d shares (threshold %d)", len(keys), st.T)
	})
}

// WaitVaultActive waits until the server c talks to is unsealed and
// active (or a standby, with standbyOK).
func WaitVaultActive(ctx context.Context, c *vaultapi.Client, standbyOK bool) error {
	return poll(ctx, "vault active on "+c.Address(), func() (bool, error) {
		h, err := GetVaultHealth(ctx, c)
		if err != nil {
			return false, err
		}
		if h.Sealed {
			return false, errors.New("sealed")
		}
		if h.Standby && !standbyOK {
			return false, errors.New("standby")
		}
		return true, nil
	})
}

// WaitAnyVaultActive waits until one of the servers is unsealed and
// active, and returns its index in cs.
func WaitAnyVaultActive(ctx context.Context, cs []*vaultapi.Client) (int, error) {
	active := -1
	err := poll(ctx, "an active vault", func() (bool, error) {
		var states []string
		for i, c := range cs {
			h, err := GetVaultHealth(ctx, c)
			switch {
			case err != nil:
				states = append(states, err.Error())
			case !h.Sealed && !h.Standby:
				active = i
				return true, nil
			default:
				states = append(states, fmt.Sprintf("%s sealed=%t standby=%t", c.Address(), h.Sealed, h.Standby))
			}
		}
		return false, errors.New(strings.Join(states, "; "))
	})
	return active, err
}

// VaultRaftServer is one server of Vault's raft, as autopilot sees it.
type VaultRaftServer struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	Status  string `json:"status"` // leader, voter, non-voter
	Healthy bool   `json:"healthy"`
	Version string `json:"version"`
}

// VaultRaft is Vault's autopilot state.
type VaultRaft struct {
	Healthy          bool              `json:"healthy"`
	FailureTolerance int               `json:"failure_tolerance"`
	Leader           string            `json:"leader"`
	Servers          []VaultRaftServer `json:"servers"`
}

// Voters counts the voting servers (the leader is one).
func (r VaultRaft) Voters() int {
	n := 0
	for _, s := range r.Servers {
		if s.Status == "voter" || s.Status == "leader" {
			n++
		}
	}
	return n
}

// GetVaultRaft reads Vault's autopilot state.
func GetVaultRaft(ctx context.Context, c *vaultapi.Client) (VaultRaft, error) {
	st, err := c.Sys().RaftAutopilotStateWithContext(ctx)
	if err != nil {
		return VaultRaft{}, fmt.Errorf("vault raft state: %w", err)
	}
	if st == nil {
		return VaultRaft{}, errors.New("vault raft state: no answer (not raft storage?)")
	}
	r := VaultRaft{Healthy: st.Healthy, FailureTolerance: st.FailureTolerance, Leader: st.Leader}
	for _, s := range st.Servers {
		r.Servers = append(r.Servers, VaultRaftServer{Name: s.Name, Address: s.Address, Status: s.Status, Healthy: s.Healthy, Version: s.Version})
	}
	slices.SortFunc(r.Servers, func(a, b VaultRaftServer) int { return strings.Compare(a.Name, b.Name) })
	return r, nil
}

// vaultStabilization is how long a joining Vault server must be healthy
// before autopilot lets it vote (Vault's default: 10 s). A server of a
// new cluster is stable at once; a flapping one is still held back.
const vaultStabilization = 3 * time.Second

// ConfigureVaultAutopilot makes a dead server stay a failed voter (as for
// Consul and Nomad: min_quorum is the server count, dead servers are not
// cleaned up) and lets a joining server vote after vaultStabilization of
// being stable instead of 10 s.
func ConfigureVaultAutopilot(ctx context.Context, c *vaultapi.Client, servers int) error {
	cfg, err := c.Sys().RaftAutopilotConfigurationWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vault autopilot configuration: %w", err)
	}
	if cfg == nil {
		return errors.New("vault autopilot configuration: no answer")
	}
	if cfg.MinQuorum == uint(servers) && !cfg.CleanupDeadServers && cfg.ServerStabilizationTime == vaultStabilization {
		return nil
	}
	// Only these fields: the client's own put sends every field, and
	// Vault's community edition refuses disable_upgrade_migration.
	if _, err := c.Logical().WriteWithContext(ctx, "sys/storage/raft/autopilot/configuration", map[string]any{
		"min_quorum":                servers,
		"cleanup_dead_servers":      false,
		"server_stabilization_time": vaultStabilization.String(),
	}); err != nil {
		return fmt.Errorf("set vault autopilot configuration: %w", err)
	}
	return nil
}

// WaitVaultVoters waits until Vault's raft has n healthy voters.
func WaitVaultVoters(ctx context.Context, c *vaultapi.Client, n int) (VaultRaft, error) {
	var r VaultRaft
	err := poll(ctx, fmt.Sprintf("vault raft with %d healthy voters", n), func() (bool, error) {
		var err error
		if r, err = GetVaultRaft(ctx, c); err != nil {
			return false, err
		}
		healthy := 0
		for _, s := range r.Servers {
			if (s.Status == "voter" || s.Status == "leader") && s.Healthy {
				healthy++
			}
		}
		if healthy < n {
			var have []string
			for _, s := range r.Servers {
				have = append(have, fmt.Sprintf("%s %s healthy=%t", s.Name, s.Status, s.Healthy))
			}
			return false, fmt.Errorf("%d of %d: %s", healthy, n, strings.Join(have, ", "))
		}
		return true, nil
	})
	return r, err
}

// VaultSetup is what SetupVault makes Vault trust and hold.
type VaultSetup struct {
	// NomadJWKSURL is Nomad's JWKS URL, fetched by Vault with CAPEM.
	NomadJWKSURL string
	CAPEM        []byte
	// OperatorToken is the ID of the operator token to make (when c is
	// root) or that c already is.
	OperatorToken cluster.Secret
}

// SetupVault sets Vault up as steppe's cluster needs it, idempotently:
// the operator policy and token, a KV v2 engine at secret/, and a JWT auth
// method that trusts Nomad's workload identities with a default role whose
// policy lets a job read its own secrets (secret/<namespace>/<job>/...).
// c holds the root token at the first setup (the operator token's ID can
// only be chosen by root) and the operator token after.
func SetupVault(ctx context.Context, c *vaultapi.Client, s VaultSetup) error {
	sys := c.Sys()
	if err := sys.PutPolicyWithContext(ctx, VaultOperatorPolicy, vaultOperatorRules); err != nil {
		return fmt.Errorf("vault policy %s: %w", VaultOperatorPolicy, err)
	}
	if err := ensureVaultOperatorToken(ctx, c, s.OperatorToken); err != nil {
		return err
	}
	mounts, err := sys.ListMountsWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vault mounts: %w", err)
	}
	if m, ok := mounts[VaultKVPath+"/"]; !ok {
		if err := sys.MountWithContext(ctx, VaultKVPath, &vaultapi.MountInput{Type: "kv", Description: "steppe: secrets of Nomad jobs", Options: map[string]string{"version": "2"}}); err != nil {
			return fmt.Errorf("vault mount %s: %w", VaultKVPath, err)
		}
	} else if m.Type != "kv" {
		return fmt.Errorf("vault: %s/ is a %s engine, not kv: steppe's jobs read their secrets there; move it", VaultKVPath, m.Type)
	}
	auths, err := sys.ListAuthWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vault auth methods: %w", err)
	}
	am, ok := auths[cluster.VaultJWTPath+"/"]
	if !ok {
		if err := sys.EnableAuthWithOptionsWithContext(ctx, cluster.VaultJWTPath, &vaultapi.EnableAuthOptions{Type: "jwt", Description: "steppe: Nomad workload identities"}); err != nil {
			return fmt.Errorf("vault auth method %s: %w", cluster.VaultJWTPath, err)
		}
		if auths, err = sys.ListAuthWithContext(ctx); err != nil {
			return fmt.Errorf("vault auth methods: %w", err)
		}
		am = auths[cluster.VaultJWTPath+"/"]
	}
	if am == nil || am.Type != "jwt" {
		return fmt.Errorf("vault: %s/ is not a jwt auth method: Nomad's workloads log in there; move it", cluster.VaultJWTPath)
	}
	logical := c.Logical()
	if _, err := logical.WriteWithContext(ctx, "auth/"+cluster.VaultJWTPath+"/config", map[string]any{
		"jwks_url":    s.NomadJWKSURL,
		"jwks_ca_pem": string(s.CAPEM),
		// Nomad signs workload identities with RS256 (and EdDSA keys
		// from 1.9 on).
		"jwt_supported_algs": []string{"RS256", "EdDSA"},
		"default_role":       VaultWorkloadsRole,
	}); err != nil {
		return fmt.Errorf("vault auth method %s config: %w", cluster.VaultJWTPath, err)
	}
	if err := sys.PutPolicyWithContext(ctx, VaultWorkloadsPolicy, fmt.Sprintf(vaultWorkloadsRules, am.Accessor)); err != nil {
		return fmt.Errorf("vault policy %s: %w", VaultWorkloadsPolicy, err)
	}
	if _, err := logical.WriteWithContext(ctx, "auth/"+cluster.VaultJWTPath+"/role/"+VaultWorkloadsRole, map[string]any{
		"role_type":               "jwt",
		"bound_audiences":         []string{cluster.VaultAudience},
		"user_claim":              "/nomad_job_id",
		"user_claim_json_pointer": true,
		"claim_mappings": map[string]string{
			"nomad_namespace": "nomad_namespace",
			"nomad_job_id":    "nomad_job_id",
			"nomad_task":      "nomad_task",
		},
		"token_type":             "service",
		"token_policies":         []string{VaultWorkloadsPolicy},
		"token_period":           "30m",
		"token_explicit_max_ttl": 0,
	}); err != nil {
		return fmt.Errorf("vault role %s: %w", VaultWorkloadsRole, err)
	}
	return nil
}

// ensureVaultOperatorToken makes the operator token (an orphan periodic
// token of the operator policy, renewed by each steppe run that uses it)
// with the ID chosen in the state directory, unless it exists.
func ensureVaultOperatorToken(ctx context.Context, c *vaultapi.Client, id cluster.Secret) error {
	if id == "" {
		return errors.New("vault operator token: no ID")
	}
	if c.Token() == id.Reveal() {
		return nil
	}
	if _, err := c.Auth().Token().LookupWithContext(ctx, id.Reveal()); err == nil {
		return nil
	} else if !isVaultStatus(err, http.StatusForbidden, http.StatusBadRequest, http.StatusNotFound) {
		return fmt.Errorf("vault operator token: %w", err)
	}
	_, err := c.Auth().Token().CreateOrphanWithContext(ctx, &vaultapi.TokenCreateRequest{
		ID:          id.Reveal(),
		Policies:    []string{VaultOperatorPolicy},
		Period:      "768h",
		DisplayName: "steppe-operator",
	})
	if err != nil {
		return fmt.Errorf("create vault operator token: %w", err)
	}
	return nil
}

// RenewVaultToken renews the periodic token c holds.
func RenewVaultToken(ctx context.Context, c *vaultapi.Client) error {
	if _, err := c.Auth().Token().RenewSelfWithContext(ctx, 0); err != nil {
		return fmt.Errorf("renew vault token: %w", err)
	}
	return nil
}

// RevokeVaultRoot revokes the token c holds (the root token once the
// operator token exists). A token already gone counts as revoked.
func RevokeVaultRoot(ctx context.Context, c *vaultapi.Client) error {
	if err := c.Auth().Token().RevokeSelfWithContext(ctx, ""); err != nil && !isVaultStatus(err, http.StatusForbidden) {
		return fmt.Errorf("revoke vault root token: %w", err)
	}
	return nil
}

// VaultTokenValid says whether c's token is accepted.
func VaultTokenValid(ctx context.Context, c *vaultapi.Client) (bool, error) {
	_, err := c.Auth().Token().LookupSelfWithContext(ctx)
	if err == nil {
		return true, nil
	}
	if isVaultStatus(err, http.StatusForbidden) {
		return false, nil
	}
	return false, err
}

func isVaultStatus(err error, codes ...int) bool {
	var re *vaultapi.ResponseError
	return errors.As(err, &re) && slices.Contains(codes, re.StatusCode)
}
