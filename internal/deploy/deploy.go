// Package deploy brings a cluster described by a spec to life and takes it
// down again: `steppe up | status | env | down`. It builds on the plan and
// the secrets of internal/cluster, the machines of internal/provider, the
// signed bundles of internal/bundle, the artifacts of internal/artifact and
// the operations of internal/hashi.
//
// On the local provider the machines share the operator's filesystem, so
// they read the artifact store in place through a file:// URL (verified
// exactly as over HTTP: index, signed SHA256SUMS, digest) and pull their
// bundles from a directory store: no server process to track, no port to
// collide, nothing left running by the operator after up returns. The
// verified binaries are fetched once into a cache every local machine's
// agent uses (content-addressed by digest).
//
// The operator's state directory (0700) holds the cluster.State secrets,
// the bundle signing key, the bundle store, that shared cache and the
// machines themselves (provider.Local); `down` removes all of it.
package deploy

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/steppe/steppe/internal/artifact"
	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/provider"
)

// Options say where a cluster's spec and state are.
type Options struct {
	// SpecPath is the cluster.hcl; "" means the spec `up` kept in the
	// state directory, else the defaults.
	SpecPath string
	// StateDir is the operator's state directory; "" means
	// DefaultStateDir(spec name).
	StateDir string
	// CacheDir is the artifact cache; "" means artifact.DefaultCacheDir.
	CacheDir string
	// Binary is the steppe binary machines run; "" means this process's.
	Binary string
	// Out receives progress lines; nil discards them.
	Out io.Writer
}

// Files and directories of the state directory besides cluster.State's.
const (
	specCopy       = "cluster.hcl"
	markerFile     = "steppe-cluster"
	bundleKeyBase  = "bundle-signing"
	machinesDir    = "machines"
	artifactsCache = "artifacts"
	// artifactKeysDir holds copies of the spec's artifact_keys.
	artifactKeysDir = "artifact-keys"
)

// DefaultStateDir is $XDG_STATE_HOME/steppe/NAME, else
// ~/.local/state/steppe/NAME.
func DefaultStateDir(name string) (string, error) {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "steppe", name), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("state dir: no -state and %w", err)
	}
	return filepath.Join(home, ".local", "state", "steppe", name), nil
}

// env is a cluster's spec, directories and provider, as every command
// needs them.
type env struct {
	opts     Options
	spec     *cluster.Spec
	specSrc  []byte
	stateDir string
	cacheDir string
	local    *provider.Local
	out      io.Writer
}

// open resolves the spec and directories. It creates nothing.
func open(opts Options) (*env, error) {
	e := &env{opts: opts, out: opts.Out}
	if e.out == nil {
		e.out = io.Discard
	}
	var err error
	switch {
	case opts.SpecPath != "":
		if e.specSrc, err = os.ReadFile(opts.SpecPath); err != nil {
			return nil, fmt.Errorf("read cluster spec: %w", err)
		}
		if e.spec, err = cluster.ParseSpec(e.specSrc, opts.SpecPath); err != nil {
			return nil, err
		}
	case opts.StateDir != "":
		p := filepath.Join(opts.StateDir, specCopy)
		e.specSrc, err = os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			e.spec = cluster.DefaultSpec()
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read cluster spec: %w", err)
		}
		if e.spec, err = cluster.ParseSpec(e.specSrc, p); err != nil {
			return nil, err
		}
	default:
		e.spec = cluster.DefaultSpec()
	}
	e.stateDir = opts.StateDir
	if e.stateDir == "" {
		if e.stateDir, err = DefaultStateDir(e.spec.Name); err != nil {
			return nil, err
		}
		// The default directory of a named cluster holds its spec: use it
		// when no spec was given.
		if opts.SpecPath == "" {
			p := filepath.Join(e.stateDir, specCopy)
			if src, err := os.ReadFile(p); err == nil {
				if e.spec, err = cluster.ParseSpec(src, p); err != nil {
					return nil, err
				}
				e.specSrc = src
			}
		}
	}
	if e.stateDir, err = filepath.Abs(e.stateDir); err != nil {
		return nil, err
	}
	e.cacheDir = opts.CacheDir
	if e.cacheDir == "" {
		if e.cacheDir, err = artifact.DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	if e.local, err = newProvider(e.spec, e.stateDir, opts.Binary); err != nil {
		return nil, err
	}
	return e, nil
}

// bundleStoreDir is the directory store the machines pull from.
func (e *env) bundleStoreDir() (string, error) {
	s := e.spec.BundleStore
	if strings.HasPrefix(s, "s3://") {
		return s, nil // published by bundle.S3Store, pulled by the agents from it
	}
	if strings.Contains(s, "://") {
		return "", fmt.Errorf("bundle_store %q: the local provider publishes into a directory or an s3://BUCKET/PREFIX; leave bundle_store out or give a path", s)
	}
	if !filepath.IsAbs(s) {
		s = filepath.Join(e.stateDir, s)
	}
	return s, nil
}

// exists says whether up ever ran with this state directory.
func (e *env) exists() bool {
	_, err := os.Stat(filepath.Join(e.stateDir, markerFile))
	return err == nil
}

func (e *env) needState() error {
	if !e.exists() {
		return fmt.Errorf("no cluster %q in %s: run steppe up first (or name the state directory with -state)", e.spec.Name, e.stateDir)
	}
	return nil
}

// bundleKey loads the cluster's bundle signing key, creating it once.
func (e *env) bundleKey() (bundle.PrivateKey, string, error) {
	base := filepath.Join(e.stateDir, bundleKeyBase)
	priv, pub := base+".key", base+".pub"
	if k, err := bundle.ReadPrivateKeyFile(priv); err == nil {
		if _, err := os.Stat(pub); err == nil {
			return k, pub, nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return bundle.PrivateKey{}, "", fmt.Errorf("bundle signing key: %w", err)
	}
	k, err := bundle.GenerateKey()
	if err != nil {
		return bundle.PrivateKey{}, "", err
	}
	if _, _, err := bundle.WriteKeyPair(base, k); err != nil {
		return bundle.PrivateKey{}, "", fmt.Errorf("bundle signing key: %w", err)
	}
	return k, pub, nil
}

func (e *env) printf(format string, args ...any) {
	fmt.Fprintf(e.out, format+"\n", args...)
}
