package cluster

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/steppe/steppe/internal/atomicfile"
)

// Validity of what the state directory issues. NodeCert reissues a
// certificate only once it has expired: renewing one before is the work
// of `steppe rotate certs` (status warns ExpiryWarning ahead), which
// delivers it with a reload instead of a restart.
const (
	caValidity   = 10 * 365 * 24 * time.Hour
	certValidity = 365 * 24 * time.Hour
)

// Files of the state directory, relative to it.
const (
	caCertFile      = "ca.pem"
	caKeyFile       = "ca-key.pem"
	consulGossipKey = "consul-gossip.key"
	nomadGossipKey  = "nomad-gossip.key"
	tokensFile      = "tokens.json"
	lockFile        = ".lock"
	nodesDir        = "nodes"
	operatorDir     = "operator"
)

// State is the operator's state directory: the cluster CA, the gossip keys,
// the ACL tokens and the certificates issued to machines and to the
// operator's CLIs. The directory is 0700 and every file in it 0600, written
// atomically. Opening an existing directory reuses everything in it; a CA
// that exists is never regenerated.
//
// Several steppe processes may share a state directory: every change is
// made under an exclusive flock and re-reads what it updates.
type State struct {
	dir string

	caCert    *x509.Certificate
	caCertPEM []byte
	caKey     *ecdsa.PrivateKey

	consulGossip Secret
	nomadGossip  Secret

	mu     sync.Mutex
	tokens map[string]Secret

	// validity of the certificates issued (CertValidityEnv, else
	// certValidity).
	validity time.Duration
}

// OpenState opens the state directory dir, creating it and its CA and
// gossip keys when absent.
func OpenState(dir string) (*State, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	if err := checkPrivateDir(dir); err != nil {
		return nil, err
	}
	s := &State{dir: dir, tokens: map[string]Secret{}}
	if s.validity, err = certValidityFromEnv(); err != nil {
		return nil, err
	}
	err = s.locked(func() error {
		if err := s.loadOrCreateCA(); err != nil {
			return err
		}
		var err error
		if s.consulGossip, err = s.loadOrCreateGossip(consulGossipKey); err != nil {
			return err
		}
		if s.nomadGossip, err = s.loadOrCreateGossip(nomadGossipKey); err != nil {
			return err
		}
		return s.readTokens()
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Dir is the absolute path of the state directory.
func (s *State) Dir() string { return s.dir }

// CACertPEM is the cluster CA certificate (public).
func (s *State) CACertPEM() []byte { return slices.Clone(s.caCertPEM) }

// CAFile is the path of the CA certificate, for the CLIs' -ca-file.
func (s *State) CAFile() string { return filepath.Join(s.dir, caCertFile) }

// ConsulGossipKey is Consul's `encrypt` key.
func (s *State) ConsulGossipKey() Secret { return s.consulGossip }

// NomadGossipKey is the Nomad servers' `encrypt` key.
func (s *State) NomadGossipKey() Secret { return s.nomadGossip }

// checkPrivateDir refuses a state directory others can read once it holds
// secrets: silently tightening it would hide that they were exposed. A
// directory without secrets yet (made by mkdir) is tightened to 0700.
func checkPrivateDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("state dir %s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if len(entries) == 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("state dir: %w", err)
		}
		return nil
	}
	return fmt.Errorf("state dir %s has mode %04o: it holds the cluster CA key and tokens, so only its owner may use it (chmod 700 %s after checking who read it)", dir, fi.Mode().Perm(), dir)
}

// locked runs f under an exclusive flock of the state directory.
func (s *State) locked(f func() error) error {
	lf, err := os.OpenFile(filepath.Join(s.dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("lock state dir: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock state dir %s: %w", s.dir, err)
	}
	defer syscall.Flock(int(lf.Fd()), syscall.LOCK_UN)
	return f()
}

// writeFile writes a 0600 file atomically: a reader sees the old content
// or the new, never a part, and a crash leaves no half-written key.
func writeFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := atomicfile.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// readPrivate reads a file that must be the owner's alone.
func readPrivate(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %04o: secrets must be 0600", path, fi.Mode().Perm())
	}
	return os.ReadFile(path)
}

func (s *State) loadOrCreateCA() error {
	certPath, keyPath := filepath.Join(s.dir, caCertFile), filepath.Join(s.dir, caKeyFile)
	certPEM, cerr := readPrivate(certPath)
	keyPEM, kerr := readPrivate(keyPath)
	switch {
	case cerr == nil && kerr == nil:
		cert, key, err := parsePair(certPEM, keyPEM)
		if err != nil {
			return fmt.Errorf("state dir CA (%s): %w", certPath, err)
		}
		if !cert.IsCA {
			return fmt.Errorf("state dir CA %s is not a CA certificate", certPath)
		}
		s.caCert, s.caCertPEM, s.caKey = cert, certPEM, key
		return nil
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
		// A new state directory.
	case cerr != nil && !errors.Is(cerr, fs.ErrNotExist):
		return fmt.Errorf("state dir CA: %w", cerr)
	case kerr != nil && !errors.Is(kerr, fs.ErrNotExist):
		return fmt.Errorf("state dir CA key: %w", kerr)
	default:
		// One half exists: generating a new CA would orphan every issued
		// certificate, so refuse and let the operator decide.
		return fmt.Errorf("state dir %s has only one of %s and %s: restore the missing one (a new CA would invalidate every machine's certificate)", s.dir, caCertFile, caKeyFile)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "steppe cluster CA", Organization: []string{"steppe"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("create CA certificate: %w", err)
	}
	keyPEM, err = marshalKey(key)
	if err != nil {
		return err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	// The key first: a certificate without its key is the state the check
	// above refuses, a key without a certificate too, but only a crash
	// between the two writes can produce either.
	if err := writeFile(keyPath, keyPEM); err != nil {
		return err
	}
	if err := writeFile(certPath, certPEM); err != nil {
		return err
	}
	s.caCert, s.caCertPEM, s.caKey = cert, certPEM, key
	return nil
}

func (s *State) loadOrCreateGossip(name string) (Secret, error) {
	path := filepath.Join(s.dir, name)
	b, err := readPrivate(path)
	if err == nil {
		k := bytes.TrimSpace(b)
		raw, err := base64.StdEncoding.DecodeString(string(k))
		if err != nil || len(raw) != 32 {
			return "", fmt.Errorf("gossip key %s is not 32 bytes of base64", path)
		}
		return Secret(k), nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("gossip key: %w", err)
	}
	// 32 bytes (AES-256): what `consul keygen` and `nomad operator gossip
	// keyring generate` produce; both accept 16, 24 or 32.
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("generate gossip key: %w", err)
	}
	k := base64.StdEncoding.EncodeToString(raw)
	if err := writeFile(path, []byte(k+"\n")); err != nil {
		return "", err
	}
	return Secret(k), nil
}

func (s *State) readTokens() error {
	b, err := readPrivate(filepath.Join(s.dir, tokensFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tokens: %w", err)
	}
	var m map[string]string
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("tokens %s: %w", filepath.Join(s.dir, tokensFile), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, v := range m {
		s.tokens[k] = Secret(v)
	}
	return nil
}

func (s *State) writeTokens() error {
	m := make(map[string]string, len(s.tokens))
	for k, v := range s.tokens {
		m[k] = v.Reveal()
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("tokens: %w", err)
	}
	return writeFile(filepath.Join(s.dir, tokensFile), append(b, '\n'))
}

// Token names one ACL token kept in the state directory. The names are
// steppe's (see the Token* functions), not the daemons'.
//
// Token returns the token called name, creating a random UUID secret when
// absent. Consul and Nomad accept a caller-chosen secret at ACL bootstrap
// and Consul at token creation, so every token a machine needs is known
// before the cluster exists and can be delivered with the machine.
func (s *State) Token(name string) (Secret, error) {
	s.mu.Lock()
	t, ok := s.tokens[name]
	s.mu.Unlock()
	if ok {
		return t, nil
	}
	err := s.locked(func() error {
		// Another process may have made it since we read the file.
		if err := s.readTokens(); err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.tokens[name]; ok {
			return nil
		}
		u, err := newUUID()
		if err != nil {
			return err
		}
		s.tokens[name] = Secret(u)
		return s.writeTokens()
	})
	if err != nil {
		return "", fmt.Errorf("token %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tokens[name], nil
}

// LookupToken returns the token called name if the state directory has it.
func (s *State) LookupToken(name string) (Secret, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tokens[name]
	return t, ok
}

// TokenNames lists the tokens held, sorted.
func (s *State) TokenNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.tokens))
	for k := range s.tokens {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// DeleteToken forgets the token called name (after it was revoked).
func (s *State) DeleteToken(name string) error {
	return s.locked(func() error {
		if err := s.readTokens(); err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.tokens, name)
		return s.writeTokens()
	})
}

func newUUID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:]), nil
}

// KeyPair is a certificate and its key, as PEM and as the files in the
// state directory that hold them.
type KeyPair struct {
	CertPEM  []byte
	KeyPEM   Secret
	CertFile string
	KeyFile  string
}

// CertRequest says what a certificate must name.
type CertRequest struct {
	CommonName string
	DNSNames   []string
	IPs        []net.IP
	// Server adds server authentication; every certificate can
	// authenticate as a client because Consul and Nomad agents dial each
	// other with mutual TLS.
	Server bool
}

// NodeCert returns the certificate of the machine m, issuing it when
// absent, when its names differ from what m needs now (an address
// changed), when it has expired or when it is not from this CA (renewal
// before expiry is steppe rotate certs).
func (s *State) NodeCert(spec *Spec, m Machine) (*KeyPair, error) {
	return s.certificate(filepath.Join(nodesDir, m.Name), NodeCertRequest(spec, m), time.Time{})
}

// OperatorCert returns the client certificate of the operator's CLIs
// (nomad, consul): both verify client certificates on their HTTPS APIs.
func (s *State) OperatorCert() (*KeyPair, error) {
	return s.certificate(operatorDir, operatorCertRequest(), time.Time{})
}

func operatorCertRequest() CertRequest { return CertRequest{CommonName: "steppe operator"} }

// NodeCertRequest is what the certificate of machine m names: the names
// Consul and Nomad verify with verify_server_hostname (server.<dc>.consul,
// server.<region>.nomad, client.<region>.nomad), the conventional
// client.<dc>.consul, the machine's name and its own address. Not
// localhost or 127.0.0.1: on the local provider every machine shares them,
// so a certificate naming them would let any machine's key pass for any
// other's there; every daemon is reached on its machine's own address.
func NodeCertRequest(spec *Spec, m Machine) CertRequest {
	r := CertRequest{CommonName: m.Name, Server: true}
	if m.Role == RoleServer {
		r.DNSNames = []string{"server." + spec.Datacenter + ".consul", "server." + spec.Region + ".nomad"}
	} else {
		r.DNSNames = []string{"client." + spec.Datacenter + ".consul", "client." + spec.Region + ".nomad"}
	}
	r.DNSNames = append(r.DNSNames, m.Name)
	if ip := net.ParseIP(m.Address); ip != nil {
		if v4 := ip.To4(); v4 != nil {
			ip = v4
		}
		r.IPs = []net.IP{ip}
	}
	return r
}

// certificate returns the certificate at rel, issuing it anew when it
// does not fit req or was issued before issuedSince (a rotation: one
// issued since it began is kept, so a resumed rotation issues no second).
func (s *State) certificate(rel string, req CertRequest, issuedSince time.Time) (*KeyPair, error) {
	certPath := filepath.Join(s.dir, rel, "cert.pem")
	keyPath := filepath.Join(s.dir, rel, "key.pem")
	var kp *KeyPair
	err := s.locked(func() error {
		if certPEM, err := readPrivate(certPath); err == nil {
			if keyPEM, err := readPrivate(keyPath); err == nil {
				if cert, _, err := parsePair(certPEM, keyPEM); err == nil && s.certFits(cert, req) && !issuedBefore(cert, issuedSince) {
					kp = &KeyPair{CertPEM: certPEM, KeyPEM: Secret(keyPEM), CertFile: certPath, KeyFile: keyPath}
					return nil
				}
			}
		}
		certPEM, keyPEM, err := s.issue(req)
		if err != nil {
			return err
		}
		if err := writeFile(keyPath, keyPEM); err != nil {
			return err
		}
		if err := writeFile(certPath, certPEM); err != nil {
			return err
		}
		kp = &KeyPair{CertPEM: certPEM, KeyPEM: Secret(keyPEM), CertFile: certPath, KeyFile: keyPath}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", rel, err)
	}
	return kp, nil
}

// certFits says whether an existing certificate can be kept for req.
func (s *State) certFits(cert *x509.Certificate, req CertRequest) bool {
	if cert.CheckSignatureFrom(s.caCert) != nil {
		return false
	}
	if time.Now().After(cert.NotAfter) {
		return false
	}
	if cert.Subject.CommonName != req.CommonName || !slices.Equal(cert.DNSNames, req.DNSNames) || len(cert.IPAddresses) != len(req.IPs) {
		return false
	}
	for i, ip := range req.IPs {
		if !cert.IPAddresses[i].Equal(ip) {
			return false
		}
	}
	return slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageServerAuth) == req.Server
}

func (s *State) issue(req CertRequest) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	now := time.Now()
	eku := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if req.Server {
		eku = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: req.CommonName, Organization: []string{"steppe"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(s.validity),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           eku,
		BasicConstraintsValid: true,
		DNSNames:              req.DNSNames,
		IPAddresses:           req.IPs,
		SubjectKeyId:          keyID(&key.PublicKey),
		AuthorityKeyId:        s.caCert.SubjectKeyId,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.caCert, &key.PublicKey, s.caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sign certificate: %w", err)
	}
	keyPEM, err = marshalKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

func marshalKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func parsePair(certPEM, keyPEM []byte) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, nil, errors.New("no PEM certificate")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, nil, errors.New("no PEM key")
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&key.PublicKey) {
		return nil, nil, errors.New("the key does not match the certificate")
	}
	return cert, key, nil
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		// crypto/rand does not fail on Linux (getrandom); a zero serial
		// would be a silent collision, so fail loudly.
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	return n.Add(n, big.NewInt(1))
}

func keyID(pub *ecdsa.PublicKey) []byte {
	b, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil
	}
	h := sha1.Sum(b)
	return h[:]
}

// SetToken keeps a token learned from a daemon (Consul's bootstrap token)
// under name.
func (s *State) SetToken(name string, v Secret) error {
	err := s.locked(func() error {
		if err := s.readTokens(); err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.tokens[name] = v
		return s.writeTokens()
	})
	if err != nil {
		return fmt.Errorf("token %s: %w", name, err)
	}
	return nil
}
