package hashi

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/atomicfile"
)

// ServerHealth is one server as autopilot reports it, the same for Consul
// and Nomad.
type ServerHealth struct {
	ID          string
	Name        string
	Address     string // host:port of its raft (RPC) listener
	Version     string
	Leader      bool
	Voter       bool
	Healthy     bool
	SerfStatus  string
	LastIndex   uint64
	LastTerm    uint64
	StableSince time.Time
}

// Host is the server's address without the port: the machine's address.
func (s ServerHealth) Host() string {
	h, _, err := net.SplitHostPort(s.Address)
	if err != nil {
		return s.Address
	}
	return h
}

// ClusterHealth is autopilot's view of the servers, leader's copy.
type ClusterHealth struct {
	Healthy          bool
	FailureTolerance int
	Servers          []ServerHealth // sorted by name
}

// Leader is the server autopilot reports as leader.
func (h ClusterHealth) Leader() (ServerHealth, bool) {
	for _, s := range h.Servers {
		if s.Leader {
			return s, true
		}
	}
	return ServerHealth{}, false
}

// ByHost finds the server at the machine address host.
func (h ClusterHealth) ByHost(host string) (ServerHealth, bool) {
	for _, s := range h.Servers {
		if s.Host() == host {
			return s, true
		}
	}
	return ServerHealth{}, false
}

// Problems says what keeps the cluster of want servers from being fit to
// lose one: not healthy, a server missing, unhealthy or not a voter, no
// leader. Empty when fit.
func (h ClusterHealth) Problems(want int) []string {
	var p []string
	if !h.Healthy {
		p = append(p, "autopilot reports the cluster unhealthy")
	}
	if len(h.Servers) != want {
		p = append(p, fmt.Sprintf("%d servers in the raft configuration, want %d", len(h.Servers), want))
	}
	for _, s := range h.Servers {
		switch {
		case !s.Healthy && s.SerfStatus == "alive":
			// Gossip notices a dead server seconds after raft does: "serf
			// alive" alone would read as if the server were fine.
			p = append(p, fmt.Sprintf("server %s (%s) is unhealthy: its raft contact, term or index lags the leader's (gossip still sees it alive)", s.Name, s.Address))
		case !s.Healthy:
			p = append(p, fmt.Sprintf("server %s (%s) is unhealthy (serf %s)", s.Name, s.Address, s.SerfStatus))
		case !s.Voter:
			p = append(p, fmt.Sprintf("server %s (%s) is not a voter", s.Name, s.Address))
		}
	}
	if _, ok := h.Leader(); !ok {
		p = append(p, "no leader")
	}
	return p
}

// ConsulAutopilotHealth reads Consul's autopilot server health.
func ConsulAutopilotHealth(ctx context.Context, c *consulapi.Client) (ClusterHealth, error) {
	r, err := c.Operator().AutopilotServerHealth((&consulapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return ClusterHealth{}, fmt.Errorf("consul autopilot health: %w", err)
	}
	h := ClusterHealth{Healthy: r.Healthy, FailureTolerance: r.FailureTolerance}
	for _, s := range r.Servers {
		h.Servers = append(h.Servers, ServerHealth{
			ID: s.ID, Name: s.Name, Address: s.Address, Version: s.Version,
			Leader: s.Leader, Voter: s.Voter, Healthy: s.Healthy, SerfStatus: s.SerfStatus,
			LastIndex: s.LastIndex, LastTerm: s.LastTerm, StableSince: s.StableSince,
		})
	}
	slices.SortFunc(h.Servers, func(a, b ServerHealth) int { return strings.Compare(a.Name, b.Name) })
	return h, nil
}

// NomadAutopilotHealth reads Nomad's autopilot server health (operator:read).
func NomadAutopilotHealth(ctx context.Context, c *nomadapi.Client) (ClusterHealth, error) {
	r, _, err := c.Operator().AutopilotServerHealth((&nomadapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		// Nomad sends its report with status 429 while a server is
		// unhealthy; the API client calls that an error. The report is
		// what a caller needs then, not the error.
		var ue nomadapi.UnexpectedResponseError
		if !errors.As(err, &ue) || ue.StatusCode() != http.StatusTooManyRequests || !ue.HasBody() {
			return ClusterHealth{}, fmt.Errorf("nomad autopilot health: %w", err)
		}
		r = &nomadapi.OperatorHealthReply{}
		if jerr := json.Unmarshal([]byte(ue.Body()), r); jerr != nil {
			return ClusterHealth{}, fmt.Errorf("nomad autopilot health: status 429 with a report that does not parse: %w", jerr)
		}
	}
	h := ClusterHealth{Healthy: r.Healthy, FailureTolerance: r.FailureTolerance}
	for _, s := range r.Servers {
		h.Servers = append(h.Servers, ServerHealth{
			ID: s.ID, Name: s.Name, Address: s.Address, Version: s.Version,
			Leader: s.Leader, Voter: s.Voter, Healthy: s.Healthy, SerfStatus: s.SerfStatus,
			LastIndex: s.LastIndex, LastTerm: s.LastTerm, StableSince: s.StableSince,
		})
	}
	slices.SortFunc(h.Servers, func(a, b ServerHealth) int { return strings.Compare(a.Name, b.Name) })
	return h, nil
}

// Member is one agent of a gossip pool with the version it runs.
type Member struct {
	Name    string
	Addr    string // the machine's address
	Server  bool
	Alive   bool
	Status  string // alive, failed, left, leaving
	Version string // "1.14.8", without the build's commit
}

// consulStatus names serf's member states (api v1.18 has no constants).
var consulStatus = [...]string{"none", "alive", "leaving", "left", "failed"}

// ConsulMemberVersions lists Consul's LAN members as the agent behind c
// sees them, with the version each runs (its "build" tag).
func ConsulMemberVersions(ctx context.Context, c *consulapi.Client) ([]Member, error) {
	var ms []consulapi.AgentMember
	if _, err := c.Raw().Query("/v1/agent/members", &ms, (&consulapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("consul members: %w", err)
	}
	out := make([]Member, 0, len(ms))
	for _, m := range ms {
		st := "unknown"
		if m.Status >= 0 && m.Status < len(consulStatus) {
			st = consulStatus[m.Status]
		}
		// The build tag is "1.14.8:<commit>".
		v, _, _ := strings.Cut(m.Tags["build"], ":")
		out = append(out, Member{Name: m.Name, Addr: m.Addr, Server: m.Tags["role"] == "consul",
			Alive: m.Status == serfAlive, Status: st, Version: v})
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// NomadServerVersions lists Nomad's server members (the servers' gossip
// pool) with the version each runs. Clients are not in it: see
// NomadNodes.
func NomadServerVersions(ctx context.Context, c *nomadapi.Client) ([]Member, error) {
	var sm nomadapi.ServerMembers
	if _, err := c.Raw().Query("/v1/agent/members", &sm, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("nomad server members: %w", err)
	}
	out := make([]Member, 0, len(sm.Members))
	for _, m := range sm.Members {
		// The build tag is "1.9.3" (with "-dev" or "+ent" suffixes where so built).
		out = append(out, Member{Name: m.Name, Addr: m.Addr, Server: true,
			Alive: m.Status == "alive", Status: m.Status, Version: m.Tags["build"]})
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// NomadNode is a client node with what an upgrade needs to know of it.
type NomadNode struct {
	ID       string
	Name     string
	Address  string
	Pool     string
	Status   string // ready, down, initializing, disconnected
	Eligible bool
	Draining bool
	Version  string
	// Allocs counts the allocations the node runs or is starting.
	Allocs int
}

// NomadNodes lists the client nodes with their versions and the number of
// running or pending allocations on each.
func NomadNodes(ctx context.Context, c *nomadapi.Client) ([]NomadNode, error) {
	q := (&nomadapi.QueryOptions{}).WithContext(ctx)
	stubs, _, err := c.Nodes().List(q)
	if err != nil {
		return nil, fmt.Errorf("nomad nodes: %w", err)
	}
	allocs, _, err := c.Allocations().List(q)
	if err != nil {
		return nil, fmt.Errorf("nomad allocations: %w", err)
	}
	count := map[string]int{}
	for _, a := range allocs {
		if a.ClientStatus == nomadapi.AllocClientStatusRunning || a.ClientStatus == nomadapi.AllocClientStatusPending {
			count[a.NodeID]++
		}
	}
	out := make([]NomadNode, 0, len(stubs))
	for _, n := range stubs {
		out = append(out, NomadNode{ID: n.ID, Name: n.Name, Address: n.Address, Pool: n.NodePool,
			Status: n.Status, Eligible: n.SchedulingEligibility == nomadapi.NodeSchedulingEligible,
			Draining: n.Drain, Version: n.Version, Allocs: count[n.ID]})
	}
	slices.SortFunc(out, func(a, b NomadNode) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// SetNodeEligibility marks a node eligible for new allocations or not.
func SetNodeEligibility(ctx context.Context, c *nomadapi.Client, nodeID string, eligible bool) error {
	if _, err := c.Nodes().ToggleEligibility(nodeID, eligible, (&nomadapi.WriteOptions{}).WithContext(ctx)); err != nil {
		return fmt.Errorf("nomad node %s eligibility %v: %w", nodeID, eligible, err)
	}
	return nil
}

// DrainResult is what a drain moved.
type DrainResult struct {
	Allocs   int // allocations running on the node when the drain began
	Duration time.Duration
}

// DrainNode drains a node and waits until the drain is complete: Nomad
// migrates each job's allocations as its migrate block says (max_parallel,
// health checks), and stops what is left when deadline passes. The node
// stays ineligible afterwards. System jobs are drained too, last, as
// Nomad does. A drain that is cancelled by someone else is an error.
func DrainNode(ctx context.Context, c *nomadapi.Client, nodeID string, deadline time.Duration) (DrainResult, error) {
	start := time.Now()
	var res DrainResult
	nodes, err := NomadNodes(ctx, c)
	if err != nil {
		return res, err
	}
	for _, n := range nodes {
		if n.ID == nodeID {
			res.Allocs = n.Allocs
		}
	}
	_, err = c.Nodes().UpdateDrainOpts(nodeID, &nomadapi.DrainOptions{
		DrainSpec: &nomadapi.DrainSpec{Deadline: deadline},
		Meta:      map[string]string{"steppe": "upgrade"},
	}, (&nomadapi.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return res, fmt.Errorf("drain nomad node %s: %w", nodeID, err)
	}
	err = poll(ctx, "drain nomad node "+nodeID, func() (bool, error) {
		n, _, err := c.Nodes().Info(nodeID, (&nomadapi.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return false, err
		}
		if n.DrainStrategy != nil {
			return false, fmt.Errorf("still draining (deadline %v)", n.DrainStrategy.ForceDeadline.Format(time.RFC3339))
		}
		if n.LastDrain != nil && n.LastDrain.Status == nomadapi.DrainStatusCanceled {
			return false, permanent(errors.New("the drain was cancelled"))
		}
		allocs, _, err := c.Nodes().Allocations(nodeID, (&nomadapi.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return false, err
		}
		for _, a := range allocs {
			if a.ClientStatus == nomadapi.AllocClientStatusRunning || a.ClientStatus == nomadapi.AllocClientStatusPending {
				return false, fmt.Errorf("allocation %s (%s) still %s", a.ID[:8], a.JobID, a.ClientStatus)
			}
		}
		return true, nil
	})
	res.Duration = time.Since(start)
	return res, err
}

// NomadTransferLeadership asks Nomad's raft to hand leadership to the
// server with raft ID id (Nomad 1.8.3 and later), and waits until that
// server reports itself leader.
func NomadTransferLeadership(ctx context.Context, c *nomadapi.Client, id string) error {
	if err := c.Operator().RaftTransferLeadershipByID(id, (&nomadapi.WriteOptions{}).WithContext(ctx)); err != nil {
		return fmt.Errorf("nomad leadership transfer to %s: %w", id, err)
	}
	return poll(ctx, "nomad leadership moves to "+id, func() (bool, error) {
		h, err := NomadAutopilotHealth(ctx, c)
		if err != nil {
			return false, err
		}
		l, ok := h.Leader()
		if !ok || l.ID != id {
			return false, fmt.Errorf("leader is %s", l.Name)
		}
		return true, nil
	})
}

// ConsulCanTransferLeadership says whether the Consul servers can be asked
// to hand leadership over. Consul 1.14 has no such endpoint
// (/v1/operator/raft/transfer-leader arrived in 1.15), and neither has the
// api module it speaks; so a Consul upgrade restarts the leader last and
// lets the upgraded servers elect one of themselves.
func ConsulCanTransferLeadership() bool { return false }

// SnapshotInfo describes a snapshot saved and checked.
type SnapshotInfo struct {
	Path  string
	Bytes int64
	Files []string // entries of the archive, all checked against SHA256SUMS
}

// SaveConsulSnapshot saves a Consul snapshot to path (atomically: written
// beside it, checked, then renamed) and checks that it reads back whole.
func SaveConsulSnapshot(ctx context.Context, c *consulapi.Client, path string) (SnapshotInfo, error) {
	rc, _, err := c.Snapshot().Save((&consulapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("consul snapshot: %w", err)
	}
	defer rc.Close()
	return saveSnapshot(rc, path)
}

// SaveNomadSnapshot saves a Nomad snapshot to path (the client checks the
// server's digest while reading) and checks that it reads back whole.
func SaveNomadSnapshot(ctx context.Context, c *nomadapi.Client, path string) (SnapshotInfo, error) {
	rc, err := c.Operator().Snapshot((&nomadapi.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("nomad snapshot: %w", err)
	}
	defer rc.Close()
	return saveSnapshot(rc, path)
}

func saveSnapshot(r io.Reader, path string) (SnapshotInfo, error) {
	info := SnapshotInfo{Path: path}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return info, fmt.Errorf("snapshot %s: %w", path, err)
	}
	p, err := atomicfile.Create(path, 0o600, func(w io.Writer) error {
		n, err := io.Copy(w, r)
		info.Bytes = n
		return err
	})
	if err != nil {
		return info, fmt.Errorf("snapshot %s: %w", path, err)
	}
	defer p.Discard()
	// Checked under its temporary name: a damaged snapshot never takes
	// the place of a good one.
	files, err := CheckSnapshot(p.TempName())
	if err != nil {
		return info, err
	}
	info.Files = files
	if err := p.Commit(); err != nil {
		return info, fmt.Errorf("snapshot %s: %w", path, err)
	}
	return info, nil
}

// vaultSealedSums is the file Vault adds to the raft snapshot format.
const vaultSealedSums = "SHA256SUMS.sealed"

// CheckSnapshot reads a Consul, Nomad or Vault snapshot archive (gzipped
// tar of meta.json, state.bin and SHA256SUMS, the format all three share;
// Vault adds SHA256SUMS.sealed) and checks every file against SHA256SUMS.
// It returns the names of the files.
func CheckSnapshot(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("check snapshot: %w", err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("check snapshot %s: not gzip: %w", path, err)
	}
	tr := tar.NewReader(zr)
	sums := map[string]string{}
	var want map[string]string
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("check snapshot %s: %w", path, err)
		}
		names = append(names, h.Name)
		if h.Name == vaultSealedSums {
			// Vault's seal-wrapped hash of SHA256SUMS: only Vault can
			// check it, on restore.
			continue
		}
		if h.Name == "SHA256SUMS" {
			b, err := io.ReadAll(io.LimitReader(tr, 1<<20))
			if err != nil {
				return nil, fmt.Errorf("check snapshot %s: SHA256SUMS: %w", path, err)
			}
			want = map[string]string{}
			for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
				sum, name, ok := strings.Cut(line, "  ")
				if !ok {
					return nil, fmt.Errorf("check snapshot %s: SHA256SUMS line %q", path, line)
				}
				want[name] = sum
			}
			continue
		}
		hs := sha256.New()
		if _, err := io.Copy(hs, tr); err != nil {
			return nil, fmt.Errorf("check snapshot %s: %s: %w", path, h.Name, err)
		}
		sums[h.Name] = hex.EncodeToString(hs.Sum(nil))
	}
	if want == nil {
		return nil, fmt.Errorf("check snapshot %s: no SHA256SUMS", path)
	}
	if _, ok := sums["state.bin"]; !ok {
		return nil, fmt.Errorf("check snapshot %s: no state.bin", path)
	}
	for name, sum := range want {
		if sums[name] != sum {
			return nil, fmt.Errorf("check snapshot %s: %s: SHA-256 %s, SHA256SUMS says %s", path, name, sums[name], sum)
		}
	}
	for name := range sums {
		if _, ok := want[name]; !ok {
			return nil, fmt.Errorf("check snapshot %s: %s is not in SHA256SUMS", path, name)
		}
	}
	return names, nil
}

// PurgeNode removes a node that is gone for good (its machine destroyed)
// from Nomad's state, so it does not linger as down.
func PurgeNode(ctx context.Context, c *nomadapi.Client, nodeID string) error {
	if _, _, err := c.Nodes().Purge(nodeID, (&nomadapi.QueryOptions{}).WithContext(ctx)); err != nil {
		return fmt.Errorf("purge nomad node %s: %w", nodeID, err)
	}
	return nil
}
