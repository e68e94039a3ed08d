package main

import (
	"fmt"
	"io"

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
