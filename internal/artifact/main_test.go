package artifact

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMain points the Go tool at a module proxy on loopback that serves
// this machine's module cache (GOMODCACHE/cache/download, filled by the
// builds `make artifacts` runs): the tests of the source builds must not
// reach the real proxy off the machine. What the cache lacks answers 404,
// as the real proxy answers for a version it does not serve. The checksum
// database is off: the cached modules were checked when first downloaded.
func TestMain(m *testing.M) {
	os.Exit(runWithLocalProxy(m))
}

func runWithLocalProxy(m *testing.M) int {
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "go env GOMODCACHE:", err)
		return 1
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "cache", "download")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir))}
	go srv.Serve(ln)
	defer srv.Close()
	os.Setenv("GOPROXY", "http://"+ln.Addr().String())
	os.Setenv("GOSUMDB", "off")
	return m.Run()
}
