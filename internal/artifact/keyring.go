package artifact

import (
	"bytes"
	"errors"
	"fmt"
	"os"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
)

// Keyring is a set of trusted OpenPGP public keys; a signature by any one
// of them is accepted.
type Keyring struct {
	entities openpgp.EntityList
}

// ReadKeyring parses one or more ASCII-armored public keys (concatenated
// armor blocks are accepted, as in a keyring file of several trusted keys).
func ReadKeyring(armored ...[]byte) (*Keyring, error) {
	var k Keyring
	for i, a := range armored {
		rest := a
		for len(bytes.TrimSpace(rest)) > 0 {
			block, err := armor.Decode(bytes.NewReader(rest))
			if err != nil {
				return nil, fmt.Errorf("keyring entry %d: %w", i, err)
			}
			el, err := openpgp.ReadKeyRing(block.Body)
			if err != nil {
				return nil, fmt.Errorf("keyring entry %d: %w", i, err)
			}
			k.entities = append(k.entities, el...)
			// armor.Decode consumes one block; find the next one.
			end := bytes.Index(rest, []byte("-----END PGP"))
			if end < 0 {
				break
			}
			nl := bytes.IndexByte(rest[end:], '\n')
			if nl < 0 {
				break
			}
			rest = rest[end+nl+1:]
		}
	}
	if len(k.entities) == 0 {
		return nil, errors.New("keyring: no public keys")
	}
	return &k, nil
}

// ReadKeyringFile reads ReadKeyring's input from files.
func ReadKeyringFile(paths ...string) (*Keyring, error) {
	var all [][]byte
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("keyring: %w", err)
		}
		all = append(all, b)
	}
	k, err := ReadKeyring(all...)
	if err != nil {
		return nil, fmt.Errorf("keyring %v: %w", paths, err)
	}
	return k, nil
}

// Fingerprints lists the trusted keys' fingerprints in hex.
func (k *Keyring) Fingerprints() []string {
	var fps []string
	for _, e := range k.entities {
		fps = append(fps, fmt.Sprintf("%X", e.PrimaryKey.Fingerprint))
	}
	return fps
}

// VerifyDetached checks a detached signature of data against the keyring
// and returns the signer's fingerprint.
func (k *Keyring) VerifyDetached(data, sig []byte) (string, error) {
	signer, err := openpgp.CheckDetachedSignature(k.entities, bytes.NewReader(data), bytes.NewReader(sig), nil)
	if err != nil {
		return "", fmt.Errorf("signature check: %w", err)
	}
	return fmt.Sprintf("%X", signer.PrimaryKey.Fingerprint), nil
}

// shortIDs lists the trusted keys' short key IDs (8 hex digits, upper
// case), which name the per-key signature files of a release.
func (k *Keyring) shortIDs() []string {
	var ids []string
	for _, e := range k.entities {
		ids = append(ids, e.PrimaryKey.KeyIdShortString())
	}
	return ids
}
