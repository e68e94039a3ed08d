package deploy

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/supervise"
)

// withCoreDNS adds the spec's CoreDNS version to the versions an
// operation makes sure of: every machine's plan runs CoreDNS (its local
// resolver), but the fleet tracks only the daemons it upgrades with gates,
// so CoreDNS follows the spec.
func withCoreDNS(spec *cluster.Spec, versions map[string][]string) map[string][]string {
	v := spec.Versions.CoreDNS
	if v == "" {
		v = cluster.DefaultCoreDNSVersion
	}
	out := maps.Clone(versions)
	if out == nil {
		out = map[string][]string{}
	}
	out[cluster.CoreDNSProduct] = append(out[cluster.CoreDNSProduct], v)
	return out
}

// resolverWaitGrace is how long a machine's resolv.conf may stay
// unswitched after its agent started before status calls it a problem:
// CoreDNS answers consul. once the machine's Consul does.
const resolverWaitGrace = 30 * time.Second

// resolverStatus sums up a machine's resolv.conf switch from its agent's
// report, and the problem it is, if any.
func resolverStatus(machine string, st agent.StatusReport, now time.Time) (summary, problem string) {
	r := st.Resolver
	if r == nil {
		if slices.ContainsFunc(st.Services, func(s supervise.Status) bool { return s.Name == cluster.CoreDNSProduct }) {
			return "resolv.conf: host's, not switched", ""
		}
		return "", ""
	}
	since := r.Since.UTC().Format(time.RFC3339)
	switch r.State {
	case agent.ResolverSwitched:
		return fmt.Sprintf("resolv.conf: switched to CoreDNS at %s since %s", r.Address, since), ""
	case agent.ResolverFallback:
		return fmt.Sprintf("resolv.conf: back on the previous one since %s (CoreDNS at %s not answering: %s)", since, r.Address, r.LastError),
			fmt.Sprintf("machine %s: its resolver (CoreDNS at %s) stopped answering, resolv.conf is back on the previous one since %s (%s): see steppe agent logs coredns on it", machine, r.Address, since, r.LastError)
	default:
		summary = fmt.Sprintf("resolv.conf: not switched yet, CoreDNS at %s has not answered consul. (%s)", r.Address, r.LastError)
		if now.Sub(st.Agent.StartedAt) > resolverWaitGrace {
			problem = fmt.Sprintf("machine %s: its resolver (CoreDNS at %s) has not answered a consul. query since its agent started %s ago (%s), so resolv.conf is not switched", machine, r.Address, now.Sub(st.Agent.StartedAt).Round(time.Second), r.LastError)
		}
		return summary, problem
	}
}

// dnsSummary says what the machines' resolvers answer.
func dnsSummary(spec *cluster.Spec) string {
	if len(spec.DNS.Upstream) == 0 {
		return "CoreDNS on every machine answers consul. only: the spec names no upstream resolvers (dns { upstream = [...] })"
	}
	return "CoreDNS on every machine: consul. from the machine's Consul, other names from " + strings.Join(spec.DNS.Upstream, ", ")
}
