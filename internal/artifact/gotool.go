package artifact

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"
)

// goTool runs the Go toolchain for the builder. Every command gets
// GOTOOLCHAIN=local, so a product's go.mod never makes the go command
// download another toolchain, and GOWORK=off, so no workspace of the
// caller leaks into a product build.
type goTool struct {
	gobin string   // the go command
	env   []string // base environment
}

func newGoTool(gobin string) *goTool {
	if gobin == "" {
		gobin = "go"
	}
	// -buildvcs=false: the build directory may sit inside some unrelated
	// checkout whose VCS state must not be stamped into the product.
	env := append(os.Environ(), "GOTOOLCHAIN=local", "GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false")
	return &goTool{gobin: gobin, env: env}
}

// command builds an exec.Cmd; later entries in extraEnv win over earlier
// ones because exec uses the last value of a duplicated key.
func (g *goTool) command(ctx context.Context, dir string, extraEnv []string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, g.gobin, args...)
	cmd.Dir = dir
	cmd.Env = append(append([]string(nil), g.env...), extraEnv...)
	cmd.Stdin = nil
	cmd.WaitDelay = 10 * time.Second
	return cmd
}

// version reports the toolchain's version, e.g. "go1.26.8".
func (g *goTool) version(ctx context.Context) (string, error) {
	cmd := g.command(ctx, "", nil, "env", "GOVERSION")
	out, err := cmd.Output()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("the Go toolchain (%s) is not installed or not on PATH", g.gobin)
		}
		return "", fmt.Errorf("%s env GOVERSION: %w", g.gobin, exitDetail(err))
	}
	return strings.TrimSpace(string(out)), nil
}

// moduleInfo is what `go mod download -json` reports for one module.
type moduleInfo struct {
	Path    string
	Version string
	Error   string
	Info    string // path of the .info file
	Dir     string // extracted, read-only source in GOMODCACHE
	Origin  *origin
	Time    time.Time // the version's time from the .info file (commit time)
}

// origin is the VCS origin the module proxy recorded for a version; Time
// comes from the .info file, not from the download's JSON.
type origin struct {
	VCS  string
	URL  string
	Hash string
	Ref  string
	Time time.Time
}

// errUnavailable marks a module version the proxy will not serve.
var errUnavailable = errors.New("not obtainable from the Go module proxy")

// download fetches module@version into GOMODCACHE through the module proxy
// and reads the recorded origin (commit hash and time) from its .info file.
func (g *goTool) download(ctx context.Context, path, version string, log io.Writer) (moduleInfo, error) {
	tmp, err := os.MkdirTemp("", "steppe-moddl-")
	if err != nil {
		return moduleInfo{}, err
	}
	defer os.RemoveAll(tmp)
	cmd := g.command(ctx, tmp, nil, "mod", "download", "-json", path+"@"+version)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	runErr := cmd.Run()
	if log != nil {
		fmt.Fprintf(log, "$ go mod download -json %s@%s\n%s%s", path, version, stdout.String(), stderr.String())
	}
	var mi moduleInfo
	if jerr := json.Unmarshal(stdout.Bytes(), &mi); jerr != nil {
		if runErr != nil {
			return moduleInfo{}, fmt.Errorf("go mod download %s@%s: %w: %s", path, version, exitDetail(runErr), strings.TrimSpace(stderr.String()))
		}
		return moduleInfo{}, fmt.Errorf("go mod download %s@%s: unreadable output: %w", path, version, jerr)
	}
	if mi.Error != "" {
		if isUnavailable(mi.Error) {
			detail := strings.TrimPrefix(firstLine(mi.Error), path+"@"+version+": ")
			return mi, fmt.Errorf("%s@%s %w (%s)", path, version, errUnavailable, detail)
		}
		return mi, fmt.Errorf("go mod download %s@%s: %s", path, version, mi.Error)
	}
	if runErr != nil {
		return mi, fmt.Errorf("go mod download %s@%s: %w: %s", path, version, exitDetail(runErr), strings.TrimSpace(stderr.String()))
	}
	if mi.Info != "" {
		// The .info file carries the commit time, which the JSON lacks.
		if b, err := os.ReadFile(mi.Info); err == nil {
			var info struct {
				Time   time.Time
				Origin *origin
			}
			if json.Unmarshal(b, &info) == nil {
				mi.Time = info.Time
				if mi.Origin == nil {
					mi.Origin = info.Origin
				}
				if mi.Origin != nil {
					mi.Origin.Time = info.Time
				}
			}
		}
	}
	return mi, nil
}

func isUnavailable(msg string) bool {
	for _, s := range []string{"404 Not Found", "410 Gone", "403 Forbidden", "not available", "unknown revision", "invalid version"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexAny(s, "\n"); i >= 0 {
		return s[:i]
	}
	return s
}

// exitDetail keeps the error of a command short and useful.
func exitDetail(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
	}
	return err
}

// goMod is the subset of `go mod edit -json` the builder reads.
type goMod struct {
	Module struct {
		Path string
	}
	Go        string
	Toolchain string
	Require   []struct {
		Path     string
		Version  string
		Indirect bool
	}
	Replace []struct {
		Old modVersion
		New modVersion
	}
}

type modVersion struct {
	Path    string
	Version string
}

// readGoMod parses a go.mod file with the toolchain's own parser.
func (g *goTool) readGoMod(ctx context.Context, file string) (goMod, error) {
	cmd := g.command(ctx, "", nil, "mod", "edit", "-json", file)
	out, err := cmd.Output()
	if err != nil {
		return goMod{}, fmt.Errorf("read %s: %w", file, exitDetail(err))
	}
	var m goMod
	if err := json.Unmarshal(out, &m); err != nil {
		return goMod{}, fmt.Errorf("read %s: %w", file, err)
	}
	return m, nil
}

// editGoMod applies `go mod edit` flags to a go.mod file.
func (g *goTool) editGoMod(ctx context.Context, file string, flags ...string) error {
	if len(flags) == 0 {
		return nil
	}
	args := append(append([]string{"mod", "edit"}, flags...), file)
	cmd := g.command(ctx, "", nil, args...)
	if _, err := cmd.Output(); err != nil {
		return fmt.Errorf("go mod edit %s %s: %w", strings.Join(flags, " "), file, exitDetail(err))
	}
	return nil
}
