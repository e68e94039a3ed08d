package deploy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/provider"
)

// vaultClients are Vault clients of every server (by address order of
// servers), holding token.
func vaultClients(servers []cluster.Machine, files hashi.TLSFiles, token cluster.Secret) ([]*vaultapi.Client, error) {
	out := make([]*vaultapi.Client, len(servers))
	for i, m := range servers {
		c, err := hashi.VaultClient(fmt.Sprintf("%s:%d", m.Address, cluster.VaultAPIPort), files, token)
		if err != nil {
			return nil, err
		}
		out[i] = c
	}
	return out, nil
}

// storeVaultTransit copies the transit seal's token (and CA) named by the
// spec into the state directory, when the spec file is given (its paths
// are relative to it), so that the servers' secrets can be made without
// it later. The token is never printed, logged or put in a bundle.
func (u *upRun) storeVaultTransit() error {
	t := u.spec.Vault.Transit
	if t == nil {
		return u.st.SetVaultTransitCA(nil)
	}
	if u.opts.SpecPath == "" {
		if _, ok := u.st.LookupToken(cluster.TokenVaultTransit); !ok {
			return errors.New("vault transit seal: no token kept: run steppe up -spec with the spec and its token_file")
		}
		return nil
	}
	rel := func(p string) string {
		if filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(filepath.Dir(u.opts.SpecPath), p)
	}
	tok, err := os.ReadFile(rel(t.TokenFile))
	if err != nil {
		return fmt.Errorf("vault transit seal token_file: %w", err)
	}
	if s := strings.TrimSpace(string(tok)); s == "" {
		return fmt.Errorf("vault transit seal token_file %s is empty", rel(t.TokenFile))
	} else if err := u.st.SetToken(cluster.TokenVaultTransit, cluster.Secret(s)); err != nil {
		return err
	}
	var ca []byte
	if t.CAFile != "" {
		if ca, err = os.ReadFile(rel(t.CAFile)); err != nil {
			return fmt.Errorf("vault transit seal ca_file: %w", err)
		}
	}
	if err := u.st.SetVaultTransitCA(ca); err != nil {
		return err
	}
	return checkTransit(t, ca)
}

// checkTransit asks the transit Vault whether it answers, before any
// server depends on it: a Vault whose seal cannot be reached does not
// start.
func checkTransit(t *cluster.TransitSeal, caPEM []byte) error {
	u, err := url.Parse(t.Address)
	if err != nil {
		return fmt.Errorf("vault transit seal address %q: %w", t.Address, err)
	}
	dir, err := os.MkdirTemp("", "steppe-transit-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	files := hashi.TLSFiles{}
	if caPEM != nil {
		files.CAFile = filepath.Join(dir, "ca.pem")
		if err := os.WriteFile(files.CAFile, caPEM, 0o600); err != nil {
			return err
		}
	}
	c, err := hashi.VaultClient(u.Host, files, "")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := hashi.GetVaultHealth(ctx, c)
	if err != nil {
		return fmt.Errorf("vault transit seal %s cannot be reached (%w): the servers' Vaults would not start; check the address, ca_file and that Vault is up", t.Address, err)
	}
	if h.Sealed {
		return fmt.Errorf("vault transit seal %s is sealed: unseal it first", t.Address)
	}
	return nil
}

// vault initialises Vault once, unseals every server that is sealed, and
// waits for raft to have every server as a healthy voter. Each step is
// resumed by the next up: the keys are kept before anything uses them,
// and an initialisation is never asked for twice.
func (u *upRun) vault(ctx context.Context) error {
	srv := u.servers()
	anon, err := vaultClients(srv, u.opFiles, "")
	if err != nil {
		return err
	}
	h, err := hashi.WaitVaultAPI(ctx, anon[0])
	if err != nil {
		return fmt.Errorf("%w\n%s", err, serviceLogs(u.serverMachines(), "vault", 10))
	}
	init, err := u.st.VaultInit()
	if err != nil {
		return err
	}
	initFile := filepath.Join(u.stateDir, "vault", "init.json")
	switch {
	case !h.Initialized && init != nil:
		return fmt.Errorf("vault on %s is not initialised, but %s holds the keys of an earlier initialisation: its raft data is gone; restore it from a snapshot (vault operator raft snapshot restore), or move %s away to initialise a new, empty Vault", srv[0].Name, initFile, initFile)
	case !h.Initialized:
		if err := u.st.MarkVaultInitPending(srv[0].Name); err != nil {
			return err
		}
		spec := u.spec.Vault
		if init, err = hashi.InitVault(ctx, anon[0], spec.Shares, spec.Threshold, spec.Transit != nil); err != nil {
			return err
		}
		if err := u.st.SaveVaultInit(init); err != nil {
			return fmt.Errorf("vault was initialised but its keys could not be kept (%w): they are lost; steppe down and steppe up start afresh", err)
		}
		kind := "unseal"
		if init.Recovery {
			kind = "recovery"
		}
		u.printf("    vault initialised on %s: %d %s key shares (threshold %d) and the root token in %s (0600)", srv[0].Name, len(init.Keys), kind, init.Threshold, initFile)
	case init == nil && u.st.VaultInitPending():
		return fmt.Errorf("vault on %s was initialised by a steppe up that was killed before it kept the keys; nothing is stored in that Vault yet: steppe down, then steppe up, starts afresh", srv[0].Name)
	case init == nil:
		return fmt.Errorf("vault on %s is initialised, but not by this state directory (no %s): steppe does not take over a Vault it did not initialise; give another -state, or stop that Vault", srv[0].Name, initFile)
	}

	t0 := time.Now()
	// Autopilot's settings go in as soon as one server is active, before
	// the others join: a server that joins sooner is held to Vault's
	// default 10 s of stabilisation before it may vote.
	autopilot := func(ctx context.Context) error {
		c, err := u.vaultAdmin(ctx, srv, init)
		if err != nil {
			return err
		}
		return hashi.ConfigureVaultAutopilot(ctx, c, len(srv))
	}
	sealed, err := u.unsealVault(ctx, srv, anon, init, autopilot)
	if err != nil {
		return err
	}
	switch {
	case sealed > 0 && init.Recovery:
		u.printf("    vault: %d of %d servers unsealed themselves (transit seal)", sealed, len(srv))
	case sealed > 0:
		u.printf("    vault unsealed on %d of %d servers", sealed, len(srv))
	}
	t1 := time.Now()
	c, err := u.vaultAdmin(ctx, srv, init)
	if err != nil {
		return err
	}
	r, err := hashi.WaitVaultVoters(ctx, c, len(srv))
	if err != nil {
		return fmt.Errorf("%w\n%s", err, serviceLogs(u.serverMachines(), "vault", 10))
	}
	u.printf("    vault leader %s; %d healthy voters (unsealed in %s, voters %s later)", r.Leader, r.Voters(), t1.Sub(t0).Round(10*time.Millisecond), time.Since(t1).Round(10*time.Millisecond))
	return nil
}

// unsealVault unseals every sealed server: the first (the one that was
// initialised, or any active one) before the others, which join raft
// through it. An auto-unsealing Vault (recovery keys) is waited for.
// It returns how many servers were sealed.
func (e *env) unsealVault(ctx context.Context, srv []cluster.Machine, anon []*vaultapi.Client, init *cluster.VaultInit, afterFirst func(context.Context) error) (int, error) {
	var sealed []int
	for i, c := range anon {
		h, err := hashi.WaitVaultAPI(ctx, c)
		if err != nil {
			return 0, err
		}
		if h.Sealed {
			sealed = append(sealed, i)
		}
	}
	if len(sealed) == 0 {
		if afterFirst != nil {
			return 0, afterFirst(ctx)
		}
		return 0, nil
	}
	unseal := func(i int) error {
		if init.Recovery {
			return hashi.WaitVaultActive(ctx, anon[i], true)
		}
		if err := hashi.UnsealVault(ctx, anon[i], init.Keys); err != nil {
			if errors.Is(err, hashi.ErrVaultKeys) {
				return fmt.Errorf("vault on %s: %w: the Vault there is not the one %s initialised; stop it, or give the state directory of the cluster it belongs to", srv[i].Name, err, filepath.Join(e.stateDir, "vault", "init.json"))
			}
			return fmt.Errorf("vault on %s: %w", srv[i].Name, err)
		}
		return nil
	}
	// One server first when none is active: the others need a leader
	// to join.
	active := false
	for i := range anon {
		if h, err := hashi.GetVaultHealth(ctx, anon[i]); err == nil && !h.Sealed && !h.Standby {
			active = true
		}
	}
	rest := sealed
	if !active {
		if err := unseal(sealed[0]); err != nil {
			return 0, err
		}
		// Any server may win the election, not only the one unsealed.
		if _, err := hashi.WaitAnyVaultActive(ctx, anon); err != nil {
			return 0, err
		}
		rest = sealed[1:]
	}
	if afterFirst != nil {
		if err := afterFirst(ctx); err != nil {
			return 0, err
		}
	}
	errs := make([]error, len(rest))
	var wg sync.WaitGroup
	for j, i := range rest {
		wg.Go(func() { errs[j] = unseal(i) })
	}
	wg.Wait()
	return len(sealed), errors.Join(errs...)
}

// vaultAdmin is a client of the active server holding the token steppe
// works with: the root token until setup revoked it, then the operator
// token. The active one, because a standby just unsealed does not yet
// know where to forward ("local node not active but active cluster node
// not found").
func (u *upRun) vaultAdmin(ctx context.Context, srv []cluster.Machine, init *cluster.VaultInit) (*vaultapi.Client, error) {
	tok := init.RootToken
	if init.RootRevoked {
		var err error
		if tok, err = u.st.Token(cluster.TokenVaultOperator); err != nil {
			return nil, err
		}
	}
	cs, err := vaultClients(srv, u.opFiles, tok)
	if err != nil {
		return nil, err
	}
	i, err := hashi.WaitAnyVaultActive(ctx, cs)
	if err != nil {
		return nil, err
	}
	return cs[i], nil
}

// vaultSetup makes Vault trust Nomad's workload identities and hold the
// jobs' secrets, makes the operator token, then revokes the root token
// (once: a later up works with the operator token).
func (u *upRun) vaultSetup(ctx context.Context) error {
	srv := u.servers()
	init, err := u.st.VaultInit()
	if err != nil {
		return err
	}
	if init == nil {
		return errors.New("vault setup: vault is not initialised")
	}
	op, err := u.st.Token(cluster.TokenVaultOperator)
	if err != nil {
		return err
	}
	c, err := u.vaultAdmin(ctx, srv, init)
	if err != nil {
		return err
	}
	if !init.RootRevoked {
		// A run killed after the revocation and before it was recorded
		// finds the root token refused: the operator token was made
		// before it.
		ok, err := hashi.VaultTokenValid(ctx, c)
		if err != nil {
			return err
		}
		if !ok {
			init.RootRevoked = true
			if err := u.st.SaveVaultInit(init); err != nil {
				return err
			}
			if c, err = u.vaultAdmin(ctx, srv, init); err != nil {
				return err
			}
		}
	}
	if init.RootRevoked {
		if err := hashi.RenewVaultToken(ctx, c); err != nil {
			return fmt.Errorf("%w: the operator token may have expired (32 days unused); a root token can be made with the unseal keys (vault operator generate-root)", err)
		}
	}
	jwks := strings.TrimSuffix(u.nomad.Address(), "/") + "/.well-known/jwks.json"
	if err := hashi.SetupVault(ctx, c, hashi.VaultSetup{NomadJWKSURL: jwks, CAPEM: u.st.CACertPEM(), OperatorToken: op}); err != nil {
		return err
	}
	if !init.RootRevoked {
		if err := hashi.RevokeVaultRoot(ctx, c); err != nil {
			return err
		}
		init.RootRevoked = true
		if err := u.st.SaveVaultInit(init); err != nil {
			return err
		}
		u.printf("    root token revoked; the operator token (policy %s) is in steppe env", hashi.VaultOperatorPolicy)
	}
	u.printf("    Vault trusts Nomad's workload identities (auth/%s, role %s); jobs read %s/<namespace>/<job>/...", cluster.VaultJWTPath, hashi.VaultWorkloadsRole, hashi.VaultKVPath)
	return nil
}

// VaultStatus is the Vault servers at a glance.
type VaultStatus struct {
	Servers []VaultServerStatus `json:"servers"`
	Leader  string              `json:"leader,omitempty"`
	Voters  int                 `json:"voters"`
}

// VaultServerStatus is one Vault server.
type VaultServerStatus struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	// State is active, standby, sealed, uninitialised or down.
	State   string `json:"state"`
	Sealed  bool   `json:"sealed"`
	Voter   bool   `json:"voter"`
	Version string `json:"version,omitempty"`
	Error   string `json:"error,omitempty"`
}

// vaultStatus fills s.Vault and its problems: every server's seal and HA
// state (sys/health, no token), raft voters through the operator token.
func vaultStatus(ctx context.Context, s *Status, st *cluster.State, files hashi.TLSFiles, servers []cluster.Machine) {
	vs := &VaultStatus{Servers: make([]VaultServerStatus, len(servers))}
	s.Vault = vs
	tok, _ := st.LookupToken(cluster.TokenVaultOperator)
	cs, err := vaultClients(servers, files, tok)
	if err != nil {
		s.Problems = append(s.Problems, "vault: "+err.Error())
		return
	}
	var wg sync.WaitGroup
	for i, m := range servers {
		wg.Go(func() {
			v := VaultServerStatus{Name: m.Name, Address: m.Address}
			h, err := hashi.GetVaultHealth(ctx, cs[i])
			switch {
			case err != nil:
				v.State, v.Error = "down", err.Error()
			case !h.Initialized:
				v.State, v.Sealed = "uninitialised", h.Sealed
			case h.Sealed:
				v.State, v.Sealed = "sealed", true
			case h.Standby:
				v.State = "standby"
			default:
				v.State = "active"
			}
			v.Version = h.Version
			vs.Servers[i] = v
		})
	}
	wg.Wait()
	for _, v := range vs.Servers {
		switch v.State {
		case "down":
			s.Problems = append(s.Problems, fmt.Sprintf("vault on %s does not answer: %s", v.Name, v.Error))
		case "sealed":
			s.Problems = append(s.Problems, fmt.Sprintf("vault on %s is sealed: run steppe vault unseal (or steppe up)", v.Name))
		case "uninitialised":
			s.Problems = append(s.Problems, fmt.Sprintf("vault on %s is not initialised: run steppe up", v.Name))
		}
	}
	// Raft as the active server sees it: a standby that has just been
	// unsealed does not know the active node for a moment.
	order := make([]int, 0, len(vs.Servers))
	for i, v := range vs.Servers {
		if v.State == "active" {
			order = append([]int{i}, order...)
		} else if v.State == "standby" {
			order = append(order, i)
		}
	}
	if len(order) > 0 && vs.Servers[order[0]].State != "active" {
		s.Problems = append(s.Problems, "vault has no active server: an election is under way, or too few servers are unsealed for a quorum")
		return
	}
	if len(order) > 0 && tok != "" {
		r, err := hashi.GetVaultRaft(ctx, cs[order[0]])
		if err != nil {
			s.Problems = append(s.Problems, "vault: "+err.Error())
			return
		}
		vs.Leader, vs.Voters = r.Leader, r.Voters()
		for j := range vs.Servers {
			for _, rs := range r.Servers {
				if rs.Name == vs.Servers[j].Name {
					vs.Servers[j].Voter = rs.Status == "voter" || rs.Status == "leader"
				}
			}
		}
		if vs.Voters < len(servers) {
			s.Problems = append(s.Problems, fmt.Sprintf("vault raft has %d voters of %d servers", vs.Voters, len(servers)))
		}
	}
}

// serverMachines are the server machines of ms, running or not.
func serverMachines(ms []provider.Machine) []cluster.Machine {
	var out []cluster.Machine
	for _, m := range ms {
		if m.Role == cluster.RoleServer {
			out = append(out, m.Cluster())
		}
	}
	return out
}

// VaultUnseal unseals every running Vault server that is sealed (after a
// crash, a restart or a reboot) with the key shares in the state
// directory.
func VaultUnseal(ctx context.Context, opts Options) error {
	e, err := open(opts)
	if err != nil {
		return err
	}
	if err := e.needState(); err != nil {
		return err
	}
	if e.spec.Versions.Vault == "" {
		return fmt.Errorf("cluster %s runs no Vault (its spec has vault { enabled = false })", e.spec.Name)
	}
	st, err := cluster.OpenState(e.stateDir)
	if err != nil {
		return err
	}
	init, err := st.VaultInit()
	if err != nil {
		return err
	}
	if init == nil {
		return fmt.Errorf("cluster %s: Vault was never initialised from %s: run steppe up", e.spec.Name, e.stateDir)
	}
	op, err := st.OperatorCert()
	if err != nil {
		return err
	}
	ms, err := e.local.List(ctx)
	if err != nil {
		return err
	}
	var srv []cluster.Machine
	for _, m := range ms {
		if m.Role == cluster.RoleServer && m.Running {
			srv = append(srv, m.Cluster())
		}
	}
	if len(srv) == 0 {
		return fmt.Errorf("cluster %s: no server machine is running (steppe up)", e.spec.Name)
	}
	slices.SortFunc(srv, func(a, b cluster.Machine) int { return strings.Compare(a.Name, b.Name) })
	anon, err := vaultClients(srv, hashi.TLSFiles{CAFile: st.CAFile(), CertFile: op.CertFile, KeyFile: op.KeyFile}, "")
	if err != nil {
		return err
	}
	n, err := e.unsealVault(ctx, srv, anon, init, nil)
	if err != nil {
		return err
	}
	e.printf("vault: %d of %d running servers were sealed; all unsealed", n, len(srv))
	return nil
}

// unsealedVault is host:port of the first server whose Vault is unsealed
// (a sealed one accepts connections but serves nothing), else of one
// that answers.
func unsealedVault(ctx context.Context, st *cluster.State, servers []string) string {
	files := hashi.TLSFiles{CAFile: st.CAFile()}
	for _, s := range servers {
		addr := net.JoinHostPort(s, strconv.Itoa(cluster.VaultAPIPort))
		c, err := hashi.VaultClient(addr, files, "")
		if err != nil {
			continue
		}
		hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		h, err := hashi.GetVaultHealth(hctx, c)
		cancel()
		if err == nil && h.Initialized && !h.Sealed {
			return addr
		}
	}
	return answering(ctx, servers, cluster.VaultAPIPort)
}
