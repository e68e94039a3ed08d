// Command steppe is both the machine agent and the operator's tool for
// running a Nomad cluster. This file only dispatches to the command groups;
// each group lives in its own file and the logic in internal/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/initmode"
	"github.com/steppe/steppe/internal/provider"
	"github.com/steppe/steppe/internal/supervise"
)

const usage = `steppe: run Nomad somewhere, and keep it healthy.

  steppe version                       this binary's version

Machine:
  steppe agent -config FILE            run the machine agent
  steppe agent status [-json]          services, state, pid, restarts, readiness, last error
  steppe agent logs SERVICE [-n N] [-f] the tail of a service's log; -f follows it
  steppe agent restart|reload|stop|start SERVICE

Operator:
  steppe bundle keygen|build|sign|verify|publish|serve
  steppe artifact build PRODUCT@VERSION [-out DIR]
  steppe artifact serve DIR [-addr ADDR]
  steppe up [-spec cluster.hcl]        create or converge a cluster (local provider)
  steppe status [-json]                the whole cluster at a glance
  steppe env                           exports for the nomad, consul and vault CLIs
  steppe vault unseal                  unseal every sealed Vault server with the kept key shares
  steppe down                          remove everything up made
  steppe upgrade [-nomad V] [-consul V] [-vault V]   rolling, health-gated, resumable
  steppe upgrade -steppe V [-steppe-binary FILE]   the agents move to steppe V, no daemon restarted
  steppe scale POOL COUNT              grow a client pool, or drain and shrink it
  steppe prometheus [-out FILE]        scrape configuration for every Consul and Nomad agent
  steppe rotate certs|gossip|tokens    renew certificates (same CA), gossip keys or machine tokens, reloading
  steppe image build [-kernel PATH] [-out FILE] [-format raw|qcow2] [-size SIZE]   a bootable machine image, steppe as init

Long work (up, upgrade, scale, rotate, artifact build) shows a live line per
build, machine or step on a terminal, plain lines elsewhere; -progress=plain|tty
or STEPPE_PROGRESS=plain|tty forces either.
`

// version is steppe's version, stamped at build time:
// go build -ldflags "-X main.version=0.2.0" ./cmd/steppe
var version string

// steppeVersion is the stamped version, else 0.0.0-dev with the commit the
// binary was built from (and .dirty when the tree had changes).
func steppeVersion() string {
	if version != "" {
		return version
	}
	v := "0.0.0-dev"
	if bi, ok := debug.ReadBuildInfo(); ok {
		var rev, dirty string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					dirty = ".dirty"
				}
			}
		}
		if len(rev) >= 12 {
			v += "+" + rev[:12] + dirty
		}
	}
	return v
}

// errUsage marks errors caused by how steppe was invoked; they exit with 2.
var errUsage = errors.New("usage")

func main() {
	// Booted by the kernel as a machine image's init: be PID 1 (never returns).
	if initmode.IsInit() {
		initmode.Main()
	}
	// The supervisor starts some services through steppe itself, which joins
	// the service's memory cgroup and then execs the real program.
	if len(os.Args) > 1 && os.Args[1] == supervise.ExecArg {
		err := supervise.ExecMain(os.Args[2:])
		fmt.Fprintf(os.Stderr, "steppe exec: %v\n", err)
		os.Exit(127)
	}
	// A self-upgrading agent leaves a watchdog of its previous binary.
	if len(os.Args) > 1 && os.Args[1] == agent.WatchArg {
		if err := agent.WatchMain(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "steppe upgrade watchdog: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// The netns provider starts each machine's agent through steppe
	// itself, which enters the machine's namespaces and then execs it.
	if len(os.Args) > 1 && os.Args[1] == provider.NetnsExecArg {
		err := provider.NetnsExecMain(os.Args[2:])
		fmt.Fprintf(os.Stderr, "steppe netns: %v\n", err)
		os.Exit(127)
	}
	// The ssh provider's Destroy runs the installed steppe on the host for
	// the host's half of the teardown.
	if len(os.Args) > 1 && os.Args[1] == provider.SSHTeardownArg {
		if err := provider.SSHTeardownMain(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "steppe ssh teardown: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "steppe: %v\n", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("%w: no command given", errUsage)
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "agent":
		return runAgent(ctx, rest)
	case "artifact":
		return runArtifact(ctx, rest)
	case "bundle":
		return runBundle(ctx, rest)
	case "version":
		if len(rest) > 0 {
			return fmt.Errorf("%w: steppe version takes no arguments", errUsage)
		}
		fmt.Println("steppe " + steppeVersion())
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Print(usage)
		return nil
	case "up":
		return runUp(ctx, rest)
	case "status":
		return runStatus(ctx, rest)
	case "env":
		return runEnv(ctx, rest)
	case "down":
		return runDown(ctx, rest)
	case "upgrade":
		return runUpgrade(ctx, rest)
	case "scale":
		return runScale(ctx, rest)
	case "prometheus":
		return runPrometheus(ctx, rest)
	case "rotate":
		return runRotate(ctx, rest)
	case "vault":
		return runVault(ctx, rest)
	case "image":
		return runImage(ctx, rest)
	default:
		fmt.Fprint(os.Stderr, usage)
		return fmt.Errorf("%w: unknown command %q", errUsage, cmd)
	}
}
