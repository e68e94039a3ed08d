package artifact

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/packet"

	"github.com/steppe/steppe/internal/atomicfile"
)

func pgpConfig() *packet.Config {
	return &packet.Config{Algorithm: packet.PubKeyAlgoEdDSA}
}

// loadOrCreateKey reads the store's signing key from path, creating it on
// first use. The key is written under a temporary name, synced, and linked
// into place (atomicfile.Pending.CommitNew), so two builders starting at
// once agree on one key and a crash leaves no empty key file behind.
func loadOrCreateKey(path string) (*openpgp.Entity, error) {
	e, err := readPrivateKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return e, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("store key: %w", err)
	}
	ent, err := openpgp.NewEntity("steppe artifact store", "built from Go module sources", "", pgpConfig())
	if err != nil {
		return nil, fmt.Errorf("store key: generate: %w", err)
	}
	var buf bytes.Buffer
	w, err := armor.Encode(&buf, openpgp.PrivateKeyType, nil)
	if err != nil {
		return nil, err
	}
	if err := ent.SerializePrivate(w, pgpConfig()); err != nil {
		return nil, fmt.Errorf("store key: serialize: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	p, err := atomicfile.Create(path, 0o600, func(w io.Writer) error {
		_, err := w.Write(buf.Bytes())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("store key: %w", err)
	}
	defer p.Discard()
	// Linked, not renamed, into place: a builder that lost the race reads
	// the winner's key.
	if err := p.CommitNew(); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("store key: %w", err)
	}
	return readPrivateKey(path)
}

func readPrivateKey(path string) (*openpgp.Entity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("store key: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("store key %s: mode %v lets others read the private key; want 0600", path, st.Mode().Perm())
	}
	el, err := openpgp.ReadArmoredKeyRing(f)
	if err != nil {
		return nil, fmt.Errorf("store key %s: %w", path, err)
	}
	if len(el) != 1 || el[0].PrivateKey == nil {
		return nil, fmt.Errorf("store key %s: want exactly one private key", path)
	}
	return el[0], nil
}

// armoredPublicKey exports the public half of a key.
func armoredPublicKey(e *openpgp.Entity) ([]byte, error) {
	var buf bytes.Buffer
	w, err := armor.Encode(&buf, openpgp.PublicKeyType, nil)
	if err != nil {
		return nil, err
	}
	if err := e.Serialize(w); err != nil {
		return nil, fmt.Errorf("export public key: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

// signDetached makes a binary detached OpenPGP signature of data, the form
// of HashiCorp's PRODUCT_VERSION_SHA256SUMS.sig.
func signDetached(e *openpgp.Entity, data []byte) ([]byte, error) {
	var sig bytes.Buffer
	if err := openpgp.DetachSign(&sig, e, bytes.NewReader(data), pgpConfig()); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return sig.Bytes(), nil
}

// keyringOf is the keyring of one entity's public half.
func keyringOf(e *openpgp.Entity) (*Keyring, error) {
	pub, err := armoredPublicKey(e)
	if err != nil {
		return nil, err
	}
	return ReadKeyring(pub)
}
