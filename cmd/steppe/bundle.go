package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/bundle"
)

const bundleUsage = `steppe bundle: build, sign, verify, publish and serve signed config bundles.

  steppe bundle keygen -out NAME
      writes NAME.key (private, 0600) and NAME.pub
  steppe bundle build DIR -cluster C -role R -out FILE [-version N] [-expires 720h]
                      [-var KEY=VALUE]... [-key NAME.key]
      packs DIR (plus DIR/bundle.json: artifacts, services, templates, variables);
      -version defaults to the current unix time; signs when -key is given
  steppe bundle sign FILE -key NAME.key [-out FILE2]
      (re)signs a bundle, in place unless -out is given
  steppe bundle verify FILE -key NAME.pub [-key ...] [-min-version N] [-cluster C] [-role R]
  steppe bundle publish FILE -store DIR|URL [-key NAME.pub]...
  steppe bundle serve DIR [-addr 127.0.0.1:8480] [-key NAME.pub]... [-poll 100ms] [-max-wait 5m]
                      [-tls-cert FILE -tls-key FILE]
      serves /v1/bundles/CLUSTER/ROLE with ETag and ?wait= long polls;
      with -key, accepts PUT publishes signed by those keys
`

func runBundle(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, bundleUsage)
		return fmt.Errorf("%w: bundle needs a subcommand", errUsage)
	}
	sub, rest := args[0], args[1:]
	switch sub {
	case "keygen":
		return bundleKeygen(rest)
	case "build":
		return bundleBuild(rest)
	case "sign":
		return bundleSign(ctx, rest)
	case "verify":
		return bundleVerify(ctx, rest)
	case "publish":
		return bundlePublish(ctx, rest)
	case "serve":
		return bundleServe(ctx, rest)
	case "help", "-h", "-help", "--help":
		fmt.Print(bundleUsage)
		return nil
	default:
		fmt.Fprint(os.Stderr, bundleUsage)
		return fmt.Errorf("%w: unknown bundle subcommand %q", errUsage, sub)
	}
}

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// parseArgs parses flags that may come before or after the positional
// arguments ("build DIR -cluster C" as well as "build -cluster C DIR"),
// and checks the number of positional arguments.
func parseArgs(fs *flag.FlagSet, args []string, positional ...string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(os.Stderr)
				fs.PrintDefaults()
				return nil, err
			}
			return nil, fmt.Errorf("%w: bundle %s: %v", errUsage, fs.Name(), err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if len(pos) != len(positional) {
		return nil, fmt.Errorf("%w: bundle %s wants %s (got %d arguments)", errUsage, fs.Name(), strings.Join(positional, " "), len(pos))
	}
	return pos, nil
}

func required(sub string, flags map[string]string) error {
	for name, v := range flags {
		if v == "" {
			return fmt.Errorf("%w: bundle %s needs -%s", errUsage, sub, name)
		}
	}
	return nil
}

func bundleKeygen(args []string) error {
	fs := flag.NewFlagSet("keygen", flag.ContinueOnError)
	out := fs.String("out", "", "base name of the key files (NAME.key, NAME.pub)")
	if _, err := parseArgs(fs, args); err != nil {
		return err
	}
	if err := required("keygen", map[string]string{"out": *out}); err != nil {
		return err
	}
	k, err := bundle.GenerateKey()
	if err != nil {
		return err
	}
	priv, pub, err := bundle.WriteKeyPair(*out, k)
	if err != nil {
		return err
	}
	fmt.Printf("key %s: private %s (keep it secret), public %s (give it to agents)\n", k.ID, priv, pub)
	return nil
}

func bundleBuild(args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	cluster := fs.String("cluster", "", "cluster name")
	role := fs.String("role", "", "role name")
	version := fs.Uint64("version", 0, "bundle version, must grow; 0 means the current unix time")
	expires := fs.Duration("expires", 720*time.Hour, "how long agents accept the bundle")
	out := fs.String("out", "", "bundle file to write")
	keyFile := fs.String("key", "", "private key to sign with (optional; see sign)")
	var vars listFlag
	fs.Var(&vars, "var", "template variable KEY=VALUE (repeatable; overrides bundle.json)")
	pos, err := parseArgs(fs, args, "DIR")
	if err != nil {
		return err
	}
	if err := required("build", map[string]string{"cluster": *cluster, "role": *role, "out": *out}); err != nil {
		return err
	}
	if *expires <= 0 {
		return fmt.Errorf("%w: bundle build: -expires must be positive", errUsage)
	}
	spec, err := bundle.ReadSpec(pos[0])
	if err != nil {
		return err
	}
	for _, kv := range vars {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("%w: bundle build: -var %q: want KEY=VALUE", errUsage, kv)
		}
		if spec.Variables == nil {
			spec.Variables = make(map[string]string)
		}
		spec.Variables[k] = v
	}
	now := time.Now().UTC().Truncate(time.Second)
	if *version == 0 {
		*version = uint64(now.Unix())
	}
	m := bundle.Manifest{
		Cluster: *cluster, Role: *role, Version: *version,
		Created: now, Expires: now.Add(*expires),
		Artifacts: spec.Artifacts, Services: spec.Services, Templates: spec.Templates, Variables: spec.Variables,
	}
	var key *bundle.PrivateKey
	if *keyFile != "" {
		k, err := bundle.ReadPrivateKeyFile(*keyFile)
		if err != nil {
			return err
		}
		key = &k
	}
	var built *bundle.Manifest
	err = atomicfile.Write(*out, 0o644, func(w io.Writer) error {
		var err error
		built, err = bundle.Build(w, pos[0], m, key)
		return err
	})
	if err != nil {
		return err
	}
	state := "unsigned: run steppe bundle sign"
	if key != nil {
		state = "signed by " + key.ID
	}
	fmt.Printf("%s: %s/%s version %d, %d files, %d templates, %d services, expires %s, %s\n",
		*out, built.Cluster, built.Role, built.Version, len(built.Files), len(built.Templates), len(built.Services),
		built.Expires.Format(time.RFC3339), state)
	return nil
}

func bundleSign(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sign", flag.ContinueOnError)
	keyFile := fs.String("key", "", "private key")
	out := fs.String("out", "", "signed bundle to write (default: replace FILE)")
	pos, err := parseArgs(fs, args, "FILE")
	if err != nil {
		return err
	}
	if err := required("sign", map[string]string{"key": *keyFile}); err != nil {
		return err
	}
	key, err := bundle.ReadPrivateKeyFile(*keyFile)
	if err != nil {
		return err
	}
	if *out == "" {
		*out = pos[0]
	}
	in, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer in.Close()
	var m *bundle.Manifest
	err = atomicfile.Write(*out, 0o644, func(w io.Writer) error {
		var err error
		m, err = bundle.SignBundle(ctx, in, w, key)
		return err
	})
	if err != nil {
		return fmt.Errorf("sign %s: %w", pos[0], err)
	}
	fmt.Printf("%s: %s/%s version %d signed by %s\n", *out, m.Cluster, m.Role, m.Version, key.ID)
	return nil
}

func bundleVerify(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	var keys listFlag
	fs.Var(&keys, "key", "trusted public key (repeatable)")
	minVersion := fs.Uint64("min-version", 0, "refuse versions lower than N")
	cluster := fs.String("cluster", "", "refuse bundles for another cluster")
	role := fs.String("role", "", "refuse bundles for another role")
	pos, err := parseArgs(fs, args, "FILE")
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return fmt.Errorf("%w: bundle verify needs at least one -key", errUsage)
	}
	pubs, err := bundle.ReadPublicKeyFiles(keys...)
	if err != nil {
		return err
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	p := bundle.Policy{Keys: pubs, Cluster: *cluster, Role: *role}
	if *minVersion > 0 {
		p.After = *minVersion - 1
	}
	m, keyID, err := bundle.Verify(ctx, f, p)
	if err != nil {
		return fmt.Errorf("verify %s: %w", pos[0], err)
	}
	fmt.Printf("%s: ok: %s/%s version %d signed by %s, expires %s, %d files, %d templates, %d services, %d artifacts\n",
		pos[0], m.Cluster, m.Role, m.Version, keyID, m.Expires.Format(time.RFC3339),
		len(m.Files), len(m.Templates), len(m.Services), len(m.Artifacts))
	return nil
}

func bundlePublish(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	store := fs.String("store", "", "store: a directory, an http(s):// URL of a bundle server, or s3://BUCKET/PREFIX[?endpoint=URL&region=R] (credentials: the standard AWS chain)")
	var keys listFlag
	fs.Var(&keys, "key", "public key the bundle must be signed by (repeatable; directory and S3 stores)")
	pos, err := parseArgs(fs, args, "FILE")
	if err != nil {
		return err
	}
	if err := required("publish", map[string]string{"store": *store}); err != nil {
		return err
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	var m *bundle.Manifest
	if strings.HasPrefix(*store, "http://") || strings.HasPrefix(*store, "https://") {
		st, err := bundle.NewHTTPStore(*store, nil)
		if err != nil {
			return err
		}
		if m, err = st.Publish(ctx, f); err != nil {
			return err
		}
	} else if strings.HasPrefix(*store, "s3://") {
		pubs, err := bundle.ReadPublicKeyFiles(keys...)
		if err != nil {
			return err
		}
		st, err := bundle.NewS3Store(ctx, *store, bundle.S3Options{})
		if err != nil {
			return err
		}
		if m, err = st.Publish(ctx, f, bundle.PublishOptions{Keys: pubs}); err != nil {
			return err
		}
	} else {
		pubs, err := bundle.ReadPublicKeyFiles(keys...)
		if err != nil {
			return err
		}
		if m, err = bundle.NewDirStore(*store).Publish(ctx, f, bundle.PublishOptions{Keys: pubs}); err != nil {
			return err
		}
	}
	fmt.Printf("published %s/%s version %d to %s\n", m.Cluster, m.Role, m.Version, *store)
	return nil
}

func bundleServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8480", "address to listen on")
	poll := fs.Duration("poll", 100*time.Millisecond, "how often to look for new publishes while clients wait")
	maxWait := fs.Duration("max-wait", 5*time.Minute, "longest long poll a client may ask for")
	tlsCert := fs.String("tls-cert", "", "serve HTTPS with this certificate (PEM; with -tls-key)")
	tlsKey := fs.String("tls-key", "", "private key of -tls-cert (PEM)")
	var keys listFlag
	fs.Var(&keys, "key", "public key whose bundles may be published by PUT (repeatable; none: read-only)")
	pos, err := parseArgs(fs, args, "DIR")
	if err != nil {
		return err
	}
	if (*tlsCert == "") != (*tlsKey == "") {
		return fmt.Errorf("%w: bundle serve: -tls-cert and -tls-key go together", errUsage)
	}
	pubs, err := bundle.ReadPublicKeyFiles(keys...)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(pos[0]); err != nil || !fi.IsDir() {
		return fmt.Errorf("serve %s: not a directory", pos[0])
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	srv := bundle.NewServer(pos[0], bundle.ServerOptions{PollInterval: *poll, MaxWait: *maxWait, Keys: pubs, Logger: log})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	hs := &http.Server{
		Handler:           srv.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
	}()
	abs, _ := filepath.Abs(pos[0])
	scheme := "http"
	if *tlsCert != "" {
		scheme = "https"
	}
	log.Info("serving bundles", "dir", abs, "addr", ln.Addr().String(), "tls", *tlsCert != "", "publish", len(pubs) > 0)
	fmt.Printf("serving %s on %s://%s/v1/bundles/\n", abs, scheme, ln.Addr())
	if *tlsCert != "" {
		err = hs.ServeTLS(ln, *tlsCert, *tlsKey)
	} else {
		err = hs.Serve(ln)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
