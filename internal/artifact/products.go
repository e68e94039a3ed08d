package artifact

import (
	"context"
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"time"
)

// product describes how one HashiCorp product is built the way its own
// release build does it (GNUmakefile / scripts/build.sh of each product).
type product struct {
	name   string // "nomad": file names, index names
	title  string // "Nomad": first word of "<bin> version"
	module string // Go module path of the product's root module
	// cgo is set for products that cannot be built without cgo; they are
	// linked statically against musl.
	cgo  bool
	tags []string
	// shortCommit: the product stamps the abbreviated commit (Consul's
	// GNUmakefile uses `git rev-parse --short HEAD`).
	shortCommit bool
	// loudFallback: falling back to the sub-module version the root go.mod
	// requires builds something other than the release, so it is a warning.
	loudFallback bool
	// stampPrerelease: VersionPrerelease is a plain string variable that the
	// linker can set; Consul and Vault derive it from an embedded VERSION file.
	stampPrerelease bool
	// pins name, per product version, the sub-module versions to use when
	// the tagged commit's cannot be had and the version go.mod requires
	// does not compile against the release's code.
	pins map[string]map[string]string
	// versionPackage is where the commit is stamped; "" means the
	// module's /version package (HashiCorp's layout).
	versionPackage string
	// versionFlag, when set, is how the binary prints its version
	// (CoreDNS: -version, first line "CoreDNS-1.12.4"), instead of
	// HashiCorp's `version` subcommand and "Nomad v1.9.3".
	versionFlag string
}

func (p product) versionPkg() string {
	if p.versionPackage != "" {
		return p.versionPackage
	}
	return p.module + "/version"
}

// checkVersion runs the built binary's version command and checks that it
// names the version built.
func (p product) checkVersion(ctx context.Context, bin, ver string) (string, error) {
	if p.versionFlag == "" {
		return checkVersion(ctx, bin, p.title, ver)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, p.versionFlag).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", bin, p.versionFlag, err, strings.TrimSpace(string(out)))
	}
	if want := p.title + "-" + ver; firstLine(string(out)) != want {
		return string(out), fmt.Errorf("%s %s says %q, want %q", bin, p.versionFlag, firstLine(string(out)), want)
	}
	return string(out), nil
}

// products is a function rather than a package variable so that nothing
// can mutate the table.
func products() map[string]product {
	return map[string]product{
		"nomad": {
			name: "nomad", title: "Nomad", module: "github.com/hashicorp/nomad",
			// runc's nsenter needs cgo. The tags of Nomad's release target
			// (ui codegen_generated release) plus the pure-Go resolvers so
			// that the static binary needs no NSS.
			cgo:             true,
			tags:            []string{"ui", "codegen_generated", "release", "netgo", "osusergo"},
			loudFallback:    true,
			stampPrerelease: true,
		},
		"consul": {
			name: "consul", title: "Consul", module: "github.com/hashicorp/consul",
			tags:        []string{"netgo", "osusergo"},
			shortCommit: true,
			pins: map[string]map[string]string{
				// 1.14.8's go.mod requires api v1.18.0 (Nov 2022), but its
				// in-tree api already had RaftServer.LastIndex, which
				// `operator raft list-peers` uses; the first tag with it
				// is api v1.18.1, the 1.14.x line's (1.14.11 requires it).
				"1.14.8": {"github.com/hashicorp/consul/api": "v1.18.1"},
			},
		},
		// CoreDNS, the machines' local resolver (DESIGN: decision 12), as
		// its Makefile builds it: the main package at the module root,
		// CGO_ENABLED=0, the commit in coremain.GitCommit.
		"coredns": {
			name: "coredns", title: "CoreDNS", module: "github.com/coredns/coredns",
			tags:           []string{"netgo", "osusergo"},
			shortCommit:    true,
			versionPackage: "github.com/coredns/coredns/coremain",
			versionFlag:    "-version",
		},
		"vault": {
			name: "vault", title: "Vault", module: "github.com/hashicorp/vault",
			tags: []string{"netgo", "osusergo"},
		},
	}
}

func lookupProduct(name string) (product, error) {
	ps := products()
	p, ok := ps[name]
	if !ok {
		names := make([]string, 0, len(ps))
		for n := range ps {
			names = append(names, n)
		}
		sort.Strings(names)
		return product{}, fmt.Errorf("unknown product %q (known: %s)", name, strings.Join(names, ", "))
	}
	return p, nil
}

// Products lists the products steppe knows how to build.
func Products() []string {
	ps := products()
	names := make([]string, 0, len(ps))
	for n := range ps {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// ParseRef splits "nomad@1.9.3" (a leading "v" on the version is accepted)
// into product and version and checks that the product is known.
func ParseRef(ref string) (product, version string, err error) {
	name, ver, ok := strings.Cut(ref, "@")
	if !ok || name == "" || ver == "" {
		return "", "", fmt.Errorf("artifact %q: want PRODUCT@VERSION, e.g. nomad@1.9.3", ref)
	}
	if _, err := lookupProduct(name); err != nil {
		return "", "", fmt.Errorf("artifact %q: %w", ref, err)
	}
	ver, err = normalizeVersion(ver)
	if err != nil {
		return "", "", fmt.Errorf("artifact %q: %w", ref, err)
	}
	return name, ver, nil
}
