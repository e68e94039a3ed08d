package deploy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/upgrade"
)

// What `steppe rotate` renews.
const (
	RotateCerts  = "certs"
	RotateGossip = "gossip"
	RotateTokens = "tokens"
)

// RotateOptions are Options plus what `steppe rotate` is asked.
type RotateOptions struct {
	Options
	// What is RotateCerts, RotateGossip or RotateTokens.
	What string
	// Gate is what a server whose daemon had to restart must show before
	// the next is touched (as for upgrade).
	Gate upgrade.Gate
	// MachineTimeout bounds how long a machine may take to load its new
	// secrets; 0 means 5 minutes.
	MachineTimeout time.Duration
}

// RotateResult is what a rotation did.
type RotateResult struct {
	What     string        `json:"what"`
	Resumed  bool          `json:"resumed"`
	Steps    []string      `json:"steps"`
	Took     time.Duration `json:"took"`
	Restarts []string      `json:"restarts,omitempty"` // machine/service restarted
}

// rotationFile is the record of the last rotation in the state
// directory: a killed rotation resumes from it.
const rotationFile = "rotate.json"

// rotation is the record of one rotation: its kind, when it began (the
// certificates issued since are its own) and the steps done.
type rotation struct {
	Kind     string    `json:"kind"`
	Started  time.Time `json:"started"`
	Done     []string  `json:"done,omitempty"`
	Finished time.Time `json:"finished,omitzero"`
}

func loadRotation(dir string) (*rotation, error) {
	b, err := os.ReadFile(filepath.Join(dir, rotationFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("rotation record: %w", err)
	}
	var r rotation
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("rotation record %s: %w (remove it to start the rotation over)", filepath.Join(dir, rotationFile), err)
	}
	return &r, nil
}

func (r *rotation) save(dir string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("rotation record: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, rotationFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("rotation record: %w", err)
	}
	return nil
}

// beginRotation is the record of a rotation of kind starting now: the
// unfinished one of that kind, resumed; else a new one. An unfinished
// rotation of another kind is finished first.
func beginRotation(prev *rotation, kind string, now time.Time) (r *rotation, resumed bool, err error) {
	if prev != nil && prev.Finished.IsZero() {
		if prev.Kind != kind {
			return nil, false, fmt.Errorf("a rotation of the %s, begun %s, is unfinished: run steppe rotate %s to finish it first", prev.Kind, prev.Started.Format(time.RFC3339), prev.Kind)
		}
		return prev, true, nil
	}
	return &rotation{Kind: kind, Started: now.UTC()}, false, nil
}

func (r *rotation) done(step string) bool { return slices.Contains(r.Done, step) }

// Rotate renews the cluster's certificates, gossip keys or per-machine
// ACL tokens, delivering them through the provider's channel and making
// each daemon load them: a reload where the daemon can (TLS certificates,
// Consul's agent token, gossip keyrings), a restart behind the upgrade
// gates where it cannot (Nomad's Consul token). Killed, it resumes where
// it stopped when run again.
func Rotate(ctx context.Context, opts RotateOptions) (*RotateResult, error) {
	start := time.Now()
	switch opts.What {
	case RotateCerts, RotateGossip, RotateTokens:
	default:
		return nil, fmt.Errorf("rotate %q: want certs, gossip or tokens", opts.What)
	}
	o, release, err := openFleet(opts.Options, "rotate", opts.MachineTimeout)
	if err != nil {
		return nil, err
	}
	defer release()
	if st, err := pendingUpgrade(o.stateDir); err != nil {
		return nil, err
	} else if st != nil {
		return nil, fmt.Errorf("an upgrade to %s is in progress: run steppe upgrade to finish it first", upgrade.DescribeVersions(st.Target))
	}
	prev, err := loadRotation(o.stateDir)
	if err != nil {
		return nil, err
	}
	rec, resumed, err := beginRotation(prev, opts.What, time.Now())
	if err != nil {
		return nil, err
	}
	if err := rec.save(o.stateDir); err != nil {
		return nil, err
	}
	r := &rotator{fleetOps: o, rec: rec, gate: opts.Gate, res: &RotateResult{What: opts.What, Resumed: resumed}}
	how := ""
	if resumed {
		how = fmt.Sprintf(", resuming the rotation begun %s (%d steps done)", rec.Started.Format(time.RFC3339), len(rec.Done))
	}
	o.printf("steppe rotate %s: cluster %s (state %s)%s", opts.What, o.spec.Name, o.stateDir, how)
	if err := r.machines(ctx); err != nil {
		return r.res, err
	}
	o.printf("==> preflight")
	if err := r.preflight(ctx); err != nil {
		return r.res, err
	}
	switch opts.What {
	case RotateCerts:
		err = r.certs(ctx)
	case RotateGossip:
		err = r.gossip(ctx)
	case RotateTokens:
		err = r.tokens(ctx)
	}
	r.res.Took = time.Since(start)
	if err != nil {
		return r.res, fmt.Errorf("rotate %s: %w (run steppe rotate %s again to resume)", opts.What, err, opts.What)
	}
	rec.Finished = time.Now().UTC()
	if err := rec.save(o.stateDir); err != nil {
		return r.res, err
	}
	o.printf("cluster %s: %s rotated (%s)", o.spec.Name, opts.What, r.res.Took.Round(100*time.Millisecond))
	return r.res, nil
}

type rotator struct {
	*fleetOps
	rec  *rotation
	gate upgrade.Gate
	res  *RotateResult

	servers, clients []provider.Machine
}

// machines finds the fleet's machines, servers first.
func (r *rotator) machines(ctx context.Context) error {
	have, err := r.provisioned(ctx)
	if err != nil {
		return err
	}
	r.mu.Lock()
	fs, fc := r.fleet.machines(cluster.RoleServer, ""), r.fleet.machines(cluster.RoleClient, "")
	r.mu.Unlock()
	for _, list := range []struct {
		fm  []fleetMachine
		out *[]provider.Machine
	}{{fs, &r.servers}, {fc, &r.clients}} {
		for _, m := range list.fm {
			pm, ok := have[m.Name]
			if !ok {
				return fmt.Errorf("machine %s of the cluster does not exist: run steppe up to make it again first", m.Name)
			}
			*list.out = append(*list.out, pm)
		}
	}
	return nil
}

func (r *rotator) all() []provider.Machine { return append(slices.Clone(r.servers), r.clients...) }

// preflight refuses a cluster where a machine is not healthy: a daemon
// that is down would miss a keyring change or a reload, and keep what
// the cluster no longer accepts.
func (r *rotator) preflight(ctx context.Context) error {
	var errs []error
	for _, m := range r.all() {
		st, err := agent.NewClient(m.Socket).Status(ctx)
		if err != nil || !machineHealthy(st, 0) {
			errs = append(errs, fmt.Errorf("machine %s: %s", m.Name, failingCheck(st, err, 0)))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("preflight: every machine must be healthy first (steppe status; steppe up brings machines back): %w", errors.Join(errs...))
	}
	return nil
}

// step runs f as the named step unless the record says it is done, then
// records it done.
func (r *rotator) step(name string, f func() error) error {
	if r.rec.done(name) {
		r.printf("    %-32s done before", name)
		return nil
	}
	t := time.Now()
	task := r.task(name, "")
	if err := f(); err != nil {
		task.Fail(err)
		return fmt.Errorf("%s: %w", name, err)
	}
	r.rec.Done = append(r.rec.Done, name)
	if err := r.rec.save(r.stateDir); err != nil {
		task.Fail(err)
		return err
	}
	r.res.Steps = append(r.res.Steps, name)
	task.Done(fmt.Sprintf("    %-32s done (%s)", name, time.Since(t).Round(10*time.Millisecond)))
	return nil
}

// certs reissues the operator's and every node's certificate (the CA
// stays), then, one machine at a time, servers first, delivers them and
// has Consul and Nomad reload them.
func (r *rotator) certs(ctx context.Context) error {
	r.printf("==> issue certificates (the same CA signs them; the CA is not rotated)")
	if _, err := r.st.RotateOperatorCert(r.rec.Started); err != nil {
		return err
	}
	for _, m := range r.all() {
		if _, err := r.st.RotateNodeCert(r.spec, m.Cluster(), r.rec.Started); err != nil {
			return err
		}
	}
	r.printf("==> deliver and reload, one machine at a time (servers first)")
	for _, m := range r.all() {
		if err := r.step("certs/"+m.Name, func() error { return r.reloadSecrets(ctx, m) }); err != nil {
			return err
		}
	}
	return nil
}

// reloadSecrets delivers machine m's secrets as they are in the state
// directory, has its Consul and Nomad reload (both reload their TLS
// certificates on SIGHUP: Consul's reload updates its TLS configurator,
// Nomad's its key loader, RPC listeners and HTTP servers), and waits
// until every TLS port of the machine serves the delivered certificate;
// a server must also leave Consul and Nomad healthy.
func (fo *fleetOps) reloadSecrets(ctx context.Context, m provider.Machine) error {
	files, err := cluster.MachineSecrets(fo.spec, fo.st, m.Cluster(), fo.local.SecretsDir(m.Name))
	if err != nil {
		return err
	}
	if _, err := fo.local.Deliver(ctx, m, files); err != nil {
		return err
	}
	want, err := parseCert(files[cluster.SecretCertFile])
	if err != nil {
		return fmt.Errorf("machine %s: delivered certificate: %w", m.Name, err)
	}
	client := agent.NewClient(m.Socket)
	svcs, ports := []string{"consul", "nomad"}, tlsPorts(m)
	if fm, ok := fo.fleetMachine(m.Name); ok && m.Role == cluster.RoleServer && fm.Versions[cluster.VaultProduct] != "" {
		// Vault reloads its listener's certificate on SIGHUP too.
		svcs = append(svcs, "vault")
		ports = append(ports, tlsPort{"vault https", cluster.VaultAPIPort, 0})
	}
	for _, svc := range svcs {
		if err := client.Control(ctx, svc, "reload"); err != nil {
			return fmt.Errorf("machine %s: reload %s: %w", m.Name, svc, err)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, fo.machineTimeout)
	defer cancel()
	for _, p := range ports {
		if err := waitServedCert(wctx, m.Address, p, want, fo.opFiles); err != nil {
			return fmt.Errorf("machine %s: %w", m.Name, err)
		}
	}
	if m.Role == cluster.RoleServer {
		return fo.waitServersHealthy(wctx)
	}
	return nil
}

// waitServersHealthy waits until Consul and Nomad both report every
// server a healthy voter.
func (fo *fleetOps) waitServersHealthy(ctx context.Context) error {
	servers, err := fo.serverMachines(ctx)
	if err != nil {
		return err
	}
	n := len(servers)
	err = anyServer(ctx, fo, fo.Consul, func(c *consulapi.Client) error {
		_, err := hashi.WaitConsulHealthy(ctx, c, n)
		return err
	})
	if err != nil {
		return err
	}
	return anyServer(ctx, fo, fo.Nomad, func(c *nomadapi.Client) error {
		_, err := hashi.WaitNomadHealthy(ctx, c, n)
		return err
	})
}

// tlsPort is a TLS port of a machine; first is the byte that selects TLS
// on an RPC port that multiplexes protocols (0: plain TLS).
type tlsPort struct {
	name  string
	port  int
	first byte
}

// The bytes Consul (agent/pool: RPCTLS) and Nomad (helper/pool: RpcTLS)
// read first on their RPC ports before a TLS handshake.
const (
	consulRPCTLS = 3
	nomadRPCTLS  = 4
)

// tlsPorts are the TLS ports of a machine: HTTPS of both daemons, and
// the RPC ports servers listen on (clients serve no RPC).
func tlsPorts(m provider.Machine) []tlsPort {
	ps := []tlsPort{{"consul https", cluster.ConsulHTTPSPort, 0}, {"nomad https", cluster.NomadHTTPPort, 0}}
	if m.Role == cluster.RoleServer {
		ps = append(ps, tlsPort{"consul rpc", cluster.ConsulRPCPort, consulRPCTLS}, tlsPort{"nomad rpc", cluster.NomadRPCPort, nomadRPCTLS})
	}
	return ps
}

// ServedCert is the certificate a TLS port at addr presents; first, when
// not 0, is sent before the handshake (Consul's and Nomad's RPC ports).
// The operator's client certificate is offered, as RPC ports demand one.
func ServedCert(ctx context.Context, addr string, port int, first byte, files hashi.TLSFiles) (*x509.Certificate, error) {
	var d net.Dialer
	hp := net.JoinHostPort(addr, strconv.Itoa(port))
	conn, err := d.DialContext(ctx, "tcp", hp)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	} else {
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	}
	if first != 0 {
		if _, err := conn.Write([]byte{first}); err != nil {
			return nil, fmt.Errorf("%s: %w", hp, err)
		}
	}
	cfg := &tls.Config{InsecureSkipVerify: true} // verified below, against the cluster CA
	if pair, err := tls.LoadX509KeyPair(files.CertFile, files.KeyFile); err == nil {
		cfg.Certificates = []tls.Certificate{pair}
	}
	var served *x509.Certificate
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) > 0 {
			served = cs.PeerCertificates[0]
		}
		return nil
	}
	tc := tls.Client(conn, cfg)
	herr := tc.HandshakeContext(ctx)
	if served == nil {
		return nil, fmt.Errorf("%s: TLS handshake: %w", hp, herr)
	}
	if ca, err := os.ReadFile(files.CAFile); err == nil {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
		if _, err := served.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			return nil, fmt.Errorf("%s serves a certificate the cluster CA does not vouch for: %w", hp, err)
		}
	}
	return served, nil
}

// waitServedCert waits until the port serves want.
func waitServedCert(ctx context.Context, addr string, p tlsPort, want *x509.Certificate, files hashi.TLSFiles) error {
	var last string
	for {
		got, err := ServedCert(ctx, addr, p.port, p.first, files)
		switch {
		case err != nil:
			last = err.Error()
		case bytes.Equal(got.Raw, want.Raw):
			return nil
		default:
			last = fmt.Sprintf("still serves serial %s (until %s), not %s", got.SerialNumber.Text(16), got.NotAfter.Format(time.DateOnly), want.SerialNumber.Text(16))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s (%s:%d) did not load the new certificate: %s", p.name, addr, p.port, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func parseCert(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM certificate")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// gossip installs new Consul and Nomad gossip keys through each daemon's
// keyring API (install on every member, use, remove the old), with no
// restart, then delivers them to every machine. The daemons keep their
// keyrings in their data directories (Consul serf/local.keyring, Nomad
// server/serf.keyring) and load those, not the config's key, when they
// restart: the API changes them there. The config's key is what a
// machine with a new data directory starts from, so it follows.
func (r *rotator) gossip(ctx context.Context) error {
	r.printf("==> keyrings: install, use, remove the old keys")
	err := r.step("gossip/consul", func() error {
		key, err := r.st.NextGossipKey(cluster.GossipConsul)
		if err != nil {
			return err
		}
		err = anyServer(ctx, r.fleetOps, r.Consul, func(c *consulapi.Client) error {
			rings, err := hashi.RotateConsulGossip(ctx, c, key)
			if err == nil {
				for _, k := range rings {
					r.printf("    consul %s pool: %d members hold only the new key", k.Pool, k.Members)
				}
			}
			return err
		})
		if err != nil {
			return err
		}
		return r.st.PromoteGossipKey(cluster.GossipConsul)
	})
	if err != nil {
		return err
	}
	err = r.step("gossip/nomad", func() error {
		key, err := r.st.NextGossipKey(cluster.GossipNomad)
		if err != nil {
			return err
		}
		err = anyServer(ctx, r.fleetOps, r.Nomad, func(c *nomadapi.Client) error {
			rings, err := hashi.RotateNomadGossip(ctx, c, key)
			if err == nil {
				for _, k := range rings {
					r.printf("    nomad %s pool: %d members hold only the new key", k.Pool, k.Members)
				}
			}
			return err
		})
		if err != nil {
			return err
		}
		return r.st.PromoteGossipKey(cluster.GossipNomad)
	})
	if err != nil {
		return err
	}
	r.printf("==> deliver the new keys")
	for _, m := range r.all() {
		err := r.step("gossip/deliver/"+m.Name, func() error {
			files, err := cluster.MachineSecrets(r.spec, r.st, m.Cluster(), r.local.SecretsDir(m.Name))
			if err != nil {
				return err
			}
			_, err = r.local.Deliver(ctx, m, files)
			return err
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// tokens replaces each machine's Consul agent token and its Nomad's
// Consul token: new tokens in Consul, the agent token set on the
// machine's Consul through its API (no restart), the secrets delivered,
// Nomad restarted to read its new Consul token (Nomad 1.9 and 1.10
// reload no consul block on SIGHUP), servers one at a time behind the
// upgrade gate, and only then the old tokens deleted.
func (r *rotator) tokens(ctx context.Context) error {
	leader := ""
	_ = anyServer(ctx, r.fleetOps, r.Nomad, func(c *nomadapi.Client) error {
		l, err := c.Status().Leader()
		leader = l
		return err
	})
	// The Nomad leader last: one election instead of up to three.
	order := slices.Clone(r.servers)
	slices.SortStableFunc(order, func(a, b provider.Machine) int {
		la, lb := leaderAt(leader, a.Address), leaderAt(leader, b.Address)
		switch {
		case la == lb:
			return 0
		case la:
			return 1
		}
		return -1
	})
	order = append(order, r.clients...)
	r.printf("==> new tokens, one machine at a time (servers first, the Nomad leader last)")
	for _, m := range order {
		if err := r.step("tokens/"+m.Name, func() error { return r.rotateMachineTokens(ctx, m) }); err != nil {
			return err
		}
	}
	return nil
}

func leaderAt(leader, addr string) bool {
	h, _, err := net.SplitHostPort(leader)
	return err == nil && h == addr
}

func (r *rotator) rotateMachineTokens(ctx context.Context, m provider.Machine) error {
	names := []string{cluster.TokenConsulAgent(m.Name), cluster.TokenNomadConsul(m.Name)}
	for _, n := range names {
		if _, err := r.st.BeginTokenRotation(n); err != nil {
			return err
		}
	}
	plan, err := cluster.ConsulACL(r.spec, r.st, []cluster.Machine{m.Cluster()})
	if err != nil {
		return err
	}
	if err := anyServer(ctx, r.fleetOps, r.Consul, func(c *consulapi.Client) error { return hashi.ApplyConsulACL(ctx, c, plan) }); err != nil {
		return fmt.Errorf("create the new tokens: %w", err)
	}
	agentTok, _ := r.st.LookupToken(cluster.TokenConsulAgent(m.Name))
	c, err := r.Consul(m.Address)
	if err != nil {
		return err
	}
	if _, err := c.Agent().UpdateAgentACLToken(agentTok.Reveal(), (&consulapi.WriteOptions{}).WithContext(ctx)); err != nil {
		return fmt.Errorf("set consul's agent token: %w", err)
	}
	files, err := cluster.MachineSecrets(r.spec, r.st, m.Cluster(), r.local.SecretsDir(m.Name))
	if err != nil {
		return err
	}
	if _, err := r.local.Deliver(ctx, m, files); err != nil {
		return err
	}
	if err := r.restartNomad(ctx, m); err != nil {
		return err
	}
	prev := make([]string, len(names))
	for i, n := range names {
		prev[i] = cluster.PreviousTokenName(n)
	}
	if err := anyServer(ctx, r.fleetOps, r.Consul, func(c *consulapi.Client) error { return hashi.DeleteConsulTokens(ctx, c, r.st, prev) }); err != nil {
		return fmt.Errorf("delete the old tokens: %w", err)
	}
	return nil
}

// restartNomad restarts machine m's Nomad and waits for it: ready on a
// client (its tasks outlive the agent), through the upgrade gate on a
// server.
func (r *rotator) restartNomad(ctx context.Context, m provider.Machine) error {
	client := agent.NewClient(m.Socket)
	if err := client.Control(ctx, "nomad", "restart"); err != nil {
		return fmt.Errorf("restart nomad: %w", err)
	}
	r.res.Restarts = append(r.res.Restarts, m.Name+"/nomad")
	mctx, cancel := context.WithTimeout(ctx, r.machineTimeout)
	err := r.waitMachine(mctx, m, 0)
	cancel()
	if err != nil {
		return err
	}
	if m.Role != cluster.RoleServer {
		return nil
	}
	fm, _ := r.fleetMachine(m.Name)
	var servers []upgrade.Server
	for _, s := range r.servers {
		servers = append(servers, upgrade.Server{Machine: s.Name, Address: s.Address})
	}
	steps := newStepTasks(r.env)
	err = upgrade.WaitRestarted(ctx, r.fleetOps, servers, upgrade.Nomad, upgrade.Server{Machine: m.Name, Address: m.Address}, fm.Versions[cluster.NomadProduct], r.gate,
		steps.event)
	steps.end(err)
	return err
}
