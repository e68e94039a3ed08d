package artifact

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// CoreDNS is checked through its -version flag ("CoreDNS-1.12.4"), never
// run without it (that would start a DNS server), and stamped in
// coremain.
func TestCoreDNSVersionCheck(t *testing.T) {
	p, err := lookupProduct("coredns")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	script := filepath.Join(dir, "coredns")
	body := "#!/bin/sh\n[ \"$1\" = -version ] || { echo 'would serve DNS' >&2; exit 3; }\necho CoreDNS-1.12.4\necho 'linux/amd64, go1.26.8, f3232957'\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := p.checkVersion(ctx, script, "1.12.4"); err != nil {
		t.Errorf("matching version rejected: %v", err)
	}
	if _, err := p.checkVersion(ctx, script, "1.12.40"); err == nil {
		t.Error("CoreDNS-1.12.4 accepted as 1.12.40")
	}
	if f := ldflags(p, "1.12.4", "f32329577fd5e3fe19908f8a9ba5c76aafb45bf6", time.Time{}); !strings.Contains(f, "-X github.com/coredns/coredns/coremain.GitCommit=f3232957") {
		t.Errorf("ldflags %q do not stamp coremain.GitCommit", f)
	}
}
