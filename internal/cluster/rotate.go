package cluster

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/steppe/steppe/internal/atomicfile"
)

// CertValidityEnv, when set to a Go duration ("480h"), is the validity of
// the node and operator certificates a State issues. It is for tests
// only: they need certificates close to expiry that status flags and
// `steppe rotate certs` renews. The CA is not affected.
const CertValidityEnv = "STEPPE_CERT_VALIDITY"

// ExpiryWarning is how long before a certificate expires status calls
// it a problem (renewed by `steppe rotate certs`).
const ExpiryWarning = 30 * 24 * time.Hour

func certValidityFromEnv() (time.Duration, error) {
	v := os.Getenv(CertValidityEnv)
	if v == "" {
		return certValidity, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < time.Hour {
		return 0, fmt.Errorf("%s=%q: want a duration of an hour or more, such as 480h (it is for tests: unset it)", CertValidityEnv, v)
	}
	return d, nil
}

// issuedBefore says whether cert was issued before since (zero: never).
// Certificates are issued with NotBefore a minute in the past.
func issuedBefore(cert *x509.Certificate, since time.Time) bool {
	return !since.IsZero() && cert.NotBefore.Add(time.Minute).Before(since.Truncate(time.Second))
}

// RotateNodeCert issues machine m a new certificate from the same CA
// unless it got one at or after since (the start of the rotation, so
// that a resumed rotation keeps what it issued).
func (s *State) RotateNodeCert(spec *Spec, m Machine, since time.Time) (*KeyPair, error) {
	return s.certificate(filepath.Join(nodesDir, m.Name), NodeCertRequest(spec, m), since)
}

// RotateOperatorCert is RotateNodeCert for the operator's certificate.
func (s *State) RotateOperatorCert(since time.Time) (*KeyPair, error) {
	return s.certificate(operatorDir, operatorCertRequest(), since)
}

// CertInfo is one certificate the state directory holds.
type CertInfo struct {
	// Name is "CA", "operator" or the machine's name.
	Name     string    `json:"name"`
	File     string    `json:"file"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	CA       bool      `json:"ca,omitempty"`
}

// Certificates lists the CA, the operator's certificate and every node
// certificate issued, by name (the CA first).
func (s *State) Certificates() ([]CertInfo, error) {
	out := []CertInfo{{Name: "CA", File: s.CAFile(), Serial: s.caCert.SerialNumber.Text(16), NotAfter: s.caCert.NotAfter, CA: true}}
	add := func(name, path string) error {
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("certificate %s: %w", name, err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			return fmt.Errorf("certificate %s: %s holds no PEM certificate", name, path)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return fmt.Errorf("certificate %s (%s): %w", name, path, err)
		}
		out = append(out, CertInfo{Name: name, File: path, Serial: c.SerialNumber.Text(16), NotAfter: c.NotAfter})
		return nil
	}
	if err := add("operator", filepath.Join(s.dir, operatorDir, "cert.pem")); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Join(s.dir, nodesDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	for _, n := range names {
		if err := add(n, filepath.Join(s.dir, nodesDir, n, "cert.pem")); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Gossip key rotation. The new key is kept in "<key file>.next" until it
// is the daemons' primary key everywhere; a rotation that was cut short
// finds it there and goes on with the same key.

// Products whose gossip keys the state holds.
const (
	GossipConsul = "consul"
	GossipNomad  = "nomad"
)

func gossipFile(product string) (string, error) {
	switch product {
	case GossipConsul:
		return consulGossipKey, nil
	case GossipNomad:
		return nomadGossipKey, nil
	}
	return "", fmt.Errorf("gossip key: unknown product %q (consul or nomad)", product)
}

// NextGossipKey is the key a rotation of product's gossip key installs:
// the one a cut-short rotation made, else a new one.
func (s *State) NextGossipKey(product string) (Secret, error) {
	name, err := gossipFile(product)
	if err != nil {
		return "", err
	}
	var k Secret
	err = s.locked(func() error {
		var err error
		k, err = s.loadOrCreateGossip(name + ".next")
		return err
	})
	return k, err
}

// PromoteGossipKey makes the next key of product its key (what machines
// get in their secrets from now on) once every daemon uses it.
func (s *State) PromoteGossipKey(product string) error {
	name, err := gossipFile(product)
	if err != nil {
		return err
	}
	return s.locked(func() error {
		next := filepath.Join(s.dir, name+".next")
		k, err := s.loadOrCreateGossip(name + ".next")
		if err != nil {
			return err
		}
		if err := os.Rename(next, filepath.Join(s.dir, name)); err != nil {
			return fmt.Errorf("gossip key: %w", err)
		}
		if err := atomicfile.SyncDir(s.dir); err != nil {
			return fmt.Errorf("gossip key: %w", err)
		}
		if product == GossipConsul {
			s.consulGossip = k
		} else {
			s.nomadGossip = k
		}
		return nil
	})
}

// PendingGossipKey says whether a rotation of product's key is under way.
func (s *State) PendingGossipKey(product string) bool {
	name, err := gossipFile(product)
	if err != nil {
		return false
	}
	_, err = os.Stat(filepath.Join(s.dir, name+".next"))
	return err == nil
}

// GossipKeyValid says whether k is a gossip key (base64 of 16, 24 or 32
// bytes), as both daemons accept.
func GossipKeyValid(k string) bool {
	raw, err := base64.StdEncoding.DecodeString(k)
	return err == nil && (len(raw) == 16 || len(raw) == 24 || len(raw) == 32)
}

// Token rotation: the token's old secret is kept under
// PreviousTokenName(name) until the daemons use the new one and the old
// is deleted from them.

// PreviousTokenName names the secret a token rotation replaced.
func PreviousTokenName(name string) string { return name + "#previous" }

// BeginTokenRotation gives the token name a new secret and keeps the old
// one under PreviousTokenName(name). A rotation begun before (the previous
// secret is still kept) is left as it is, so a resumed rotation does not
// lose the secret the daemons still use.
func (s *State) BeginTokenRotation(name string) (Secret, error) {
	err := s.locked(func() error {
		if err := s.readTokens(); err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.tokens[PreviousTokenName(name)]; ok {
			return nil
		}
		old, ok := s.tokens[name]
		if !ok {
			return fmt.Errorf("no token %s in %s to rotate (run steppe up)", name, s.dir)
		}
		u, err := newUUID()
		if err != nil {
			return err
		}
		s.tokens[PreviousTokenName(name)] = old
		s.tokens[name] = Secret(u)
		return s.writeTokens()
	})
	if err != nil {
		return "", fmt.Errorf("rotate token %s: %w", name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tokens[name], nil
}
