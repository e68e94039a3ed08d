// Package provider makes, finds and removes the machines of a cluster. Every
// provider (local, and later netns, ssh, clouds) answers the same small
// interface; a machine is whatever runs one `steppe agent`.
package provider

import (
	"context"
	"time"

	"github.com/steppe/steppe/internal/cluster"
)

// Provider creates, lists and destroys the machines of one cluster.
type Provider interface {
	// List returns the machines that exist, running or not, by name.
	List(ctx context.Context) ([]Machine, error)
	// Create makes machine req.Machine exist with its secrets delivered
	// and its agent running. A machine that exists and runs is left as it
	// is (its secrets are delivered again when they changed): Create is
	// idempotent.
	Create(ctx context.Context, req CreateRequest) (Machine, error)
	// Deliver writes the machine's secrets directory (0700, files 0600)
	// and says whether anything in it changed.
	Deliver(ctx context.Context, m Machine, files map[string][]byte) (bool, error)
	// Destroy stops the machine's agent and everything it ran, and removes
	// every process, cgroup, mount and file of the machine.
	Destroy(ctx context.Context, name string) error
}

// Machine is a machine as its provider knows it.
type Machine struct {
	Name    string       `json:"name"`
	Role    cluster.Role `json:"role"`
	Pool    string       `json:"pool,omitempty"`
	Address string       `json:"address"`
	// Dir is where the provider keeps the machine (local: its whole disk).
	Dir string `json:"dir,omitempty"`
	// Socket is the agent's local API socket, where the operator can reach
	// it (local only; "" where it cannot).
	Socket string `json:"socket,omitempty"`
	// Log is the agent's own log file.
	Log string `json:"log,omitempty"`
	// PID is the agent's process id when it runs, else 0.
	PID     int       `json:"pid,omitempty"`
	Running bool      `json:"running"`
	Created time.Time `json:"created"`
	// SecretsChanged says that Create delivered secrets that differ from
	// what a running machine had: its daemons must restart to read them.
	SecretsChanged bool `json:"-"`
}

// Cluster returns the machine as planning sees it.
func (m Machine) Cluster() cluster.Machine {
	return cluster.Machine{Name: m.Name, Role: m.Role, Pool: m.Pool, Address: m.Address}
}

// CreateRequest is one machine to create.
type CreateRequest struct {
	// Machine is the machine to make; an empty Address is assigned by
	// the provider.
	Machine cluster.Machine
	Agent   AgentConfig
	// Secrets returns the files of the machine's secrets directory, once
	// its address is known (certificates name it). secretsDir is where
	// they will be on the machine.
	Secrets func(m cluster.Machine, secretsDir string) (map[string][]byte, error)
}

// AgentConfig is what a machine's agent needs to pull its role's bundles.
type AgentConfig struct {
	Cluster    string
	Region     string
	Datacenter string
	// BundleRole is the role the machine pulls bundles of
	// (cluster.RoleName).
	BundleRole string
	// BundleStore is a directory or the URL of a bundle server.
	BundleStore string
	// BundleKeys are files of Ed25519 public keys trusted to sign bundles.
	BundleKeys []string
	// ArtifactKeys are files of armored OpenPGP keys trusted to sign the
	// artifact store's SHA256SUMS.
	ArtifactKeys []string
	// HealthTimeout bounds each release's health gate on the machine.
	HealthTimeout time.Duration
	// MinBundleVersion is the lowest bundle version the machine may
	// accept: the version its first bundle will have (0: any).
	MinBundleVersion uint64
}
