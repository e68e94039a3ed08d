package cluster

import (
	"fmt"
	"net"
	"strings"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"

	"github.com/steppe/steppe/internal/hcldecode"
)

// Host is an existing host of provider "ssh": a machine is made of it by
// installing steppe's agent over SSH (internal/provider's SSH).
//
//	provider "ssh" {
//	  host {
//	    address  = "192.0.2.10"
//	    port     = 22                     # default 22
//	    user     = "root"                 # default root
//	    key      = "~/.ssh/id_ed25519"    # default: the SSH agent
//	    host_key = "ssh-ed25519 AAAA..."  # or known_hosts = "FILE"
//	  }
//	}
type Host struct {
	Address    string
	Port       int
	User       string
	Key        string
	HostKey    string
	KnownHosts string
}

// decodeHosts takes the host blocks out of a provider block and returns
// its attributes (the provider's options). Only provider "ssh" has hosts,
// and it needs at least one.
func decodeHosts(b *hcl.Block, p *Provider) (hcl.Attributes, hcl.Diagnostics) {
	c, rest, diags := b.Body.PartialContent(&hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{{Type: "host"}}})
	var attrs hcl.Attributes
	// hclsyntax's JustAttributes refuses the host blocks PartialContent
	// took: read the attributes of a native body directly.
	if sb, ok := b.Body.(*hclsyntax.Body); ok {
		attrs = hcl.Attributes{}
		for n, a := range sb.Attributes {
			attrs[n] = a.AsHCLAttribute()
		}
		for _, blk := range sb.Blocks {
			if blk.Type != "host" {
				diags = append(diags, errAt(blk.TypeRange, fmt.Sprintf("Unexpected %q block", blk.Type), "a provider block holds options and, for provider \"ssh\", host blocks")...)
			}
		}
	} else {
		var d hcl.Diagnostics
		attrs, d = rest.JustAttributes()
		diags = append(diags, d...)
	}
	hostSchema := &hcl.BodySchema{Attributes: []hcl.AttributeSchema{
		{Name: "address", Required: true}, {Name: "port"}, {Name: "user"}, {Name: "key"}, {Name: "host_key"}, {Name: "known_hosts"},
	}}
	seen := map[string]hcl.Range{}
	for _, hb := range c.Blocks {
		if p.Name != "ssh" {
			diags = append(diags, errAt(hb.DefRange, "Unexpected host block", fmt.Sprintf("provider %q makes its own machines: host blocks are for provider \"ssh\"", p.Name))...)
			continue
		}
		hc, d := hb.Body.Content(hostSchema)
		diags = append(diags, d...)
		if d.HasErrors() {
			continue
		}
		h := Host{Port: 22, User: "root"}
		for _, f := range []struct {
			name string
			dst  *string
		}{{"address", &h.Address}, {"user", &h.User}, {"key", &h.Key}, {"host_key", &h.HostKey}, {"known_hosts", &h.KnownHosts}} {
			if a, ok := hc.Attributes[f.name]; ok {
				diags = append(diags, hcldecode.Expr(a.Expr, nil, f.dst)...)
			}
		}
		if a, ok := hc.Attributes["port"]; ok {
			diags = append(diags, hcldecode.Expr(a.Expr, nil, &h.Port)...)
			if h.Port < 1 || h.Port > 65535 {
				diags = append(diags, errAt(a.Expr.Range(), "Invalid host port", fmt.Sprintf("%d: want 1 to 65535", h.Port))...)
			}
		}
		ar := hc.Attributes["address"].Expr.Range()
		if h.Address == "" || strings.ContainsAny(h.Address, " /:") && net.ParseIP(h.Address) == nil {
			diags = append(diags, errAt(ar, "Invalid host address", fmt.Sprintf("%q: want an IP address or a host name", h.Address))...)
		}
		if h.HostKey != "" && h.KnownHosts != "" {
			diags = append(diags, errAt(hb.DefRange, "Two host keys", "give host_key or known_hosts, not both")...)
		}
		key := net.JoinHostPort(h.Address, fmt.Sprint(h.Port))
		if r, ok := seen[key]; ok {
			diags = append(diags, errAt(ar, "Duplicate host", fmt.Sprintf("%s is listed twice (first at %s)", key, rangeString(r)))...)
		}
		seen[key] = ar
		p.Hosts = append(p.Hosts, h)
	}
	if p.Name == "ssh" && len(c.Blocks) == 0 {
		diags = append(diags, errAt(b.DefRange, "No hosts", "provider \"ssh\" makes machines of existing hosts: list them, each in a host { address = \"...\" } block")...)
	}
	return attrs, diags
}
