package main

import (
	"fmt"
	"io"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/deploy"
)

// printDNS is the resolvers' part of steppe status: what they answer, and
// each machine's resolv.conf.
func printDNS(w io.Writer, st *deploy.Status) {
	if st.DNS == "" {
		return
	}
	fmt.Fprintf(w, "\ndns: %s\n", st.DNS)
	for _, a := range st.Agents {
		if a.Resolver != "" {
			fmt.Fprintf(w, "  %-24s %s\n", a.Machine, a.Resolver)
		}
	}
}

// printAgentResolver is the resolver line of steppe agent status.
func printAgentResolver(w io.Writer, r *agent.ResolverStatus, now time.Time) {
	if r == nil {
		return
	}
	fmt.Fprintf(w, "resolv.conf %s: %s for %s (resolver %s, fallback after %s, %d switches)\n",
		r.ResolvConf, r.State, now.Sub(r.Since).Round(time.Second), r.Address, r.FallbackAfter, r.Switches)
	if r.LastError != "" {
		fmt.Fprintf(w, "  last probe: %s\n", r.LastError)
	}
}
