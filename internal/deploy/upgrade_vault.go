package deploy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
)

// Vault implements upgrade.APIs with the operator token, one client per
// address.
func (o *fleetOps) Vault(addr string) (*vaultapi.Client, error) {
	return o.clients().Vault(addr)
}

func (m mgmtAPIs) Vault(addr string) (*vaultapi.Client, error) {
	tok, err := m.o.st.Token(cluster.TokenVaultOperator)
	if err != nil {
		return nil, err
	}
	return hashi.VaultClient(net.JoinHostPort(addr, strconv.Itoa(cluster.VaultAPIPort)), m.o.opFiles, tok)
}

// Unseal implements upgrade.Unsealer: the Vault at addr, restarted by the
// upgrade, is unsealed with the key shares of the state directory (or
// waited for, when its transit seal unseals it).
func (o *fleetOps) Unseal(ctx context.Context, machine, addr string) error {
	init, err := o.st.VaultInit()
	if err != nil {
		return err
	}
	if init == nil {
		return fmt.Errorf("vault on %s: never initialised from %s: run steppe up", machine, o.stateDir)
	}
	c, err := hashi.VaultClient(net.JoinHostPort(addr, strconv.Itoa(cluster.VaultAPIPort)), o.opFiles, "")
	if err != nil {
		return err
	}
	h, err := hashi.WaitVaultAPI(ctx, c)
	if err != nil {
		return fmt.Errorf("vault on %s: %w", machine, err)
	}
	if h.Sealed && !init.Recovery {
		if err := hashi.UnsealVault(ctx, c, init.Keys); err != nil {
			if errors.Is(err, hashi.ErrVaultKeys) {
				return fmt.Errorf("vault on %s: %w: it is not the Vault %s initialised", machine, err, filepath.Join(o.stateDir, "vault", "init.json"))
			}
			return fmt.Errorf("vault on %s: %w", machine, err)
		}
	}
	if err := hashi.WaitVaultActive(ctx, c, true); err != nil {
		return fmt.Errorf("vault on %s: %w", machine, err)
	}
	return nil
}
