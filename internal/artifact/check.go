package artifact

import (
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// checkStatic fails unless the ELF file at path is statically linked: no
// program interpreter and no needed shared libraries.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s: not an ELF executable: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (has a program interpreter)", path)
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("%s: read dynamic section: %w", path, err)
	}
	if len(libs) > 0 {
		return fmt.Errorf("%s is dynamically linked (needs %s)", path, strings.Join(libs, ", "))
	}
	return nil
}

// checkVersion runs `<bin> version` and fails unless its first line says
// "<Title> v<version>", the way the cluster's version checks read it.
func checkVersion(ctx context.Context, bin, title, version string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "version")
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent", "CHECKPOINT_DISABLE=1"}
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s version: %w: %s", bin, err, strings.TrimSpace(out.String()))
	}
	first := firstLine(out.String())
	if !versionLineMatches(first, title, version) {
		return out.String(), fmt.Errorf("%s version says %q, want %q", bin, first, title+" v"+version)
	}
	return out.String(), nil
}

func versionLineMatches(line, title, version string) bool {
	want := title + " v" + version
	if !strings.HasPrefix(line, want) {
		return false
	}
	rest := line[len(want):]
	return rest == "" || rest[0] == ' '
}
