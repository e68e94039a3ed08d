package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/upgrade"
)

const rotateUsage = `steppe rotate certs|gossip|tokens [flags]

  certs   reissue every node certificate and the operator's, signed by the
          same cluster CA (the CA itself is not rotated), deliver them, and
          have Consul and Nomad reload them: no restart
  gossip  a new Consul and a new Nomad gossip key, installed, made primary
          and the old ones removed through the daemons' keyring APIs: no
          restart
  tokens  new per-machine ACL tokens (each Consul agent's token and each
          Nomad's Consul token): Consul takes its new token through its
          API; Nomad reads its Consul token only at start, so it restarts,
          servers one at a time behind the upgrade gates; then the old
          tokens are deleted

A rotation that is interrupted resumes when run again.
`

func runRotate(ctx context.Context, args []string) error {
	if len(args) == 0 || (args[0] != deploy.RotateCerts && args[0] != deploy.RotateGossip && args[0] != deploy.RotateTokens) {
		fmt.Fprint(os.Stderr, rotateUsage)
		if len(args) == 0 {
			return fmt.Errorf("%w: steppe rotate certs|gossip|tokens", errUsage)
		}
		return fmt.Errorf("%w: steppe rotate %q: want certs, gossip or tokens", errUsage, args[0])
	}
	what := args[0]
	fs, o := clusterFlags("rotate " + what)
	fs.Usage = func() { fmt.Fprint(fs.Output(), rotateUsage+"\nflags:\n"); fs.PrintDefaults() }
	stable := fs.Duration("stable", 10*time.Second, "how long a restarted server must stay healthy before the next (tokens)")
	gateTimeout := fs.Duration("gate-timeout", 5*time.Minute, "how long a restarted server may take to pass its gate")
	machineTimeout := fs.Duration("machine-timeout", 5*time.Minute, "how long a machine may take to load its new secrets")
	asJSON := fs.Bool("json", false, "print what was done as JSON (progress goes to stderr)")
	if _, err := parseNoArgs(fs, args[1:]); err != nil {
		return err
	}
	var out io.Writer = os.Stdout
	if *asJSON {
		o.Out = os.Stderr
	}
	defer closeProgress(o.Out)
	res, err := deploy.Rotate(ctx, deploy.RotateOptions{
		Options: *o, What: what,
		Gate:           upgrade.Gate{Stable: *stable, Timeout: *gateTimeout},
		MachineTimeout: *machineTimeout,
	})
	if *asJSON && res != nil {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(res); jerr != nil && err == nil {
			err = jerr
		}
	}
	return err
}
