package cluster

import (
	"fmt"
	"net/netip"
	"path"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/hcl/v2"

	"github.com/steppe/steppe/internal/hcldecode"
)

// Every machine runs CoreDNS as its local resolver (DESIGN: decision 12):
// the zone consul. goes to the machine's own Consul DNS port, everything
// else to the spec's upstream resolvers, or nowhere when it names none
// (then only consul. is answered and CoreDNS sends nothing off the
// machine). The agent switches the machine's resolv.conf to it once it
// answers (internal/agent: resolver.go), where the provider lets it.
const (
	CoreDNSProduct        = "coredns"
	DefaultCoreDNSVersion = "1.12.4"
	RoleCoreDNSConfig     = "Corefile.tmpl"
	serviceCoreDNS        = "coredns"
	// CoreDNSHealthPort is CoreDNS's health endpoint (GET /health) on the
	// machine's address: the service's readiness.
	CoreDNSHealthPort = 8053
	// ResolverStubAddress is where CoreDNS also listens on machines whose
	// loopback is their own (see coreDNSListen).
	ResolverStubAddress = "127.0.0.53"
	// DefaultCoreDNSMemory bounds CoreDNS: a cache of a few thousand
	// records and the forwarders fit in a few tens of MiB.
	DefaultCoreDNSMemory = 128 << 20
	// coreDNSCacheSeconds caps how long an answer is kept. Consul answers
	// with TTL 0, which CoreDNS keeps for its minimum of 5 s.
	coreDNSCacheSeconds = 10
)

// DNSSpec is the machines' resolver (spec: dns { upstream = [...] }).
type DNSSpec struct {
	// Upstream are the resolvers CoreDNS forwards every name outside
	// consul. to (IP or IP:port). None: only consul. is answered.
	Upstream []string
}

// decodeDNS reads dns { upstream = ["10.0.0.2", "10.0.0.3:5353"] }.
func decodeDNS(b *hcl.Block, d *DNSSpec) hcl.Diagnostics {
	c, diags := b.Body.Content(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "upstream"}}})
	a, ok := c.Attributes["upstream"]
	if !ok {
		return diags
	}
	var ups []string
	if dd := hcldecode.Expr(a.Expr, nil, &ups); dd.HasErrors() {
		return append(diags, dd...)
	}
	for _, u := range ups {
		if _, err := upstreamAddr(u); err != nil {
			diags = append(diags, errAt(a.Expr.Range(), "Invalid dns upstream", fmt.Sprintf("%q: %v", u, err))...)
		}
	}
	d.Upstream = ups
	return diags
}

// upstreamAddr is an upstream resolver as CoreDNS's forward takes it: an
// IP address with an optional port (53 by default); names would need a
// resolver to find the resolver.
func upstreamAddr(s string) (string, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return "", fmt.Errorf("port 0: give an IP address, or IP:port such as 10.0.0.2:53")
		}
		return ap.String(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil && !a.Is4In6() && a.Zone() == "" {
		return netip.AddrPortFrom(a, 53).String(), nil
	}
	return "", fmt.Errorf("want an IP address, or IP:port such as 10.0.0.2:53")
}

// coreDNSListen are the addresses CoreDNS serves on (port 53): the
// machine's own, and the stub address 127.0.0.53 where the machine's
// loopback is its own (netns, qemu). On the local provider every machine
// shares the host's loopback, so 127.0.0.53 would be one address for all
// of them (and the host's systemd-resolved may hold it); on ssh it is the
// adopted host's, whose resolver may be there. The machine's address is
// what resolv.conf names either way: Docker drops loopback nameservers
// from the resolv.conf it gives containers, not the machine's address.
func coreDNSListen(spec *Spec) []string {
	ls := []string{factAddress}
	switch spec.Provider.Name {
	case "netns", "qemu":
		ls = append(ls, ResolverStubAddress)
	}
	return ls
}

// planCoreDNS adds the local resolver to a role's plan: its Corefile (a
// template rendered per machine), artifact, variable and service.
func planCoreDNS(spec *Spec, p *RolePlan, mem map[string]int64) error {
	version := spec.Versions.CoreDNS
	if version == "" {
		version = DefaultCoreDNSVersion
	}
	corefile, err := coreDNSCorefile(spec)
	if err != nil {
		return fmt.Errorf("plan %s: corefile: %w", p.Role, err)
	}
	p.Files[RoleCoreDNSConfig] = corefile
	p.Artifacts = append(p.Artifacts, ArtifactRef{Product: CoreDNSProduct, Version: version})
	p.Vars["coredns_version"] = version
	s := coreDNSService()
	s.MemoryMax = mem[CoreDNSProduct]
	if s.MemoryMax == 0 {
		s.MemoryMax = DefaultCoreDNSMemory
	}
	p.Services = append(p.Services, s)
	return nil
}

// coreDNSCorefile is the Corefile template. No log plugin: queries are not
// logged (errors are). With no upstream there is no "." block, so CoreDNS
// answers REFUSED for other names and sends nothing anywhere.
func coreDNSCorefile(spec *Spec) ([]byte, error) {
	bind := strings.Join(coreDNSListen(spec), " ")
	var b strings.Builder
	b.WriteString("# Written by steppe: the machine's local resolver.\n")
	fmt.Fprintf(&b, "consul.:53 {\n  bind %s\n  forward . %s:%d\n  cache %d\n  errors\n  health %s:%d\n}\n",
		bind, factAddress, ConsulDNSPort, coreDNSCacheSeconds, factAddress, CoreDNSHealthPort)
	if len(spec.DNS.Upstream) == 0 {
		b.WriteString("# No upstream resolvers (spec: dns { upstream = [...] }): only consul. is answered.\n")
		return []byte(b.String()), nil
	}
	var ups []string
	for _, u := range spec.DNS.Upstream {
		a, err := upstreamAddr(u)
		if err != nil {
			return nil, fmt.Errorf("dns upstream %q: %w", u, err)
		}
		ups = append(ups, a)
	}
	fmt.Fprintf(&b, ".:53 {\n  bind %s\n  forward . %s\n  cache %d\n  errors\n}\n", bind, strings.Join(ups, " "), coreDNSCacheSeconds)
	return []byte(b.String()), nil
}

func coreDNSService() ServiceDef {
	return ServiceDef{
		Name:     serviceCoreDNS,
		Artifact: CoreDNSProduct,
		Args:     []string{"-conf=" + path.Join(factConfigDir, renderedName(RoleCoreDNSConfig))},
		// It needs nothing of Consul to start: until Consul answers, it
		// answers SERVFAIL for consul. and the agent keeps resolv.conf
		// as it was.
		StopSignal:   syscall.SIGTERM,
		StopTimeout:  10 * time.Second,
		StopMode:     StopCgroup,
		ReloadSignal: syscall.SIGUSR1, // CoreDNS reloads its Corefile on SIGUSR1
		Restart:      RestartAlways,
		Ready:        &Readiness{HTTP: fmt.Sprintf("http://%s:%d/health", factAddress, CoreDNSHealthPort), Timeout: time.Minute},
	}
}
