package hashi_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	consulapi "github.com/hashicorp/consul/api"

	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/hashi/hashitest"
)

// TestConsulServersSecured starts 3 real Consul servers with the planned
// configs and secrets (TLS with verified client certificates, gossip
// encryption, ACLs default deny), bootstraps the ACLs, applies the
// least-privilege policies and tokens, and checks what is refused.
func TestConsulServersSecured(t *testing.T) {
	bin := hashitest.Binary(t, "consul", cluster.DefaultConsulVersion)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	// The default topology, of which only the servers run.
	spec := cluster.DefaultSpec()
	c := hashitest.New(t, spec, hashitest.Addrs(len(spec.MachineList())))
	st := c.State
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%s\n%s", fmt.Sprintf(format, args...), c.Logs("consul"))
	}
	// The management token is chosen before any Consul runs: the servers
	// get it with their secrets, and nothing learned from Consul needs
	// keeping, so an up killed during the bootstrap loses nothing.
	chosen, ok := st.LookupToken(cluster.TokenConsulBootstrap)
	if !ok {
		t.Fatal("no Consul management token in the state directory before Consul starts")
	}
	// READY=1, which Consul sends once it has joined the LAN pool.
	if err := c.StartAll(ctx, c.ServerMachines(), map[string]string{cluster.ConsulProduct: bin}, "consul"); err != nil {
		fail("%v", err)
	}

	anon := c.ConsulClient(c.Machines[0], "")
	leader, err := hashi.WaitConsulLeader(ctx, anon)
	if err != nil {
		fail("%v", err)
	}
	t.Logf("leader %s", leader)

	mgmt, err := hashi.BootstrapConsulACL(ctx, anon, st)
	if err != nil {
		fail("bootstrap: %v", err)
	}
	if mgmt != chosen {
		fail("the management token Consul accepts is not the one chosen before it started")
	}
	if again, err := hashi.BootstrapConsulACL(ctx, c.ConsulClient(c.Machines[2], ""), st); err != nil || again != mgmt {
		fail("second bootstrap: %v (same token: %v)", err, again == mgmt)
	}
	// A state directory without the token cannot take over a bootstrapped
	// Consul, and says why.
	if _, err := hashi.BootstrapConsulACL(ctx, anon, memStore{}); err == nil || !strings.Contains(err.Error(), "bootstrapped outside steppe") {
		fail("bootstrap from another state dir: %v", err)
	}
	admin := c.ConsulClient(c.Machines[1], mgmt)

	plan, err := cluster.ConsulACL(spec, st, c.Servers)
	if err != nil {
		t.Fatal(err)
	}
	if err := hashi.ApplyConsulACL(ctx, admin, plan); err != nil {
		fail("apply acl: %v", err)
	}
	before, _, err := admin.ACL().TokenList(nil)
	if err != nil {
		fail("token list: %v", err)
	}
	if err := hashi.ApplyConsulACL(ctx, admin, plan); err != nil {
		fail("apply acl again: %v", err)
	}
	after, _, err := admin.ACL().TokenList(nil)
	if err != nil {
		fail("token list: %v", err)
	}
	if len(after) != len(before) || len(after) != len(plan.Tokens)+2 { // + management, anonymous
		fail("tokens: %d before, %d after the second apply, %d planned", len(before), len(after), len(plan.Tokens))
	}
	for i := range after {
		if after[i].ModifyIndex != before[i].ModifyIndex {
			fail("second apply modified token %s", after[i].Description)
		}
	}

	// The agents' tokens from the machines' secrets work: each node
	// registers itself in the catalog (blocked by ACLs until then).
	err = hashi.Poll(ctx, "3 nodes in the catalog", func() (bool, error) {
		nodes, _, err := admin.Catalog().Nodes(nil)
		if err != nil {
			return false, err
		}
		if len(nodes) != 3 {
			return false, fmt.Errorf("%d nodes", len(nodes))
		}
		return true, nil
	})
	if err != nil {
		fail("%v", err)
	}

	members, err := hashi.ConsulMembers(admin)
	if err != nil {
		fail("%v", err)
	}
	alive := 0
	for _, m := range members {
		if m.Alive && m.Server {
			alive++
		}
	}
	if alive != 3 {
		fail("members %+v", members)
	}
	if _, err := hashi.WaitConsulHealthy(ctx, admin, 3); err != nil {
		fail("%v", err)
	}

	// Gossip is encrypted with the state directory's key, on every node.
	rings, err := admin.Operator().KeyringList(nil)
	if err != nil {
		fail("keyring: %v", err)
	}
	for _, r := range rings {
		if r.WAN {
			continue
		}
		if len(r.Keys) != 1 || r.Keys[st.ConsulGossipKey().Reveal()] != 3 {
			fail("LAN keyring %v: want the state's key on 3 nodes", len(r.Keys))
		}
	}

	// Refused: no token.
	if _, err := anon.KV().Put(&consulapi.KVPair{Key: "x", Value: []byte("y")}, nil); hashi.StatusCode(err) != http.StatusForbidden {
		fail("KV put without a token: %v, want 403", err)
	}
	if _, _, err := anon.ACL().TokenList(nil); hashi.StatusCode(err) != http.StatusForbidden {
		fail("token list without a token: %v, want 403", err)
	}
	// The anonymous token reads the catalog, which Consul 1.14's DNS
	// answers from, and nothing else: KV reads are filtered to nothing.
	if nodes, _, err := anon.Catalog().Nodes(nil); err != nil || len(nodes) != 3 {
		fail("catalog without a token: %d nodes, %v; want the 3 that DNS answers", len(nodes), err)
	}
	if _, err := admin.KV().Put(&consulapi.KVPair{Key: "steppe-test/secret", Value: []byte("y")}, nil); err != nil {
		fail("KV put with the management token: %v", err)
	}
	if kvs, _, err := anon.KV().List("steppe-test/", nil); err != nil || len(kvs) != 0 {
		fail("KV list without a token: %d keys, %v; want none", len(kvs), err)
	}

	// Refused: plaintext HTTP, on the HTTPS port and on the default one.
	addr := c.Servers[0].Address
	if resp, err := http.Get(fmt.Sprintf("http://%s:%d/v1/status/leader", addr, cluster.ConsulHTTPSPort)); err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			fail("plaintext HTTP answered 200: %s", body)
		}
		t.Logf("plaintext HTTP on the HTTPS port: %d %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	if conn, err := net.DialTimeout("tcp", addr+":8500", 5*time.Second); err == nil {
		conn.Close()
		fail("Consul listens on the plaintext port 8500")
	}

	// HTTPS asks for no client certificate (a browser opens the UI; the
	// token authorises): a request with none and the token succeeds.
	bare, err := hashi.ConsulClient(addr+":8501", hashi.TLSFiles{CAFile: st.CAFile()}, mgmt)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bare.Status().Leader(); err != nil {
		fail("HTTPS with the token and no client certificate: %v", err)
	}
	// Refused: a server the client does not trust.
	other, err := cluster.OpenState(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	oc, err := other.OperatorCert()
	if err != nil {
		t.Fatal(err)
	}
	for name, files := range map[string]hashi.TLSFiles{
		"other trust": {CAFile: other.CAFile(), CertFile: c.Op.CertFile, KeyFile: c.Op.KeyFile},
	} {
		refused, err := hashi.ConsulClient(addr+":8501", files, mgmt)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := refused.Status().Leader(); err == nil {
			fail("%s: the request succeeded", name)
		} else {
			t.Logf("%s: refused: %v", name, err)
		}
	}
	// RPC keeps mutual TLS: a client certificate of another CA is
	// refused at the TLS layer.
	checkTLSRefused(t, fmt.Sprintf("%s:%d", addr, cluster.ConsulRPCPort), consulRPCTLS, st.CACertPEM(), oc.CertFile, oc.KeyFile)

	// Least privilege: a Nomad client's token registers services, and
	// nothing else.
	nomadTok, _ := st.LookupToken(cluster.TokenNomadConsul(c.Servers[0].Name))
	srv := c.ConsulClient(c.Machines[0], nomadTok)
	if _, err := srv.KV().Put(&consulapi.KVPair{Key: "x", Value: []byte("y")}, nil); hashi.StatusCode(err) != http.StatusForbidden {
		fail("KV put with the Nomad server token: %v, want 403", err)
	}
	clientPlan := &cluster.ConsulACLPlan{}
	for _, tk := range plan.Tokens {
		if strings.HasPrefix(tk.Name, "consul/nomad/") {
			tk.Policies = []string{cluster.PolicyNomadClient}
			tk.Name, tk.Description = "test/nomad-client", "test: a Nomad client token"
			tk.SecretID = cluster.Secret("6f1b3c1e-1111-4222-8333-944455556666")
			clientPlan.Tokens = append(clientPlan.Tokens, tk)
			break
		}
	}
	if err := hashi.ApplyConsulACL(ctx, admin, clientPlan); err != nil {
		fail("%v", err)
	}
	cl := c.ConsulClient(c.Machines[0], clientPlan.Tokens[0].SecretID)
	// The token was created through another server: wait for it here.
	err = hashi.Poll(ctx, "register a service with a Nomad client token", func() (bool, error) {
		err := cl.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{Name: "web", Port: 8080})
		return err == nil, err
	})
	if err != nil {
		fail("%v", err)
	}
	if _, _, err := cl.ACL().TokenList(nil); hashi.StatusCode(err) != http.StatusForbidden {
		fail("token list with a Nomad client token: %v, want 403", err)
	}
	if _, err := cl.KV().Put(&consulapi.KVPair{Key: "x", Value: []byte("y")}, nil); hashi.StatusCode(err) != http.StatusForbidden {
		fail("KV put with a Nomad client token: %v, want 403", err)
	}

	// Nothing secret in the logs of the daemons either.
	for _, m := range c.ServerMachines() {
		for _, log := range m.LogFiles("consul") {
			b, err := os.ReadFile(log)
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range st.TokenNames() {
				s, _ := st.LookupToken(n)
				if strings.Contains(string(b), s.Reveal()) {
					t.Fatalf("%s/consul's log holds token %s", m.Name, n)
				}
			}
			if strings.Contains(string(b), st.ConsulGossipKey().Reveal()) {
				t.Fatalf("%s/consul's log holds the gossip key", m.Name)
			}
		}
	}
}

// The first byte of an RPC connection that asks for TLS (Consul's
// pool.RPCTLS, Nomad's pool.RpcTLS).
const (
	consulRPCTLS = 0x03
	nomadRPCTLS  = 0x04
)

// checkTLSRefused dials an RPC port, asks for TLS with the protocol byte
// rpcTLS, and checks that the server refuses a client certificate of
// another CA: in the handshake, or on the first read (TLS 1.3).
func checkTLSRefused(t *testing.T, addr string, rpcTLS byte, caPEM []byte, certFile, keyFile string) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", addr, err)
	}
	if _, err := raw.Write([]byte{rpcTLS}); err != nil {
		t.Fatalf("%s: %v", addr, err)
	}
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	conn := tls.Client(raw, &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: host})
	err = conn.Handshake()
	var verr *tls.CertificateVerificationError
	if errors.As(err, &verr) {
		// The client refusing the server proves nothing about the server.
		t.Fatalf("%s: the server's certificate does not verify: %v", addr, err)
	}
	if err != nil {
		raw.Close()
		return
	}
	defer conn.Close()
	// TLS 1.3 reports a rejected client certificate on the first read.
	buf := make([]byte, 64)
	_, err = conn.Read(buf)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("TLS with a foreign client certificate: read %q, err %v", buf, err)
	}
}

// memStore is an empty token store: another operator's state directory.
type memStore map[string]cluster.Secret

// Token gives another directory's own management secret, never this one's.
func (m memStore) Token(name string) (cluster.Secret, error) {
	return "5c1a0d5e-0000-4000-8000-00000000beef", nil
}
