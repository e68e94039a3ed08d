package artifact

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The operator's build cache; cache.go has its layout.

// DefaultStoreDir is the store inside a cache directory.
func DefaultStoreDir(cacheDir string) string { return filepath.Join(cacheDir, "store") }

func binDir(cacheDir, product, version string) string {
	return filepath.Join(cacheDir, "bin", product, version)
}

func workDir(cacheDir, product, version string) string {
	return filepath.Join(cacheDir, "build", product, version)
}

func keyFile(cacheDir string) string { return filepath.Join(cacheDir, "keys", "store-key.asc") }

// BinaryPath returns the extracted, ready-to-run binary of a version built
// into cacheDir, or an error saying how to build it.
func BinaryPath(cacheDir, product, version string) (string, error) {
	if _, err := lookupProduct(product); err != nil {
		return "", err
	}
	v, err := normalizeVersion(version)
	if err != nil {
		return "", err
	}
	p := filepath.Join(binDir(cacheDir, product, v), product)
	st, err := os.Stat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%s %s is not built in %s: run `steppe artifact build %s@%s` (or make artifacts)", product, v, cacheDir, product, v)
	}
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", product, v, err)
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("%s %s: %s is not an executable file", product, v, p)
	}
	return p, nil
}
