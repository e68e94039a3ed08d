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
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/progress"
)

// Builder builds products from Go module sources into a cache and
// publishes them into a store. The zero value builds into the default
// cache and store.
type Builder struct {
	// CacheDir holds binaries, build logs, the store key and the default
	// store; "" means DefaultCacheDir.
	CacheDir string
	// StoreDir is where builds are published; "" means CacheDir/store.
	StoreDir string
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// Progress shows each build as a live task (its step, packages
	// compiled out of the total); nil shows none.
	Progress *progress.Reporter
	// Go is the go command; "" means "go" from PATH.
	Go string
	// CC is the C compiler for cgo products; "" means "musl-gcc".
	CC string
	// Heartbeat is how often a long step reports that it is still running;
	// 0 means every 30 seconds.
	Heartbeat time.Duration
}

// Result describes a built and published product version.
type Result struct {
	Product string
	Version string
	Binary  string // ready-to-run binary in the cache (see BinaryPath)
	SHA256  string // of Binary
	Cached  bool   // nothing was compiled
	Info    BuildInfo
	Store   Published
}

// BuildInfo is recorded next to each built binary (build.json).
type BuildInfo struct {
	Product     string       `json:"product"`
	Version     string       `json:"version"`
	Module      string       `json:"module"`
	Commit      string       `json:"commit,omitempty"`
	CommitTime  time.Time    `json:"commit_time"`
	GoVersion   string       `json:"go_version"`
	GoModGo     string       `json:"gomod_go,omitempty"`
	CGO         bool         `json:"cgo"`
	Tags        []string     `json:"tags"`
	LDFlags     string       `json:"ldflags"`
	Resolutions []Resolution `json:"resolutions,omitempty"`
	Warnings    []string     `json:"warnings,omitempty"`
	SHA256      string       `json:"sha256"`
	VersionOut  string       `json:"version_output"`
	BuiltAt     time.Time    `json:"built_at"`
	Seconds     float64      `json:"build_seconds"`
	BuildLog    string       `json:"build_log"`
}

// StepError says which step of a build failed and where its full log is.
type StepError struct {
	Product, Version string
	Step             string
	Log              string // path of the full build log, "" if none
	Err              error
}

func (e *StepError) Error() string {
	s := fmt.Sprintf("build %s %s: %s: %v", e.Product, e.Version, e.Step, e.Err)
	if e.Log != "" {
		s += " (full log: " + e.Log + ")"
	}
	return s
}

func (e *StepError) Unwrap() error { return e.Err }

func (b *Builder) logf(format string, args ...any) {
	if b.Log != nil {
		fmt.Fprintf(b.Log, format+"\n", args...)
	}
}

func (b *Builder) cacheDir() (string, error) {
	if b.CacheDir != "" {
		return filepath.Abs(b.CacheDir)
	}
	return DefaultCacheDir()
}

// Build makes product@version available: from the cache when it was built
// before (instant), else from the module sources. Either way the binary is
// published into the store.
func (b *Builder) Build(ctx context.Context, productName, ver string) (Result, error) {
	t := b.Progress.Start(productName+" "+strings.TrimPrefix(ver, "v"), "starting")
	res, err := b.build(ctx, t, productName, ver)
	if err != nil {
		t.Fail(err)
	} else {
		t.Done("")
	}
	return res, err
}

func (b *Builder) build(ctx context.Context, t *progress.Task, productName, ver string) (Result, error) {
	p, err := lookupProduct(productName)
	if err != nil {
		return Result{}, err
	}
	ver, err = normalizeVersion(ver)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w", productName, err)
	}
	cache, err := b.cacheDir()
	if err != nil {
		return Result{}, err
	}
	storeDir := b.StoreDir
	if storeDir == "" {
		storeDir = DefaultStoreDir(cache)
	}
	if storeDir, err = filepath.Abs(storeDir); err != nil {
		return Result{}, err
	}

	unlock, err := b.lock(ctx, t, cache, p.name, ver)
	if err != nil {
		return Result{}, err
	}
	defer unlock()

	res := Result{Product: p.name, Version: ver}
	info, cached, err := readCached(cache, p.name, ver)
	if err != nil {
		b.logf("==> %s %s: cached build unusable, rebuilding: %v", p.name, ver, err)
	}
	if !cached {
		info, err = b.compile(ctx, t, cache, p, ver)
		if err != nil {
			return res, err
		}
	} else {
		res.Cached = true
		b.logf("==> %s %s: cached (built %s with %s)", p.name, ver, info.BuiltAt.Format(time.RFC3339), info.GoVersion)
	}
	res.Info = info
	res.Binary = filepath.Join(binDir(cache, p.name, ver), p.name)
	res.SHA256 = info.SHA256

	t.Phase("publishing")
	key, err := loadOrCreateKey(keyFile(cache))
	if err != nil {
		return res, &StepError{Product: p.name, Version: ver, Step: "store key", Err: err}
	}
	pub, err := publish(storeDir, key, p.name, ver, res.Binary, info.CommitTime)
	if err != nil {
		return res, &StepError{Product: p.name, Version: ver, Step: "publish", Err: err}
	}
	res.Store = pub
	b.logf("==> %s %s: binary %s", p.name, ver, res.Binary)
	b.logf("==> %s %s: published %s (sha256 %s), signed by %s", p.name, ver, pub.Archive, pub.ArchiveSHA256, pub.PublicKey)
	return res, nil
}

// readCached returns the recorded build of a version if its binary is
// present and unchanged.
func readCached(cache, product, ver string) (BuildInfo, bool, error) {
	dir := binDir(cache, product, ver)
	raw, err := os.ReadFile(filepath.Join(dir, "build.json"))
	if errors.Is(err, os.ErrNotExist) {
		return BuildInfo{}, false, nil
	}
	if err != nil {
		return BuildInfo{}, false, err
	}
	var info BuildInfo
	if err := json.Unmarshal(raw, &info); err != nil {
		return BuildInfo{}, false, fmt.Errorf("%s/build.json: %w", dir, err)
	}
	sum, err := sha256File(filepath.Join(dir, product))
	if err != nil {
		return BuildInfo{}, false, err
	}
	if sum != info.SHA256 {
		return BuildInfo{}, false, fmt.Errorf("%s/%s: sha256 %s, build.json says %s", dir, product, sum, info.SHA256)
	}
	return info, true, nil
}

// lock serializes builds of one version across processes (a test and
// `make artifacts` may build the same version at once).
func (b *Builder) lock(ctx context.Context, t *progress.Task, cache, product, ver string) (func(), error) {
	dir := filepath.Join(cache, "locks")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("artifact cache %s: %w", cache, err)
	}
	path := filepath.Join(dir, product+"@"+ver+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("artifact cache lock: %w", err)
	}
	said := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !said {
			b.logf("==> %s %s: waiting for another build of it to finish (%s)", product, ver, path)
			t.Phase("waiting for another build of it")
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// compile runs every step of a build from source and installs the binary
// into the cache.
func (b *Builder) compile(ctx context.Context, task *progress.Task, cache string, p product, ver string) (BuildInfo, error) {
	start := time.Now()
	work := workDir(cache, p.name, ver)
	if err := os.MkdirAll(work, 0o755); err != nil {
		return BuildInfo{}, fmt.Errorf("build %s %s: %w", p.name, ver, err)
	}
	logPath := filepath.Join(work, "build.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return BuildInfo{}, fmt.Errorf("build %s %s: %w", p.name, ver, err)
	}
	defer logFile.Close()
	var logMu sync.Mutex
	log := &lockedWriter{mu: &logMu, w: logFile}

	info := BuildInfo{Product: p.name, Version: ver, Module: p.module, CGO: p.cgo, Tags: p.tags, BuildLog: logPath}
	phase := func(format string, args ...any) {
		line := fmt.Sprintf("==> %s %s: %s", p.name, ver, fmt.Sprintf(format, args...))
		b.logf("%s", line)
		fmt.Fprintf(log, "%s [%s]\n", line, time.Since(start).Round(time.Second))
	}
	fail := func(step string, err error) (BuildInfo, error) {
		serr := &StepError{Product: p.name, Version: ver, Step: step, Log: logPath, Err: err}
		fmt.Fprintf(log, "FAILED at %s: %v\n", step, err)
		logMu.Lock()
		_ = logFile.Sync()
		logMu.Unlock()
		if tail := tailFile(logPath, 40); tail != "" {
			b.logf("--- last lines of %s ---\n%s--- end of log ---", logPath, tail)
		}
		return info, serr
	}

	// Step: toolchain.
	g := newGoTool(b.Go)
	goVer, err := g.version(ctx)
	if err != nil {
		return fail("toolchain", err)
	}
	info.GoVersion = goVer
	cc := b.CC
	if p.cgo {
		var warn string
		cc, warn, err = pickCC(b.CC, exec.LookPath)
		if err != nil {
			return fail("toolchain", fmt.Errorf("%s needs cgo: %w", p.title, err))
		}
		if warn != "" {
			phase("WARNING: %s", warn)
		}
	}
	phase("building from source with %s (GOTOOLCHAIN=local)", goVer)

	// Step: fetch the source.
	task.Phase("fetching the source")
	t := time.Now()
	mi, err := g.download(ctx, p.module, "v"+ver, log)
	if err != nil {
		if errors.Is(err, errUnavailable) {
			err = fmt.Errorf("%s %s cannot be had (%s): %w", p.title, ver, goEnv("GOPROXY"), err)
		}
		return fail("fetch source", err)
	}
	info.CommitTime = mi.Time
	if mi.Origin != nil {
		info.Commit = mi.Origin.Hash
	}
	phase("fetched %s@v%s (commit %s) in %s", p.module, ver, orUnknown(info.Commit), since(t))

	task.Phase("copying the source")
	t = time.Now()
	src := filepath.Join(work, "src")
	if err := os.RemoveAll(src); err != nil {
		return fail("copy source", err)
	}
	if err := copyTree(mi.Dir, src); err != nil {
		return fail("copy source", err)
	}
	phase("copied source to %s in %s", src, since(t))

	// Step: go.mod: toolchain warning and replace resolution.
	task.Phase("resolving replaces")
	gomodPath := filepath.Join(src, "go.mod")
	gm, err := g.readGoMod(ctx, gomodPath)
	if err != nil {
		return fail("read go.mod", err)
	}
	info.GoModGo = gm.Go
	if w := toolchainWarning(gm, goVer); w != "" {
		info.Warnings = append(info.Warnings, w)
		phase("WARNING: %s", w)
	}
	resolutions, edits, err := resolveReplaces(ctx, g, gm, mi.Origin, p.pins[ver], src, log)
	if err != nil {
		return fail("resolve replaces", err)
	}
	if err := g.editGoMod(ctx, gomodPath, edits...); err != nil {
		return fail("resolve replaces", err)
	}
	for i, r := range resolutions {
		switch {
		case r.How == ResolvedRequired && p.loudFallback:
			r.Warning = fmt.Sprintf("%s is built against %s@%s, the version its go.mod requires, not the one it was released with", p.title, r.Module, r.Version)
		case r.How == ResolvedPinned:
			r.Warning = fmt.Sprintf("%s is built against %s@%s, pinned by steppe because the required %s does not compile", p.title, r.Module, r.Version, requiredOf(gm, r.Module))
		}
		resolutions[i] = r
		phase("replace %s", r)
		if r.Warning != "" {
			info.Warnings = append(info.Warnings, r.Warning)
			phase("WARNING: %s", r.Warning)
		}
	}
	if len(resolutions) == 0 {
		phase("no local replace directives")
	}
	info.Resolutions = resolutions

	// Step: compile.
	out := filepath.Join(work, "out", p.name)
	_ = os.Remove(out)
	info.LDFlags = ldflags(p, ver, info.Commit, info.CommitTime)
	env := []string{"GOOS=linux", "GOARCH=amd64"}
	if p.cgo {
		env = append(env, "CGO_ENABLED=1", "CC="+cc,
			// musl-gcc's include path lacks the kernel headers runc's
			// nsenter needs; take them from the host after musl's own.
			"CGO_CFLAGS=-idirafter /usr/include -idirafter /usr/include/x86_64-linux-gnu")
	} else {
		env = append(env, "CGO_ENABLED=0")
	}
	args := []string{"build", "-v", "-trimpath", "-tags", strings.Join(p.tags, ","), "-ldflags", info.LDFlags, "-o", out, "."}
	fmt.Fprintf(log, "$ %s go %s\n", strings.Join(env, " "), strings.Join(quoteArgs(args), " "))
	cgoNote := "CGO_ENABLED=0"
	if p.cgo {
		cgoNote = "cgo with " + cc + ", static"
	}
	phase("compiling (%s, tags %s); this takes minutes", cgoNote, strings.Join(p.tags, ","))
	t = time.Now()
	task.Phase("compiling packages")
	counter := &lineCounter{}
	if task.Live() {
		// Only a terminal shows packages out of the total; counting them
		// costs a go list, run alongside the build.
		stop := countPackages(ctx, g, src, env, p.tags, task, counter)
		defer stop()
	}
	cmd := g.command(ctx, src, env, args...)
	cmd.Stdout = io.MultiWriter(log, counter)
	cmd.Stderr = io.MultiWriter(log, counter)
	if err := b.runWithHeartbeat(cmd, func() {
		phase("still compiling: %s, %d packages so far", since(t), counter.count())
	}); err != nil {
		// `go build -v` interleaves package names with the errors; lift
		// the errors out so that the message says what broke.
		if errs := compileErrors(logPath, 10); len(errs) > 0 {
			err = fmt.Errorf("%w:\n  %s", err, strings.Join(errs, "\n  "))
		}
		return fail("compile", err)
	}
	phase("compiled in %s", since(t))

	// Step: check.
	task.Phase("checking the binary")
	if err := checkStatic(out); err != nil {
		return fail("check static linking", err)
	}
	phase("statically linked")
	vout, err := p.checkVersion(ctx, out, ver)
	fmt.Fprintf(log, "$ %s version\n%s", out, vout)
	if err != nil {
		return fail("check version", err)
	}
	info.VersionOut = vout
	phase("`%s version` says %q", p.name, firstLine(vout))

	// Step: install into the cache.
	task.Phase("installing into the cache")
	sum, err := sha256File(out)
	if err != nil {
		return fail("install", err)
	}
	info.SHA256 = sum
	info.BuiltAt = time.Now().UTC()
	info.Seconds = time.Since(start).Seconds()
	if err := installBinary(cache, p.name, ver, out, info); err != nil {
		return fail("install", err)
	}
	phase("installed in the cache (%s total)", since(start))
	if err := os.RemoveAll(src); err != nil {
		phase("could not remove the source tree %s: %v", src, err)
	}
	_ = os.RemoveAll(filepath.Join(work, "out"))
	return info, nil
}

func requiredOf(gm goMod, module string) string {
	for _, r := range gm.Require {
		if r.Path == module {
			return r.Version
		}
	}
	return "version"
}

// installBinary moves a checked binary and its build.json into the cache
// as one directory rename, so BinaryPath never sees half an install.
func installBinary(cache, product, ver, bin string, info BuildInfo) error {
	final := binDir(cache, product, ver)
	parent := filepath.Dir(final)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(parent, "."+ver+".tmp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := os.Rename(bin, filepath.Join(tmp, product)); err != nil {
		if err := copyFile(bin, filepath.Join(tmp, product), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(tmp, product), 0o755); err != nil {
		return err
	}
	raw, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "build.json"), append(raw, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.RemoveAll(final); err != nil {
		return err
	}
	return os.Rename(tmp, final)
}

// ldflags stamps the version the way each product's release build does:
// GitCommit and BuildDate in its version package, stripped.
func ldflags(p product, ver, commit string, commitTime time.Time) string {
	flags := []string{"-s", "-w"}
	if p.cgo {
		flags = append(flags, "-linkmode", "external", "-extldflags", "-static")
	}
	if commit != "" {
		if p.shortCommit && len(commit) > 8 {
			commit = commit[:8]
		}
		flags = append(flags, "-X", p.versionPkg()+".GitCommit="+commit)
	}
	if !commitTime.IsZero() {
		flags = append(flags, "-X", p.versionPkg()+".BuildDate="+commitTime.UTC().Format("2006-01-02T15:04:05Z"))
	}
	if p.stampPrerelease {
		flags = append(flags, "-X", p.versionPkg()+".VersionPrerelease=")
	}
	return strings.Join(flags, " ")
}

// toolchainWarning says when the product asks for a Go other than the one
// building it (by major.minor).
func toolchainWarning(gm goMod, local string) string {
	want := gm.Go
	if gm.Toolchain != "" {
		want = strings.TrimPrefix(gm.Toolchain, "go")
	}
	if want == "" {
		return ""
	}
	have := strings.TrimPrefix(local, "go")
	if majorMinor(want) == majorMinor(have) {
		return ""
	}
	return fmt.Sprintf("go.mod asks for Go %s; building with %s instead (GOTOOLCHAIN=local)", want, local)
}

func majorMinor(v string) string {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return v
	}
	return parts[0] + "." + strings.TrimRightFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' })
}

func (b *Builder) runWithHeartbeat(cmd *exec.Cmd, beat func()) error {
	every := b.Heartbeat
	if every <= 0 {
		every = 30 * time.Second
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return err
		case <-tick.C:
			beat()
		}
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// lineCounter counts output lines; `go build -v` prints one per package.
type lineCounter struct {
	mu      sync.Mutex
	n       int
	onCount func(n int) // called with the count after each write, if set
}

func (c *lineCounter) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n += bytes.Count(p, []byte{'\n'})
	n, f := c.n, c.onCount
	c.mu.Unlock()
	if f != nil {
		f(n)
	}
	return len(p), nil
}

func (c *lineCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// compileErrors returns up to n compiler error lines ("file.go:L:C: msg")
// from a build log.
func compileErrors(path string, n int) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var errs []string
	for _, line := range strings.Split(string(b), "\n") {
		if compileErrorLine(line) {
			errs = append(errs, line)
			if len(errs) == n {
				break
			}
		}
	}
	return errs
}

func compileErrorLine(line string) bool {
	file, rest, ok := strings.Cut(line, ".go:")
	if !ok || file == "" || strings.ContainsAny(file, " \t") {
		return false
	}
	lineNo, _, ok := strings.Cut(rest, ":")
	return ok && lineNo != "" && strings.Trim(lineNo, "0123456789") == ""
}

// tailFile returns the last n lines of a file.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.SplitAfter(string(b), "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	s := strings.Join(lines, "")
	if s != "" && !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return s
}

func since(t time.Time) time.Duration {
	d := time.Since(t)
	if d >= time.Minute {
		return d.Round(time.Second)
	}
	return d.Round(100 * time.Millisecond)
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown: the proxy recorded no origin"
	}
	return s
}

func goEnv(key string) string {
	if v := os.Getenv(key); v != "" {
		return key + "=" + v
	}
	return key + " default"
}

func quoteArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " \t\"'") {
			out[i] = fmt.Sprintf("%q", a)
		} else {
			out[i] = a
		}
	}
	return out
}

// pickCC chooses the C compiler of a cgo product. An explicit choice must
// exist. By default musl-gcc links a static binary against musl; where it
// is missing (a machine with only Go and Debian's gcc), gcc links it
// statically against glibc, which the netgo and osusergo tags keep from
// needing glibc's run-time loaded parts, and the build says so.
func pickCC(explicit string, lookPath func(string) (string, error)) (cc, warning string, err error) {
	if explicit != "" {
		if _, err := lookPath(explicit); err != nil {
			return "", "", fmt.Errorf("%s is not installed (for musl-gcc: apt-get install musl-tools)", explicit)
		}
		return explicit, "", nil
	}
	if _, err := lookPath("musl-gcc"); err == nil {
		return "musl-gcc", "", nil
	}
	for _, c := range []string{"gcc", "cc"} {
		if _, err := lookPath(c); err == nil {
			return c, "musl-gcc is not installed: linking statically against glibc with " + c + " (apt-get install musl-tools for musl)", nil
		}
	}
	return "", "", fmt.Errorf("no C compiler: neither musl-gcc nor gcc is installed (apt-get install musl-tools)")
}
