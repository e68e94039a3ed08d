package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/artifact"
)

const artifactUsage = `usage:
  steppe artifact build PRODUCT@VERSION... [-cache DIR] [-out DIR]
      build static binaries from Go module sources (cached) and publish them
      into a release-style store (default: CACHE/store)
  steppe artifact publish PRODUCT@VERSION FILE [-cache DIR] [-out DIR]
      publish a binary made elsewhere (steppe itself: steppe@V, for
      steppe upgrade -steppe V) into the store, signed by the store key
  steppe artifact path PRODUCT@VERSION [-cache DIR]
      print the path of a built binary
  steppe artifact serve DIR [-addr ADDR]
      serve a store over HTTP

products: nomad, consul, vault; cache: -cache, else $STEPPE_CACHE, else ~/.cache/steppe
`

func runArtifact(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, artifactUsage)
		return fmt.Errorf("%w: artifact: no subcommand", errUsage)
	}
	switch args[0] {
	case "build":
		return artifactBuild(ctx, args[1:])
	case "path":
		return artifactPath(args[1:])
	case "publish":
		return artifactPublish(ctx, args[1:])
	case "serve":
		return artifactServe(ctx, args[1:])
	case "help", "-h", "-help", "--help":
		fmt.Print(artifactUsage)
		return nil
	default:
		fmt.Fprint(os.Stderr, artifactUsage)
		return fmt.Errorf("%w: artifact: unknown subcommand %q", errUsage, args[0])
	}
}

// parseInterspersed lets flags follow the positional arguments, as in
// `steppe artifact build nomad@1.9.3 -out DIR`.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func artifactFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet("steppe artifact "+name, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), artifactUsage) }
	cache := fs.String("cache", "", "cache directory (default $STEPPE_CACHE, else ~/.cache/steppe)")
	return fs, cache
}

func cacheDirFlag(flagValue string) (string, error) {
	if flagValue != "" {
		return filepath.Abs(flagValue)
	}
	return artifact.DefaultCacheDir()
}

func artifactBuild(ctx context.Context, args []string) error {
	fs, cacheFlag := artifactFlags("build")
	out := fs.String("out", "", "publish into this store directory (default CACHE/store)")
	prog := progressOutput(fs, os.Stderr)
	defer prog.Close()
	refs, err := parseInterspersed(fs, args)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if len(refs) == 0 {
		fmt.Fprint(os.Stderr, artifactUsage)
		return fmt.Errorf("%w: artifact build: want PRODUCT@VERSION, e.g. nomad@1.9.3", errUsage)
	}
	type job struct{ product, version string }
	var jobs []job
	for _, r := range refs {
		p, v, err := artifact.ParseRef(r)
		if err != nil {
			return fmt.Errorf("%w: %w", errUsage, err)
		}
		jobs = append(jobs, job{p, v})
	}
	cache, err := cacheDirFlag(*cacheFlag)
	if err != nil {
		return err
	}
	b := &artifact.Builder{CacheDir: cache, StoreDir: *out, Log: prog, Progress: prog}
	for _, j := range jobs {
		start := time.Now()
		res, err := b.Build(ctx, j.product, j.version)
		if err != nil {
			return err
		}
		how := "built"
		if res.Cached {
			how = "cached"
		}
		fmt.Printf("%s@%s %s in %s: %s\n", j.product, j.version, how, time.Since(start).Round(100*time.Millisecond), res.Binary)
	}
	return nil
}

func artifactPath(args []string) error {
	fs, cacheFlag := artifactFlags("path")
	refs, err := parseInterspersed(fs, args)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if len(refs) != 1 {
		return fmt.Errorf("%w: artifact path: want one PRODUCT@VERSION", errUsage)
	}
	p, v, err := artifact.ParseRef(refs[0])
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	cache, err := cacheDirFlag(*cacheFlag)
	if err != nil {
		return err
	}
	bin, err := artifact.BinaryPath(cache, p, v)
	if err != nil {
		return err
	}
	fmt.Println(bin)
	return nil
}

func artifactServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("steppe artifact serve", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), artifactUsage) }
	addr := fs.String("addr", "127.0.0.1:8480", "listen address")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: artifact serve: want one store directory", errUsage)
	}
	dir := pos[0]
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("artifact serve: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("artifact serve: %s is not a directory", dir)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("artifact serve: %w", err)
	}
	srv := &http.Server{Handler: artifact.StoreHandler(dir), ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(os.Stderr, "serving %s on http://%s/\n", dir, ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(shut)
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("artifact serve: %w", err)
	}
}

func artifactPublish(ctx context.Context, args []string) error {
	fs, cache := artifactFlags("publish")
	out := fs.String("out", "", "store directory (default CACHE/store)")
	pos, err := parseInterspersed(fs, args)
	if err != nil || len(pos) != 2 {
		return fmt.Errorf("%w: steppe artifact publish PRODUCT@VERSION FILE [-cache DIR] [-out DIR]", errUsage)
	}
	// Any product: a binary made elsewhere need not be one steppe builds.
	p, v, ok := strings.Cut(pos[0], "@")
	if !ok || p == "" || v == "" {
		return fmt.Errorf("%w: artifact %q: want PRODUCT@VERSION, e.g. steppe@0.2.0", errUsage, pos[0])
	}
	v = strings.TrimPrefix(v, "v")
	dir, err := cacheDirFlag(*cache)
	if err != nil {
		return err
	}
	store := *out
	if store == "" {
		store = artifact.DefaultStoreDir(dir)
	}
	if store, err = filepath.Abs(store); err != nil {
		return err
	}
	if p == agent.SteppeProduct {
		if err := agent.CheckVersion(ctx, pos[1], v); err != nil {
			return fmt.Errorf("publish %s: %w", pos[0], err)
		}
	}
	pub, err := artifact.Publish(dir, store, p, v, pos[1])
	if err != nil {
		return err
	}
	fmt.Printf("%s@%s published: %s (sha256 %s), signed by %s\n", p, v, pub.Archive, pub.ArchiveSHA256, pub.PublicKey)
	return nil
}
