package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/supervise"
)

func runAgent(ctx context.Context, args []string) error {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, rest := args[0], args[1:]
		switch sub {
		case "status":
			return agentStatus(ctx, rest)
		case "logs":
			return agentLogs(ctx, rest)
		case "start", "stop", "restart", "reload":
			return agentControl(ctx, sub, rest)
		default:
			return fmt.Errorf("%w: steppe agent %s: unknown subcommand (want status, logs, start, stop, restart or reload)", errUsage, sub)
		}
	}
	fs := flag.NewFlagSet("steppe agent", flag.ContinueOnError)
	config := fs.String("config", "", "the agent's config file (HCL)")
	state := fs.String("state", "", "state directory (overrides agent.state_dir; default "+agent.DefaultStateDir+")")
	socket := fs.String("socket", "", "local API socket (overrides agent.socket; default "+agent.DefaultSocket+")")
	pidfile := fs.String("pidfile", "", "write the agent's pid to this file as it starts")
	byInit := fs.Bool("restarted-by-init", false, "an init system restarts the agent when it dies (a failed self-upgrade leaves the restart to it)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if *config == "" || fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("%w: steppe agent needs -config FILE and nothing else", errUsage)
	}
	if os.Getenv("GOGC") == "" {
		// The agent's live heap is well under 1 MiB. With the default
		// GOGC of 100 the runtime lets garbage (status polls, restarts)
		// pile up to its 4 MiB minimum heap goal before it collects; at
		// 25 the goal is 1 MiB: a collection every few seconds under
		// continuous polling, each a fraction of a millisecond of CPU.
		debug.SetGCPercent(25)
	}
	if os.Getenv("GOMAXPROCS") == "" {
		// A supervisor gains nothing from running Go code in parallel:
		// it waits on processes, pipes and a socket. Each extra P keeps
		// its own cache of spans and stacks (about 0.5 MiB resident here).
		runtime.GOMAXPROCS(1)
	}
	return agent.Run(ctx, agent.Options{
		ConfigPath: *config,
		StateDir:   *state,
		Socket:     *socket,
		// The trampoline is this very binary, reached through the kernel's
		// link (the child resolves it after fork): it works when the file
		// was deleted (`go run`) or replaced by a newer steppe, whose
		// trampoline this agent may not speak.
		Exec:            []string{"/proc/self/exe"},
		Logger:          slog.New(slog.NewTextHandler(os.Stderr, nil)),
		Version:         steppeVersion(),
		PIDFile:         *pidfile,
		RestartedByInit: *byInit,
	})
}

// clientFlags are the flags of every command that talks to a running agent.
func clientFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	def := os.Getenv("STEPPE_AGENT_SOCKET")
	if def == "" {
		def = agent.DefaultSocket
	}
	socket := fs.String("socket", def, "the agent's local API socket (env STEPPE_AGENT_SOCKET)")
	return fs, socket
}

func agentStatus(ctx context.Context, args []string) error {
	fs, socket := clientFlags("steppe agent status")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parseInterspersed(fs, args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	st, err := agent.NewClient(*socket).Status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(os.Stdout, st, time.Now())
	return nil
}

func printStatus(w io.Writer, st agent.StatusReport, now time.Time) {
	fmt.Fprintf(w, "agent pid %d, steppe %s, up %s, config %s\n", st.Agent.PID, dash(st.Agent.Version), now.Sub(st.Agent.StartedAt).Round(time.Second), st.Agent.Config)
	if su := st.Agent.SelfUpgrade; su != nil && su.State == agent.TrialRolledBack {
		fmt.Fprintf(w, "self-upgrade to steppe %s failed %s ago: %s\n", su.Version, now.Sub(su.At).Round(time.Second), su.Error)
	}
	if st.Agent.Isolation == "fallback" {
		fmt.Fprintln(w, "WARNING: no writable cgroup v2: services are tracked by process group and lock only; a double fork can escape")
	}
	if b := st.Bundle; b != nil {
		fmt.Fprintf(w, "bundle %s/%s from %s: release %d", b.Cluster, b.Role, b.Store, b.Version)
		if b.Pending != 0 {
			fmt.Fprintf(w, ", applying %d", b.Pending)
		}
		if !b.LastPull.IsZero() {
			fmt.Fprintf(w, ", last pull %s ago", now.Sub(b.LastPull).Round(time.Second))
		}
		fmt.Fprintln(w)
		if b.LastError != "" {
			fmt.Fprintf(w, "  last error: %s\n", b.LastError)
		}
		if b.Failed != 0 {
			fmt.Fprintf(w, "  release %d failed and was rolled back: %s\n", b.Failed, b.FailedError)
		}
	}
	printAgentResolver(w, st.Resolver, now)
	for _, r := range st.Recoveries {
		if r.Error != "" {
			fmt.Fprintf(w, "%s: nomad client state recovery failed %s ago: %s (moved to %s; %s)\n", r.Service, now.Sub(r.At).Round(time.Second), r.Error, r.MovedTo, r.Reason)
			continue
		}
		fmt.Fprintf(w, "%s: nomad client state recovered %s ago: moved to %s (kept node identity: %v; %s)\n", r.Service, now.Sub(r.At).Round(time.Second), r.MovedTo, r.KeptIdentity, r.Reason)
	}
	if st.Agent.ConfigError != "" {
		fmt.Fprintf(w, "config reload refused (services run the previous config):\n  %s\n", strings.ReplaceAll(st.Agent.ConfigError, "\n", "\n  "))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tSTATE\tPID\tPROCS\tREADY\tRESTARTS\tSINCE\tLAST EXIT\tNOTE")
	for _, s := range st.Services {
		pid := "-"
		if s.PID > 0 {
			pid = fmt.Sprint(s.PID)
		}
		note := s.LastError
		if s.State == supervise.StateBackoff && !s.NextStart.IsZero() {
			note = strings.TrimSpace(fmt.Sprintf("next start in %s %s", s.NextStart.Sub(now).Round(time.Millisecond), note))
		}
		if s.Adopted && note == "" {
			note = "adopted"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%v\t%d\t%s\t%s\t%s\n", s.Name, s.State, pid, s.Processes, s.Ready, s.Restarts,
			now.Sub(s.Since).Round(time.Second), dash(s.LastExit), note)
	}
	tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func agentLogs(ctx context.Context, args []string) error {
	fs, socket := clientFlags("steppe agent logs")
	n := fs.Int("n", 50, "number of lines")
	follow := fs.Bool("f", false, "follow: go on printing lines as the service writes them, until interrupted")
	pos, err := parseInterspersed(fs, args)
	if err != nil || len(pos) != 1 {
		return fmt.Errorf("%w: steppe agent logs SERVICE [-n N] [-f]", errUsage)
	}
	c := agent.NewClient(*socket)
	if *follow {
		return followLogs(ctx, c, pos[0], *n, os.Stdout, os.Stderr)
	}
	lines, err := c.Logs(ctx, pos[0], *n)
	if err != nil {
		return err
	}
	for _, l := range lines {
		fmt.Println(l)
	}
	return nil
}

// followPoll is how often a follower asks for new lines: one short request
// each time, so that the agent keeps no connection open for a follower.
const followPoll = 200 * time.Millisecond

// followLogs prints a service's log as it grows, until ctx ends (Ctrl-C).
// As with `tail -F`, an error before the first answer ends it (no agent, no
// such service); once following, an agent that does not answer or does not
// know the service (it may be restarting) is reported once and asked again.
// What is not a log line goes to errw.
func followLogs(ctx context.Context, c *agent.Client, service string, n int, out, errw io.Writer) error {
	var cursor string
	away := false
	t := time.NewTicker(followPoll)
	defer t.Stop()
	for {
		chunk, err := c.FollowLogs(ctx, service, cursor, n)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil && cursor == "":
			return err
		case err != nil:
			if !away {
				fmt.Fprintf(errw, "steppe: %v; still trying\n", err)
				away = true
			}
		default:
			if away {
				fmt.Fprintf(errw, "steppe: the agent answers again\n")
				away = false
			}
			if chunk.Skipped > 0 {
				fmt.Fprintf(errw, "steppe: %d lines of %s went by too fast to follow; %s has them\n", chunk.Skipped, service, chunk.File)
			}
			if chunk.Reopened {
				fmt.Fprintf(errw, "steppe: the log of %s was reopened (agent restart or new service config); lines written meanwhile may be missing\n", service)
			}
			for _, l := range chunk.Lines {
				if _, err := fmt.Fprintln(out, l); err != nil {
					return err // a closed pipe: the reader is gone
				}
			}
			cursor = chunk.Cursor
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func agentControl(ctx context.Context, action string, args []string) error {
	fs, socket := clientFlags("steppe agent " + action)
	pos, err := parseInterspersed(fs, args)
	if err != nil || len(pos) != 1 {
		return fmt.Errorf("%w: steppe agent %s SERVICE", errUsage, action)
	}
	if err := agent.NewClient(*socket).Control(ctx, pos[0], action); err != nil {
		return fmt.Errorf("%s %s: %w", action, pos[0], err)
	}
	fmt.Printf("%s: %s done\n", pos[0], action)
	return nil
}
