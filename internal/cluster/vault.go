package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
)

// Tokens of Vault kept in the state directory (see State.Token).
const (
	// TokenVaultOperator is steppe's and the operator's Vault token
	// (admin policy, periodic): chosen before it exists, so a crash
	// between creating it and keeping it cannot lose it.
	TokenVaultOperator = "vault/operator"
	// TokenVaultTransit is the token of the other Vault that holds the
	// transit seal's key (copied from the spec's token_file).
	TokenVaultTransit = "vault/transit"
)

// Files of Vault's initialisation in the state directory.
const (
	vaultInitFile    = "vault/init.json"
	vaultPendingFile = "vault/init.pending"
	vaultTransitCA   = "vault/transit-ca.pem"
	// SecretVaultTransitCA is the transit Vault's CA on a server.
	SecretVaultTransitCA = "vault-transit-ca.pem"
)

// VaultInit is what Vault's initialisation returned: the unseal key
// shares (or, with an auto-unseal, the recovery shares) and the root
// token, and how far steppe's setup went with them.
type VaultInit struct {
	Keys      []Secret
	Recovery  bool // Keys are recovery keys (transit seal): they do not unseal
	RootToken Secret
	Threshold int
	// RootRevoked is set once the root token is revoked in favour of
	// the operator token.
	RootRevoked bool
}

type vaultInitFileJSON struct {
	Keys        []string `json:"keys_b64"`
	Recovery    bool     `json:"recovery,omitempty"`
	RootToken   string   `json:"root_token"`
	Threshold   int      `json:"threshold"`
	RootRevoked bool     `json:"root_revoked,omitempty"`
}

// VaultInit returns the kept initialisation, or nil when Vault was never
// initialised by steppe.
func (s *State) VaultInit() (*VaultInit, error) {
	b, err := readPrivate(filepath.Join(s.dir, vaultInitFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("vault init: %w", err)
	}
	var f vaultInitFileJSON
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("vault init %s: %w", filepath.Join(s.dir, vaultInitFile), err)
	}
	v := &VaultInit{Recovery: f.Recovery, RootToken: Secret(f.RootToken), Threshold: f.Threshold, RootRevoked: f.RootRevoked}
	for _, k := range f.Keys {
		v.Keys = append(v.Keys, Secret(k))
	}
	return v, nil
}

// SaveVaultInit keeps v (0600) and clears the pending mark.
func (s *State) SaveVaultInit(v *VaultInit) error {
	f := vaultInitFileJSON{Recovery: v.Recovery, RootToken: v.RootToken.Reveal(), Threshold: v.Threshold, RootRevoked: v.RootRevoked}
	for _, k := range v.Keys {
		f.Keys = append(f.Keys, k.Reveal())
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("vault init: %w", err)
	}
	return s.locked(func() error {
		if err := writeFile(filepath.Join(s.dir, vaultInitFile), append(b, '\n')); err != nil {
			return err
		}
		if err := os.Remove(filepath.Join(s.dir, vaultPendingFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("vault init: %w", err)
		}
		return nil
	})
}

// MarkVaultInitPending records that an initialisation is about to be
// asked for, so that a later run finding Vault initialised without the
// keys knows it was steppe's own, killed before it kept them.
func (s *State) MarkVaultInitPending(server string) error {
	return writeFile(filepath.Join(s.dir, vaultPendingFile), []byte(server+"\n"))
}

// VaultInitPending says whether an initialisation was asked for and its
// answer not kept.
func (s *State) VaultInitPending() bool {
	_, err := os.Stat(filepath.Join(s.dir, vaultPendingFile))
	return err == nil
}

// SetVaultTransitCA keeps the transit Vault's CA (nil: none).
func (s *State) SetVaultTransitCA(pem []byte) error {
	p := filepath.Join(s.dir, vaultTransitCA)
	if pem == nil {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}
	return writeFile(p, pem)
}

func (s *State) vaultTransitCA() ([]byte, error) {
	b, err := readPrivate(filepath.Join(s.dir, vaultTransitCA))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

// vaultSecretFiles are a server's Vault secrets: the secret part of its
// config (the transit seal and its token; an empty object without one)
// and the transit Vault's CA.
func vaultSecretFiles(spec *Spec, st *State, secretsDir string) (map[string][]byte, error) {
	cfg := map[string]any{}
	out := map[string][]byte{}
	if t := spec.Vault.Transit; t != nil {
		tok, ok := st.LookupToken(TokenVaultTransit)
		if !ok {
			return nil, errors.New("vault transit seal: no token in the state directory (run steppe up -spec with the spec and its token_file)")
		}
		seal := map[string]any{
			"address":    t.Address,
			"key_name":   t.KeyName,
			"mount_path": t.MountPath,
			"token":      tok.Reveal(),
		}
		ca, err := st.vaultTransitCA()
		if err != nil {
			return nil, fmt.Errorf("vault transit seal CA: %w", err)
		}
		if ca != nil {
			out[SecretVaultTransitCA] = slices.Clone(ca)
			seal["tls_ca_cert"] = path.Join(secretsDir, SecretVaultTransitCA)
		}
		cfg["seal"] = map[string]any{"transit": seal}
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, err
	}
	out[SecretVaultConfig] = append(b, '\n')
	return out, nil
}

// VaultCLIEnv points the vault CLI at vaultAddr (host:port of an HTTPS
// API) with the operator token (never the root token), for the
// operator's own shell as CLIEnv.
func VaultCLIEnv(st *State, vaultAddr string) []string {
	env := []string{"VAULT_ADDR=https://" + vaultAddr, "VAULT_CACERT=" + st.CAFile()}
	if t, ok := st.LookupToken(TokenVaultOperator); ok {
		env = append(env, "VAULT_TOKEN="+t.Reveal())
	}
	return env
}
