package hashi

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/cluster"
)

// Keyring is what the members of a gossip pool hold: each key with the
// number of members that have it, the primary keys likewise (Consul
// only: Nomad does not say), and how many members were asked. A pool's
// rotation is done when Keys and Primary name only the new key, on every
// member.
type Keyring struct {
	Pool     string         // "lan", "wan" (Consul) or "servers" (Nomad)
	Keys     map[string]int // key -> members holding it
	Primary  map[string]int // key -> members using it (nil: not reported)
	Members  int
	Messages map[string]string // errors of the members that failed
}

// Only says whether every member holds key and no other (and, where
// reported, uses it as primary).
func (k Keyring) Only(key string) bool {
	if len(k.Keys) != 1 || k.Keys[key] != k.Members || k.Members == 0 {
		return false
	}
	return k.Primary == nil || (len(k.Primary) == 1 && k.Primary[key] == k.Members)
}

// rotateGossip is the rotation both daemons support: install the new key
// on every member, make it primary, then remove every other key. Each
// step is idempotent, so a rotation cut short is finished by running it
// again with the same key.
func rotateGossip(ctx context.Context, key cluster.Secret, list func(context.Context) ([]Keyring, error), op func(ctx context.Context, verb, key string) error) ([]Keyring, error) {
	if !cluster.GossipKeyValid(key.Reveal()) {
		return nil, errors.New("gossip key: not base64 of 16, 24 or 32 bytes")
	}
	if err := op(ctx, "install", key.Reveal()); err != nil {
		return nil, err
	}
	if err := op(ctx, "use", key.Reveal()); err != nil {
		return nil, err
	}
	rings, err := list(ctx)
	if err != nil {
		return nil, err
	}
	old := map[string]bool{}
	for _, r := range rings {
		for k := range r.Keys {
			if k != key.Reveal() {
				old[k] = true
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(old)) {
		if err := op(ctx, "remove", k); err != nil {
			return nil, err
		}
	}
	if rings, err = list(ctx); err != nil {
		return nil, err
	}
	for _, r := range rings {
		if !r.Only(key.Reveal()) {
			return rings, fmt.Errorf("gossip pool %s: after the rotation %d of %d members hold the new key and %d keys are installed (%v)", r.Pool, r.Keys[key.Reveal()], r.Members, len(r.Keys), r.Messages)
		}
	}
	return rings, nil
}

// RotateConsulGossip installs key in every Consul agent's keyrings (LAN
// and WAN), makes it the primary key and removes the others, without a
// restart. Consul persists the keyrings in its data directory
// (serf/local.keyring, serf/remote.keyring), which then outweigh the
// config's encrypt key at the next start. c needs a token with
// keyring:write (the management token).
func RotateConsulGossip(ctx context.Context, c *consulapi.Client, key cluster.Secret) ([]Keyring, error) {
	list := func(ctx context.Context) ([]Keyring, error) { return ConsulKeyrings(ctx, c) }
	op := func(ctx context.Context, verb, k string) error {
		wo := (&consulapi.WriteOptions{}).WithContext(ctx)
		var err error
		switch verb {
		case "install":
			err = c.Operator().KeyringInstall(k, wo)
		case "use":
			err = c.Operator().KeyringUse(k, wo)
		case "remove":
			err = c.Operator().KeyringRemove(k, wo)
		}
		if err != nil {
			return fmt.Errorf("consul keyring %s: %w", verb, err)
		}
		return nil
	}
	return rotateGossip(ctx, key, list, op)
}

// ConsulKeyrings lists the gossip keys of every Consul pool.
func ConsulKeyrings(ctx context.Context, c *consulapi.Client) ([]Keyring, error) {
	rs, err := c.Operator().KeyringList((&consulapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("consul keyring list: %w", err)
	}
	out := make([]Keyring, 0, len(rs))
	for _, r := range rs {
		pool := "lan"
		if r.WAN {
			pool = "wan"
		}
		out = append(out, Keyring{Pool: pool, Keys: r.Keys, Primary: r.PrimaryKeys, Members: r.NumNodes, Messages: r.Messages})
	}
	return out, nil
}

// RotateNomadGossip does for the Nomad servers' gossip pool what
// RotateConsulGossip does for Consul's (Nomad clients do not gossip), with
// the agent keyring API of one server, which acts on every member. Nomad
// persists the keyring in server/serf.keyring of its data directory.
func RotateNomadGossip(ctx context.Context, c *nomadapi.Client, key cluster.Secret) ([]Keyring, error) {
	list := func(ctx context.Context) ([]Keyring, error) { return NomadKeyrings(ctx, c) }
	op := func(ctx context.Context, verb, k string) error {
		// What Agent().InstallKey, UseKey and RemoveKey send, with a
		// context (those take none).
		var resp nomadapi.KeyringResponse
		if _, err := c.Raw().Write("/v1/agent/keyring/"+verb, &nomadapi.KeyringRequest{Key: k}, &resp, (&nomadapi.WriteOptions{}).WithContext(ctx)); err != nil {
			return fmt.Errorf("nomad keyring %s: %w", verb, err)
		}
		if len(resp.Messages) > 0 {
			return fmt.Errorf("nomad keyring %s: members failed: %v", verb, resp.Messages)
		}
		return nil
	}
	return rotateGossip(ctx, key, list, op)
}

// NomadKeyrings lists the gossip keys of the Nomad servers.
func NomadKeyrings(ctx context.Context, c *nomadapi.Client) ([]Keyring, error) {
	var r nomadapi.KeyringResponse
	if _, err := c.Raw().Query("/v1/agent/keyring/list", &r, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("nomad keyring list: %w", err)
	}
	return []Keyring{{Pool: "servers", Keys: r.Keys, Members: r.NumNodes, Messages: r.Messages}}, nil
}
