package bundle

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/steppe/steppe/internal/atomicfile"
)

// PEM block types of key files.
const (
	privatePEMType = "STEPPE BUNDLE PRIVATE KEY"
	publicPEMType  = "STEPPE BUNDLE PUBLIC KEY"
)

// signContext is prepended to the manifest bytes before signing so that a
// bundle signature can never be mistaken for a signature over anything else
// made with the same key.
const signContext = "steppe bundle manifest v1\n"

// PublicKey is a trusted bundle signing key.
type PublicKey struct {
	ID  string // KeyID of Key
	Key ed25519.PublicKey
}

// PrivateKey signs bundles.
type PrivateKey struct {
	ID  string
	Key ed25519.PrivateKey
}

// Public returns the public half.
func (k PrivateKey) Public() PublicKey {
	pub := k.Key.Public().(ed25519.PublicKey)
	return PublicKey{ID: KeyID(pub), Key: pub}
}

// KeyID names a public key: the first 16 hex digits of its SHA-256.
func KeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:8])
}

// GenerateKey makes a new signing key.
func GenerateKey() (PrivateKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return PrivateKey{}, fmt.Errorf("generate key: %w", err)
	}
	return PrivateKey{ID: KeyID(priv.Public().(ed25519.PublicKey)), Key: priv}, nil
}

// MarshalPrivateKey encodes a private key as PEM (the 32-byte seed).
func MarshalPrivateKey(k PrivateKey) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: privatePEMType, Headers: map[string]string{"Key-Id": k.ID}, Bytes: k.Key.Seed()})
}

// MarshalPublicKey encodes a public key as PEM.
func MarshalPublicKey(k PublicKey) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: publicPEMType, Headers: map[string]string{"Key-Id": k.ID}, Bytes: k.Key})
}

// ParsePrivateKey decodes MarshalPrivateKey's output.
func ParsePrivateKey(b []byte) (PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != privatePEMType || len(blk.Bytes) != ed25519.SeedSize {
		return PrivateKey{}, fmt.Errorf("not a steppe bundle private key (want a PEM block %q of %d bytes)", privatePEMType, ed25519.SeedSize)
	}
	priv := ed25519.NewKeyFromSeed(blk.Bytes)
	return PrivateKey{ID: KeyID(priv.Public().(ed25519.PublicKey)), Key: priv}, nil
}

// ParsePublicKey decodes MarshalPublicKey's output.
func ParsePublicKey(b []byte) (PublicKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != publicPEMType || len(blk.Bytes) != ed25519.PublicKeySize {
		return PublicKey{}, fmt.Errorf("not a steppe bundle public key (want a PEM block %q of %d bytes)", publicPEMType, ed25519.PublicKeySize)
	}
	pub := ed25519.PublicKey(bytes.Clone(blk.Bytes))
	return PublicKey{ID: KeyID(pub), Key: pub}, nil
}

// ReadPrivateKeyFile reads a private key, refusing a file that others can
// read.
func ReadPrivateKeyFile(name string) (PrivateKey, error) {
	fi, err := os.Stat(name)
	if err != nil {
		return PrivateKey{}, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return PrivateKey{}, fmt.Errorf("private key %s: mode %04o lets others read it; chmod 600 it", name, fi.Mode().Perm())
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return PrivateKey{}, err
	}
	k, err := ParsePrivateKey(b)
	if err != nil {
		return PrivateKey{}, fmt.Errorf("private key %s: %w", name, err)
	}
	return k, nil
}

// ReadPublicKeyFiles reads trusted public keys.
func ReadPublicKeyFiles(names ...string) ([]PublicKey, error) {
	var keys []PublicKey
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			return nil, err
		}
		k, err := ParsePublicKey(b)
		if err != nil {
			return nil, fmt.Errorf("public key %s: %w", n, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// WriteKeyPair writes base+".key" (mode 0600) and base+".pub" (mode 0644).
// It refuses to overwrite an existing key.
func WriteKeyPair(base string, k PrivateKey) (privName, pubName string, err error) {
	privName, pubName = base+".key", base+".pub"
	if err := os.MkdirAll(filepath.Dir(base), 0o755); err != nil {
		return "", "", err
	}
	f, err := os.OpenFile(privName, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", "", fmt.Errorf("write private key: %w", err)
	}
	if _, err := f.Write(MarshalPrivateKey(k)); err != nil {
		f.Close()
		return "", "", fmt.Errorf("write private key: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", "", fmt.Errorf("write private key: %w", err)
	}
	if err := atomicfile.WriteFile(pubName, MarshalPublicKey(k.Public()), 0o644); err != nil {
		return "", "", fmt.Errorf("write public key: %w", err)
	}
	return privName, pubName, nil
}

// signature is the content of manifest.sig.
type signature struct {
	KeyID     string `json:"key_id"`
	Signature string `json:"signature"` // base64 (standard, padded)
}

// Sign returns the content of manifest.sig for the manifest bytes.
func Sign(k PrivateKey, manifest []byte) []byte {
	sig := ed25519.Sign(k.Key, signedMessage(manifest))
	b, _ := json.Marshal(signature{KeyID: k.ID, Signature: base64.StdEncoding.EncodeToString(sig)})
	return append(b, '\n')
}

// ErrUnsigned means a bundle carries no signature.
var ErrUnsigned = errors.New("bundle is not signed")

// ErrUntrustedKey means a bundle was signed by a key the reader does not
// trust (or its signature verifies with none of the trusted keys and names
// none of them).
var ErrUntrustedKey = errors.New("signature: not made by any trusted key")

// ErrBadSignature means a bundle names a trusted key as its signer but
// the signature does not verify with it: the manifest or the signature
// was changed after signing.
var ErrBadSignature = errors.New("signature does not verify")

// VerifySignature checks sig (the content of manifest.sig) over the
// manifest bytes against the trusted keys and returns the id of the key
// that signed.
func VerifySignature(keys []PublicKey, manifest, sig []byte) (string, error) {
	if len(keys) == 0 {
		return "", fmt.Errorf("signature: no trusted keys given")
	}
	var s signature
	dec := json.NewDecoder(bytes.NewReader(sig))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return "", fmt.Errorf("signature %s: %w", SignatureName, err)
	}
	raw, err := base64.StdEncoding.DecodeString(s.Signature)
	if err != nil || len(raw) != ed25519.SignatureSize {
		return "", fmt.Errorf("signature %s: not a base64 Ed25519 signature", SignatureName)
	}
	msg := signedMessage(manifest)
	// The key id only picks the key to try first and words the error;
	// trust comes from the signature check, so every trusted key is tried.
	named := -1
	for i, k := range keys {
		if k.ID == s.KeyID {
			named = i
			if ed25519.Verify(k.Key, msg, raw) {
				return k.ID, nil
			}
		}
	}
	for _, k := range keys {
		if ed25519.Verify(k.Key, msg, raw) {
			return k.ID, nil
		}
	}
	if named >= 0 {
		return "", fmt.Errorf("%w with key %s: the bundle was changed after signing (its %s or %s); build and sign it again", ErrBadSignature, keys[named].ID, ManifestName, SignatureName)
	}
	return "", fmt.Errorf("%w: signed with key %q; the trusted keys are %s (sign with one of them, or add the signer's public key to the trusted ones)", ErrUntrustedKey, s.KeyID, keyIDs(keys))
}

func keyIDs(keys []PublicKey) string {
	var b bytes.Buffer
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(k.ID)
	}
	return b.String()
}

func signedMessage(manifest []byte) []byte {
	msg := make([]byte, 0, len(signContext)+len(manifest))
	return append(append(msg, signContext...), manifest...)
}
