package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/deploy"
	"github.com/steppe/steppe/internal/upgrade"
)

// clusterFlags are the flags every cluster command shares.
func clusterFlags(name string) (*flag.FlagSet, *deploy.Options) {
	fs := flag.NewFlagSet("steppe "+name, flag.ContinueOnError)
	o := &deploy.Options{}
	o.Out = progressOutput(fs, os.Stdout)
	fs.StringVar(&o.SpecPath, "spec", "", "cluster spec (cluster.hcl); default: the one up kept, else 3 servers and 2 clients")
	fs.StringVar(&o.StateDir, "state", os.Getenv("STEPPE_STATE"), "the operator's state directory (env STEPPE_STATE; default ~/.local/state/steppe/NAME)")
	fs.StringVar(&o.CacheDir, "cache", "", "artifact cache (default $STEPPE_CACHE, else ~/.cache/steppe)")
	return fs, o
}

func runUp(ctx context.Context, args []string) error {
	fs, o := clusterFlags("up")
	timeout := fs.Duration("timeout", 15*time.Minute, "give up after this long (binary builds not counted)")
	machineTimeout := fs.Duration("machine-timeout", 5*time.Minute, "how long a machine may take to become healthy")
	if _, err := parseNoArgs(fs, args); err != nil {
		return err
	}
	defer closeProgress(o.Out)
	_, err := deploy.Up(ctx, deploy.UpOptions{Options: *o, Timeout: *timeout, MachineTimeout: *machineTimeout})
	return err
}

func runUpgrade(ctx context.Context, args []string) error {
	fs, o := clusterFlags("upgrade")
	nomad := fs.String("nomad", "", "Nomad version to upgrade to")
	consul := fs.String("consul", "", "Consul version to upgrade to")
	vault := fs.String("vault", "", "Vault version to upgrade to")
	force := fs.Bool("force", false, "allow a downgrade or a jump of more than one minor version (never an unhealthy cluster)")
	surge := fs.Bool("surge", false, "replace client machines with new ones instead of upgrading them in place")
	parallel := fs.Int("parallel", 1, "client machines of a pool upgraded at once")
	drain := fs.Duration("drain-deadline", 5*time.Minute, "bound on each client's drain (jobs migrate as their migrate blocks say)")
	stable := fs.Duration("stable", 10*time.Second, "how long each upgraded server must stay healthy before the next")
	gateTimeout := fs.Duration("gate-timeout", 5*time.Minute, "how long a server may take to pass its gate")
	machineTimeout := fs.Duration("machine-timeout", 5*time.Minute, "how long a machine may take to run its new release")
	steppe := fs.String("steppe", "", "steppe version the machines' agents move to (no daemon restarts); alone, not with other versions")
	steppeBinary := fs.String("steppe-binary", "", "with -steppe: a steppe binary of that version to publish into the cluster's store (default: this binary, if it is that version)")
	if _, err := parseNoArgs(fs, args); err != nil {
		return err
	}
	if *steppe != "" {
		if *nomad != "" || *consul != "" || *vault != "" || *surge {
			return fmt.Errorf("%w: upgrade -steppe runs on its own: upgrade the daemons before or after it", errUsage)
		}
		mt := *machineTimeout
		if !flagSet(fs, "machine-timeout") {
			mt = 0
		}
		defer closeProgress(o.Out)
		return deploy.UpgradeSteppe(ctx, deploy.SteppeUpgradeOptions{
			Options: *o, Version: *steppe, Source: *steppeBinary, Parallel: *parallel, MachineTimeout: mt,
		})
	}
	if *steppeBinary != "" {
		return fmt.Errorf("%w: -steppe-binary goes with -steppe V", errUsage)
	}
	target := map[string]string{}
	for p, v := range map[string]string{"nomad": *nomad, "consul": *consul, "vault": *vault} {
		if v != "" {
			target[p] = v
		}
	}
	defer closeProgress(o.Out)
	_, err := deploy.Upgrade(ctx, deploy.UpgradeOptions{
		Options: *o, Target: target, Force: *force,
		Clients:        upgrade.ClientStrategy{Parallelism: *parallel, DrainDeadline: *drain, Surge: *surge},
		Gate:           upgrade.Gate{Stable: *stable, Timeout: *gateTimeout},
		MachineTimeout: *machineTimeout,
	})
	return err
}

func runScale(ctx context.Context, args []string) error {
	fs, o := clusterFlags("scale")
	drain := fs.Duration("drain-deadline", 5*time.Minute, "bound on each removed machine's drain (jobs migrate as their migrate blocks say)")
	machineTimeout := fs.Duration("machine-timeout", 5*time.Minute, "how long a new machine may take to become healthy")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if len(pos) != 2 {
		return fmt.Errorf("%w: steppe scale POOL COUNT", errUsage)
	}
	n, err := strconv.Atoi(pos[1])
	if err != nil || n < 0 {
		return fmt.Errorf("%w: steppe scale POOL COUNT: count %q is not a number of machines", errUsage, pos[1])
	}
	defer closeProgress(o.Out)
	_, err = deploy.Scale(ctx, deploy.ScaleOptions{Options: *o, Pool: pos[0], Count: n, DrainDeadline: *drain, MachineTimeout: *machineTimeout})
	return err
}

func runDown(ctx context.Context, args []string) error {
	fs, o := clusterFlags("down")
	if _, err := parseNoArgs(fs, args); err != nil {
		return err
	}
	defer closeProgress(o.Out)
	return deploy.Down(ctx, *o)
}

func runEnv(ctx context.Context, args []string) error {
	fs, o := clusterFlags("env")
	if _, err := parseNoArgs(fs, args); err != nil {
		return err
	}
	o.Out = nil
	vars, err := deploy.Env(ctx, *o)
	if err != nil {
		return err
	}
	bin, err := deploy.CLIBinDir(*o)
	if err != nil {
		return err
	}
	for _, kv := range vars {
		k, v, _ := strings.Cut(kv, "=")
		fmt.Printf("export %s=%s\n", k, deploy.ShellQuote(v))
	}
	// The cluster's own nomad and consul come first on PATH.
	fmt.Printf("export PATH=%s:\"$PATH\"\n", deploy.ShellQuote(bin))
	return nil
}

func runStatus(ctx context.Context, args []string) error {
	fs, o := clusterFlags("status")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parseNoArgs(fs, args); err != nil {
		return err
	}
	o.Out = nil
	st, err := deploy.GetStatus(ctx, *o)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return err
		}
	} else {
		printClusterStatus(os.Stdout, st)
	}
	if !st.Healthy {
		return fmt.Errorf("cluster %s is not healthy (%d problems)", st.Cluster, len(st.Problems))
	}
	return nil
}

func parseNoArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errUsage, err)
	}
	if len(pos) > 0 {
		return nil, fmt.Errorf("%w: %s takes no arguments, got %q", errUsage, fs.Name(), pos)
	}
	return pos, nil
}

func printClusterStatus(w io.Writer, st *deploy.Status) {
	health := "healthy"
	if !st.Healthy {
		health = "NOT healthy"
	}
	fmt.Fprintf(w, "cluster %s: %s (state %s)\n", st.Cluster, health, st.StateDir)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if st.Raft != nil {
		fmt.Fprintf(w, "\nNomad servers: leader %s, %d voters of %d raft peers\n", dash(st.Raft.Leader), st.Raft.Voters, st.Raft.Peers)
	}
	fmt.Fprintln(tw, "SERVER\tADDRESS\tSTATUS\tLEADER\tVOTER\tNOMAD")
	for _, s := range st.Servers {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%v\t%s\n", s.Name, s.Address, s.Status, s.Leader, s.Voter, s.Version)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "CLIENT\tADDRESS\tPOOL\tSTATUS\tELIGIBLE\tDRAIN\tNOMAD")
	for _, c := range st.Clients {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\t%v\t%s\n", c.Name, c.Address, c.Pool, c.Status, c.Eligible, c.Drain, c.Version)
	}
	tw.Flush()
	fmt.Fprintln(w)
	if v := st.Vault; v != nil {
		fmt.Fprintf(w, "Vault servers: leader %s, %d voters\n", dash(v.Leader), v.Voters)
		fmt.Fprintln(tw, "VAULT\tADDRESS\tSTATE\tVOTER\tVAULT")
		for _, s := range v.Servers {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\n", s.Name, s.Address, s.State, s.Voter, dash(s.Version))
		}
		tw.Flush()
		fmt.Fprintln(w)
	}
	fmt.Fprintln(tw, "CONSUL MEMBER\tADDRESS\tSTATUS\tSERVER\tCONSUL")
	for _, m := range st.Consul {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\n", m.Name, m.Address, m.Status, m.Server, m.Version)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "MACHINE\tADDRESS\tROLE\tAGENT\tRELEASE\tVERSIONS\tSERVICES")
	for _, a := range st.Agents {
		agentCol := "stopped"
		if a.Running {
			agentCol = fmt.Sprintf("pid %d", a.PID)
		}
		var svcs []string
		for _, s := range a.Services {
			r := ""
			if !s.Ready {
				r = ",not ready"
			}
			svcs = append(svcs, fmt.Sprintf("%s %s%s (pid %d, %d restarts)", s.Name, s.State, r, s.PID, s.Restarts))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", a.Machine, a.Address, a.Role, agentCol, a.Release, machineVersions(a), strings.Join(svcs, "; "))
	}
	tw.Flush()
	for _, a := range st.Agents {
		if su := a.SelfUpgrade; su != nil && su.State == agent.TrialRolledBack {
			fmt.Fprintf(w, "%s: self-upgrade to steppe %s rolled back: %s\n", a.Machine, su.Version, su.Error)
		}
	}
	printDNS(w, st)
	if len(st.Problems) > 0 {
		fmt.Fprintln(w, "\nproblems:")
		for _, p := range st.Problems {
			fmt.Fprintf(w, "  - %s\n", p)
		}
	}
}

// machineVersions is "consul 1.14.11, nomad 1.10.5", with what a daemon
// runs when it is not yet what the machine is set to run
// ("nomad 1.10.5 (runs 1.9.3)").
func machineVersions(a deploy.AgentStatus) string {
	var parts []string
	for _, p := range []string{"consul", "nomad", "vault", "steppe"} {
		want, runs := a.Versions[p], a.Runs[p]
		switch {
		case want == "" && runs == "":
			continue
		case want == "":
			parts = append(parts, p+" "+runs)
		case runs != "" && runs != want:
			parts = append(parts, fmt.Sprintf("%s %s (runs %s)", p, want, runs))
		default:
			parts = append(parts, p+" "+want)
		}
	}
	return dash(strings.Join(parts, ", "))
}

// flagSet says whether the command line set the flag.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
