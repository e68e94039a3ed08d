package artifact

import (
	"fmt"
	"os"
	"path/filepath"
)

// Cache layout, all under one directory that lives outside any checkout.
// The operator's builds (buildcache.go):
//
//	bin/PRODUCT/VERSION/PRODUCT        ready-to-run binary (BinaryPath)
//	bin/PRODUCT/VERSION/build.json     how it was built (BuildInfo)
//	build/PRODUCT/VERSION/build.log    full log of the last build
//	build/PRODUCT/VERSION/src/         writable source tree (removed after success)
//	keys/store-key.asc                 the store's OpenPGP private key (0600)
//	locks/PRODUCT@VERSION.lock         one build of a version at a time
//	store/                             the default release-style store
//
// The agent's downloads (install.go), when a Fetcher is given no CacheDir:
//
//	fetch/                             verified binaries by digest

// DefaultCacheDir is $STEPPE_CACHE, else $HOME/.cache/steppe. CI keeps the
// same directory between runs, so a built version is built once per machine.
func DefaultCacheDir() (string, error) {
	if d := os.Getenv("STEPPE_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("artifact cache: no STEPPE_CACHE and %w", err)
	}
	return filepath.Join(home, ".cache", "steppe"), nil
}
