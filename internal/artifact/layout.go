package artifact

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
)

// The store has the layout of releases.hashicorp.com:
//
//	DIR/steppe-store.asc                          public key of the store
//	DIR/PRODUCT/index.json                        ProductIndex (discovery only)
//	DIR/PRODUCT/VERSION/index.json                VersionIndex (discovery only)
//	DIR/PRODUCT/VERSION/PRODUCT_VERSION_OS_ARCH.zip
//	DIR/PRODUCT/VERSION/PRODUCT_VERSION_SHA256SUMS
//	DIR/PRODUCT/VERSION/PRODUCT_VERSION_SHA256SUMS.sig
//	DIR/PRODUCT/VERSION/PRODUCT_VERSION_SHA256SUMS.KEYID.sig  (per key, optional)
//
// Every name is derived from product, version, OS and architecture, as
// HashiCorp's hc-install does; the indexes are unsigned, so the agent never
// reads a name from them, and a store can be served under any address and
// prefix.

// StoreKeyFile is the name of the store's public key, exported at the
// root of every store it signs.
const StoreKeyFile = "steppe-store.asc"

func archiveName(product, version, goos, arch string) string {
	return fmt.Sprintf("%s_%s_%s_%s.zip", product, version, goos, arch)
}

func shasumsName(product, version string) string {
	return fmt.Sprintf("%s_%s_SHA256SUMS", product, version)
}

// signatureNames are the detached signatures of a SHA256SUMS file to try:
// the default one, then one per trusted key named by its short key ID
// (PRODUCT_VERSION_SHA256SUMS.72D7468F.sig), which the release site
// publishes beside the default while it rotates keys.
func signatureNames(sums string, keyIDs []string) []string {
	names := []string{sums + ".sig"}
	seen := map[string]bool{names[0]: true}
	for _, id := range keyIDs {
		n := sums + "." + id + ".sig"
		if !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	return names
}

// checkName fails unless s may be a product, OS or architecture: it becomes
// a path element and part of file names, so only [a-z0-9_-] pass.
func checkName(what, s string) error {
	if s == "" || strings.Trim(s, "abcdefghijklmnopqrstuvwxyz0123456789_-") != "" || s[0] == '-' || s[0] == '_' {
		return fmt.Errorf("%s %q: want lower-case letters, digits, '-' and '_'", what, s)
	}
	return nil
}

// normalizeVersion accepts "1.9.3" or "v1.9.3" and returns "1.9.3". Only
// release versions (with pre-release or metadata parts like 1.10.0-beta.1
// and 1.9.3+ent) are accepted: the version becomes a path element and a
// module query, so nothing else may pass.
func normalizeVersion(v string) (string, error) {
	v = strings.TrimPrefix(v, "v")
	rest, meta, hasMeta := strings.Cut(v, "+") // build metadata, e.g. 1.9.3+ent
	if hasMeta && (meta == "" || strings.Trim(meta, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.") != "") {
		return "", fmt.Errorf("version %q: bad build metadata", v)
	}
	core, pre, _ := strings.Cut(rest, "-")
	parts := strings.Split(core, ".")
	if len(parts) != 3 {
		return "", fmt.Errorf("version %q: want MAJOR.MINOR.PATCH", v)
	}
	for _, p := range parts {
		if p == "" || strings.Trim(p, "0123456789") != "" {
			return "", fmt.Errorf("version %q: want MAJOR.MINOR.PATCH", v)
		}
	}
	if strings.Trim(pre, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.") != "" {
		return "", fmt.Errorf("version %q: bad pre-release part", v)
	}
	return v, nil
}

// lookupSum finds the hex SHA-256 of file in a SHA256SUMS text.
func lookupSum(sums []byte, file string) (string, error) {
	for _, line := range strings.Split(string(sums), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && strings.TrimPrefix(f[1], "*") == file {
			if len(f[0]) != 64 || strings.Trim(strings.ToLower(f[0]), "0123456789abcdef") != "" {
				return "", fmt.Errorf("SHA256SUMS: malformed digest for %s", file)
			}
			return strings.ToLower(f[0]), nil
		}
	}
	return "", fmt.Errorf("SHA256SUMS lists no %s", file)
}

// sumsFiles lists the file names a SHA256SUMS text holds.
func sumsFiles(sums []byte) []string {
	var names []string
	for _, line := range strings.Split(string(sums), "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			names = append(names, strings.TrimPrefix(f[1], "*"))
		}
	}
	return names
}

func sha256File(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
