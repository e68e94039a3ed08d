package artifact

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
)

// keyHelperEnv names the key file TestHelperCreateKey creates when the
// test binary runs as the traced helper of TestStoreKeyWrittenDurably.
const keyHelperEnv = "STEPPE_ARTIFACT_KEY_HELPER"

// TestHelperCreateKey creates a store key; it does nothing unless run by
// TestStoreKeyWrittenDurably.
func TestHelperCreateKey(t *testing.T) {
	path := os.Getenv(keyHelperEnv)
	if path == "" {
		return
	}
	if _, err := loadOrCreateKey(path); err != nil {
		t.Fatal(err)
	}
}

// The store key is synced before it is linked into place, and its
// directory after: a crash cannot leave an empty key file that every
// later build fails to read.
func TestStoreKeyWrittenDurably(t *testing.T) {
	dir := t.TempDir()
	key := keyFile(dir)
	lines := testenv.Strace(t, "fsync,fdatasync,link,linkat", []string{keyHelperEnv + "=" + key}, "-test.run=^TestHelperCreateKey$", "-test.count=1")
	link := regexp.MustCompile(`link(?:at)?\((?:AT_FDCWD(?:<[^>]*>)?, )?"([^"]+)", (?:AT_FDCWD(?:<[^>]*>)?, )?"([^"]+)"`)
	fsync := regexp.MustCompile(`f(?:data)?sync\(\d+<([^>]+)>`)
	var synced []string
	linked := false
	for i, line := range lines {
		if m := fsync.FindStringSubmatch(line); m != nil {
			synced = append(synced, m[1])
			continue
		}
		m := link.FindStringSubmatch(line)
		if m == nil || m[2] != key {
			continue
		}
		linked = true
		if !slices.Contains(synced, m[1]) {
			t.Errorf("%s linked to the key without an fsync first:\n%s", m[1], strings.Join(lines[max(0, i-5):i+1], "\n"))
		}
		dirSynced := false
		for _, next := range lines[i+1:] {
			if m := fsync.FindStringSubmatch(next); m != nil && m[1] == filepath.Dir(key) {
				dirSynced = true
			}
		}
		if !dirSynced {
			t.Errorf("the link of %s is not followed by an fsync of %s", key, filepath.Dir(key))
		}
	}
	if !linked {
		t.Fatalf("no link onto %s in the trace:\n%s", key, strings.Join(lines, "\n"))
	}
}
