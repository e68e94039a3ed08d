package deploy

import (
	"maps"

	"github.com/steppe/steppe/internal/cluster"
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
