package upgrade

import (
	"context"
	"errors"
	"fmt"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/steppe/steppe/internal/hashi"
)

// Unsealer unseals a Vault server that an upgrade restarted: a restarted
// Vault comes back sealed, and only the operator's keys (or its transit
// seal) open it. The deploy side implements it with the keys in the
// operator's state directory.
type Unsealer interface {
	// Unseal returns once the Vault server at addr answers unsealed,
	// unsealing it if it is sealed.
	Unseal(ctx context.Context, machine, addr string) error
}

// settler is a product whose restarted server needs a step of steppe's
// before the gate can judge it.
type settler interface {
	settle(ctx context.Context, s Step) error
}

// vaultProduct upgrades Vault's raft servers: standbys first (a standby
// is a non-leader to next), each unsealed after its restart and gated on
// autopilot like Consul and Nomad; the active node last, stepped down
// first so that an upgraded standby takes over before it restarts.
type vaultProduct struct{ u *Upgrader }

func (p *vaultProduct) name() string { return Vault }

func (p *vaultProduct) health(ctx context.Context, except string) (h hashi.ClusterHealth, err error) {
	err = anyServer(ctx, p.u, except, p.u.cfg.APIs.Vault, queryLimit, func(ctx context.Context, c *vaultapi.Client) error {
		h, err = hashi.VaultAutopilotHealth(ctx, c)
		return err
	})
	return h, err
}

func (p *vaultProduct) members(ctx context.Context, except string) (ms []hashi.Member, err error) {
	err = anyServer(ctx, p.u, except, p.u.cfg.APIs.Vault, queryLimit, func(ctx context.Context, c *vaultapi.Client) error {
		ms, err = hashi.VaultServerVersions(ctx, c)
		return err
	})
	return ms, err
}

// Vault cannot hand over to a chosen server, but step-down makes a
// standby take over; next orders the active node last, so every standby
// then runs the target.
func (p *vaultProduct) canTransfer() bool { return true }

// transfer steps the active node down and waits until another server is
// active (Vault's own election takes about a second).
func (p *vaultProduct) transfer(ctx context.Context, _, except string) error {
	h, err := p.health(ctx, except)
	if err != nil {
		return err
	}
	l, ok := h.Leader()
	if !ok {
		return errors.New("vault has no active node to step down")
	}
	c, err := p.u.cfg.APIs.Vault(l.Host())
	if err != nil {
		return err
	}
	if err := hashi.VaultStepDown(ctx, c); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		if h, err := p.health(ctx, ""); err == nil {
			if nl, ok := h.Leader(); ok && nl.Host() != l.Host() {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vault: no other server became active within a minute of %s stepping down", l.Name)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// snapshot is taken from the active node: it holds the latest state and
// streams it itself.
func (p *vaultProduct) snapshot(ctx context.Context, path string) (hashi.SnapshotInfo, error) {
	h, err := p.health(ctx, "")
	if err != nil {
		return hashi.SnapshotInfo{}, err
	}
	l, ok := h.Leader()
	if !ok {
		return hashi.SnapshotInfo{}, errors.New("vault snapshot: no active node")
	}
	c, err := p.u.cfg.APIs.Vault(l.Host())
	if err != nil {
		return hashi.SnapshotInfo{}, err
	}
	return hashi.SaveVaultSnapshot(ctx, c, path)
}

// ping asks the server itself: initialised, unsealed, and knowing the
// active node (itself or another).
func (p *vaultProduct) ping(ctx context.Context, addr string) error {
	c, err := p.u.cfg.APIs.Vault(addr)
	if err != nil {
		return err
	}
	h, err := hashi.GetVaultHealth(ctx, c)
	switch {
	case err != nil:
		return err
	case !h.Initialized:
		return errors.New("not initialised")
	case h.Sealed:
		return errors.New("sealed: unseal it with `steppe vault unseal` (or `steppe up`)")
	case !h.Standby:
		return nil
	}
	l, err := c.Sys().LeaderWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vault leader: %w", err)
	}
	if l.LeaderAddress == "" {
		return errors.New("it knows no active node")
	}
	return nil
}

func (p *vaultProduct) settle(ctx context.Context, s Step) error {
	if p.u.cfg.Unsealer == nil {
		return errors.New("vault: the upgrade has no unsealer")
	}
	return p.u.cfg.Unsealer.Unseal(ctx, s.Machine, s.Address)
}
