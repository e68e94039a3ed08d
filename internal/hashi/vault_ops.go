package hashi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
)

// VaultAutopilotHealth reads Vault's raft autopilot state as the same
// ClusterHealth Consul's and Nomad's autopilot give: the active node is
// the leader, a sealed or dead server is unhealthy. A standby forwards
// the request to the active node.
func VaultAutopilotHealth(ctx context.Context, c *vaultapi.Client) (ClusterHealth, error) {
	st, err := c.Sys().RaftAutopilotStateWithContext(ctx)
	if err != nil {
		return ClusterHealth{}, fmt.Errorf("vault autopilot state: %w", err)
	}
	if st == nil {
		return ClusterHealth{}, errors.New("vault autopilot state: no answer (not raft storage?)")
	}
	h := ClusterHealth{Healthy: st.Healthy, FailureTolerance: st.FailureTolerance}
	for _, s := range st.Servers {
		since, _ := time.Parse(time.RFC3339Nano, s.StableSince)
		h.Servers = append(h.Servers, ServerHealth{
			ID: s.ID, Name: s.Name, Address: s.Address, Version: s.Version,
			Leader: s.Status == "leader", Voter: s.Status == "leader" || s.Status == "voter",
			Healthy: s.Healthy, SerfStatus: s.NodeStatus,
			LastIndex: s.LastIndex, LastTerm: s.LastTerm, StableSince: since,
		})
	}
	slices.SortFunc(h.Servers, func(a, b ServerHealth) int { return strings.Compare(a.Name, b.Name) })
	return h, nil
}

// VaultServerVersions lists Vault's raft servers as members with the
// version each reports. Vault has no gossip: a server is alive when the
// active node hears from it (autopilot's node status), and a sealed one
// reports no version until it is unsealed.
func VaultServerVersions(ctx context.Context, c *vaultapi.Client) ([]Member, error) {
	st, err := c.Sys().RaftAutopilotStateWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("vault servers: %w", err)
	}
	if st == nil {
		return nil, errors.New("vault servers: no autopilot state (not raft storage?)")
	}
	out := make([]Member, 0, len(st.Servers))
	for _, s := range st.Servers {
		host, _, err := net.SplitHostPort(s.Address)
		if err != nil {
			host = s.Address
		}
		out = append(out, Member{Name: s.Name, Addr: host, Server: true,
			Alive: s.NodeStatus == "alive", Status: s.NodeStatus, Version: strings.TrimPrefix(s.Version, "v")})
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// SaveVaultSnapshot saves a raft snapshot of Vault (sys/storage/raft/snapshot)
// to path, checked before it takes that name, 0600.
func SaveVaultSnapshot(ctx context.Context, c *vaultapi.Client, path string) (SnapshotInfo, error) {
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(c.Sys().RaftSnapshotWithContext(ctx, pw))
	}()
	info, err := saveSnapshot(pr, path)
	pr.CloseWithError(err)
	if err != nil {
		return info, fmt.Errorf("vault snapshot: %w", err)
	}
	return info, nil
}

// VaultStepDown makes the active Vault behind c give up being active: a
// standby takes over.
func VaultStepDown(ctx context.Context, c *vaultapi.Client) error {
	if err := c.Sys().StepDownWithContext(ctx); err != nil {
		return fmt.Errorf("vault step-down of %s: %w", c.Address(), err)
	}
	return nil
}
