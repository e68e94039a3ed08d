// Package cluster holds the cluster spec (cluster.hcl), the operator's
// secrets (CA, certificates, gossip keys, ACL tokens) and the planning that
// turns both into per-role bundle files and per-machine secret files.
package cluster

import (
	"errors"
	"fmt"
	"maps"
	"net/url"
	"os"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/hashicorp/go-version"
	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/steppe/steppe/internal/hcldecode"
	"github.com/zclconf/go-cty/cty"
)

// Defaults of a spec. The versions are ones that build from source here
// (DESIGN: facts), so that the very first `steppe up` works offline.
const (
	DefaultName          = "steppe"
	DefaultRegion        = "global"
	DefaultDatacenter    = "dc1"
	DefaultNomadVersion  = "1.10.5"
	DefaultConsulVersion = "1.14.11"
	DefaultVaultVersion  = "1.21.0"
	// DefaultVaultEnabled says whether a spec without a vault block runs
	// Vault on the servers.
	DefaultVaultEnabled = true
	// Vault's default Shamir split of its root key: 5 shares, 3 to
	// unseal (Vault's own default).
	DefaultVaultShares    = 5
	DefaultVaultThreshold = 3
	DefaultServers        = 3
	DefaultPoolName       = "default"
	DefaultPoolCount      = 2
	DefaultProvider       = "local"
	DefaultArtifactStore  = "https://releases.hashicorp.com"
	// DefaultBundleStore is a directory relative to the operator's state
	// directory.
	DefaultBundleStore = "bundles"
)

// Spec is a parsed cluster.hcl with every default filled in.
type Spec struct {
	Name       string
	Region     string
	Datacenter string
	Versions   Versions
	Servers    Servers
	Pools      []Pool // at least one; names unique
	// ArtifactKeys are files of armored OpenPGP public keys trusted to
	// sign a non-default ArtifactStore's SHA256SUMS (relative to the
	// spec's directory).
	ArtifactKeys []string
	// ArtifactStore is where daemon binaries come from: the HashiCorp
	// release site or a mirror of the same layout.
	ArtifactStore string
	// BundleStore is where signed bundles are published: a directory
	// (relative to the state directory when not absolute) or a URL.
	BundleStore string
	Provider    Provider
	Vault       VaultSpec
	DNS         DNSSpec

	// Warnings are things that are allowed but probably wrong, each
	// prefixed with file:line:col.
	Warnings []string
}

// Versions of the daemons. Vault is optional ("" means no Vault).
type Versions struct {
	Nomad   string
	Consul  string
	Vault   string
	CoreDNS string
}

// VaultSpec is how the servers run Vault (spec: a vault block).
type VaultSpec struct {
	Enabled bool
	// Shares and Threshold are the Shamir split of the root key made at
	// initialisation (changing them later needs a rekey, not built).
	Shares, Threshold int
	// Transit, when set, makes every Vault unseal itself through a
	// transit key in another Vault.
	Transit *TransitSeal
}

// TransitSeal is Vault's transit seal: a key in another Vault that wraps
// this cluster's root key, so a restarted Vault unseals itself.
type TransitSeal struct {
	Address   string // https URL of the other Vault
	KeyName   string
	MountPath string // default "transit/"
	// CAFile and TokenFile are files on the operator's machine (relative
	// to the spec's directory): the other Vault's CA, and a token that
	// may encrypt and decrypt with the key. The token is delivered to
	// the servers as a secret; it is never in a bundle.
	CAFile    string
	TokenFile string
}

// Servers are the machines that run the Consul and Nomad servers.
type Servers struct {
	Count int
	// Memory is each daemon's memory limit in bytes, by product.
	Memory map[string]int64
}

// Pool is a group of Nomad client machines configured alike.
type Pool struct {
	Name      string
	Count     int
	NodeClass string
	Meta      map[string]string
	// Memory is each daemon's memory limit in bytes, by product.
	Memory map[string]int64
	// Drivers are the Nomad task drivers the pool's clients run
	// (plan_docker.go); nil is DefaultDrivers.
	Drivers []string
}

// Default memory limits of the daemons (spec: servers and pool blocks,
// memory = { consul = "1GiB", nomad = "2GiB" }). The seed's Consul "died
// several times", probably of memory, and nothing said why: a limit makes
// a runaway daemon an OOM kill that steppe reports, before it takes the
// machine with it. Sized for a small production machine (4-8 GiB): a
// Consul server of a few thousand services uses a few hundred MiB, a Nomad
// server holds its state in memory. A Nomad client's limit covers the
// client alone: its tasks run in cgroups of their own.
const (
	DefaultServerConsulMemory = 1 << 30
	DefaultServerNomadMemory  = 2 << 30
	DefaultClientConsulMemory = 512 << 20
	DefaultClientNomadMemory  = 1 << 30
	// Vault keeps little in memory beyond its cache of secrets and
	// leases; its raft store is on disk.
	DefaultServerVaultMemory = 1 << 30
)

func defaultServerMemory() map[string]int64 {
	return map[string]int64{ConsulProduct: DefaultServerConsulMemory, NomadProduct: DefaultServerNomadMemory, VaultProduct: DefaultServerVaultMemory}
}

func defaultClientMemory() map[string]int64 {
	return map[string]int64{ConsulProduct: DefaultClientConsulMemory, NomadProduct: DefaultClientNomadMemory}
}

// decodeMemory reads memory = { consul = "1GiB", nomad = "2GiB" } over the
// defaults in dst.
func decodeMemory(a *hcl.Attribute, dst map[string]int64) hcl.Diagnostics {
	var m map[string]string
	diags := hcldecode.Expr(a.Expr, nil, &m)
	for k, v := range m {
		if _, ok := dst[k]; !ok {
			products := slices.Sorted(maps.Keys(dst))
			diags = append(diags, errAt(a.Expr.Range(), "Invalid memory", fmt.Sprintf("%q: give limits for %s", k, strings.Join(products, ", ")))...)
			continue
		}
		n, err := hcldecode.ParseSize(v)
		if err == nil && n < 64<<20 {
			err = errors.New("below 64MiB no daemon starts")
		}
		if err != nil {
			diags = append(diags, errAt(a.Expr.Range(), "Invalid memory", fmt.Sprintf("%s = %q: %v", k, v, err))...)
			continue
		}
		dst[k] = n
	}
	return diags
}

// Provider says where machines come from, with provider-specific options.
type Provider struct {
	Name    string
	Options map[string]string
	// Hosts are provider "ssh"'s existing hosts (hosts.go).
	Hosts []Host
}

// DefaultSpec is what an absent or empty cluster.hcl means: 3 servers and
// 2 clients on the local provider.
func DefaultSpec() *Spec {
	s := &Spec{
		Name:       DefaultName,
		Region:     DefaultRegion,
		Datacenter: DefaultDatacenter,
		Versions: Versions{
			Nomad:   DefaultNomadVersion,
			Consul:  DefaultConsulVersion,
			CoreDNS: DefaultCoreDNSVersion,
		},
		Servers:       Servers{Count: DefaultServers, Memory: defaultServerMemory()},
		Pools:         []Pool{{Name: DefaultPoolName, Count: DefaultPoolCount, Meta: map[string]string{}, Memory: defaultClientMemory()}},
		ArtifactStore: DefaultArtifactStore,
		BundleStore:   DefaultBundleStore,
		Provider:      Provider{Name: DefaultProvider, Options: map[string]string{}},
		Vault:         VaultSpec{Enabled: DefaultVaultEnabled, Shares: DefaultVaultShares, Threshold: DefaultVaultThreshold},
	}
	if s.Vault.Enabled {
		s.Versions.Vault = DefaultVaultVersion
	}
	return s
}

// SpecError is a spec that cannot be used. Every problem is named with
// file:line:col.
type SpecError struct {
	Diags hcl.Diagnostics
}

func (e *SpecError) Error() string {
	var lines []string
	for _, d := range e.Diags {
		if d.Severity == hcl.DiagError {
			lines = append(lines, formatDiag(d))
		}
	}
	return strings.Join(lines, "\n")
}

func formatDiag(d *hcl.Diagnostic) string {
	msg := d.Summary
	if d.Detail != "" {
		msg += ": " + d.Detail
	}
	if d.Subject == nil {
		return msg
	}
	return fmt.Sprintf("%s:%d:%d: %s", d.Subject.Filename, d.Subject.Start.Line, d.Subject.Start.Column, msg)
}

// LoadSpec reads and validates a cluster spec. A missing file is an error:
// the caller decides whether "no spec" means DefaultSpec.
func LoadSpec(path string) (*Spec, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read cluster spec: %w", err)
	}
	return ParseSpec(src, path)
}

// ParseSpec parses and validates a cluster spec held in memory; filename
// names it in errors.
func ParseSpec(src []byte, filename string) (*Spec, error) {
	f, diags := hclsyntax.ParseConfig(src, filename, hcl.InitialPos)
	if diags.HasErrors() {
		return nil, &SpecError{Diags: diags}
	}
	s, diags := decodeSpec(f.Body)
	if diags.HasErrors() {
		return nil, &SpecError{Diags: diags}
	}
	for _, d := range diags {
		s.Warnings = append(s.Warnings, formatDiag(d))
	}
	return s, nil
}

var (
	topSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{
			{Name: "name"}, {Name: "region"}, {Name: "datacenter"},
			{Name: "artifact_store"}, {Name: "artifact_keys"}, {Name: "bundle_store"},
		},
		Blocks: []hcl.BlockHeaderSchema{
			{Type: "versions"},
			{Type: "servers"},
			{Type: "pool", LabelNames: []string{"name"}},
			{Type: "provider", LabelNames: []string{"name"}},
			{Type: "vault"},
			{Type: "dns"},
		},
	}
	vaultSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{{Name: "enabled"}, {Name: "shares"}, {Name: "threshold"}},
		Blocks:     []hcl.BlockHeaderSchema{{Type: "seal", LabelNames: []string{"type"}}},
	}
	transitSchema = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{
		{Name: "address", Required: true}, {Name: "key_name", Required: true}, {Name: "mount_path"},
		{Name: "ca_file"}, {Name: "token_file", Required: true},
	}}
	versionsSchema = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "nomad"}, {Name: "consul"}, {Name: "vault"}, {Name: "coredns"}}}
	serversSchema  = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "count"}, {Name: "memory"}}}
	poolSchema     = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "count"}, {Name: "node_class"}, {Name: "meta"}, {Name: "memory"}, {Name: "drivers"}}}
)

// validName is what cluster, pool, region and datacenter names may be
// (they end up in node names, certificate names and directory names): a
// DNS label, 1 to 63 of [a-z0-9-], no dash first or last. Checked by hand:
// a package-level regexp would be compiled at the start of every steppe
// process, the machine agent's included (44 KB of heap, a grown stack).
func validName(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func decodeSpec(body hcl.Body) (*Spec, hcl.Diagnostics) {
	s := DefaultSpec()
	content, diags := body.Content(topSchema)

	str := func(name string, dst *string, check func(string, hcl.Range) hcl.Diagnostics) {
		a, ok := content.Attributes[name]
		if !ok {
			return
		}
		var v string
		d := hcldecode.Expr(a.Expr, nil, &v)
		diags = append(diags, d...)
		if d.HasErrors() {
			return
		}
		if check != nil {
			if d := check(v, a.Expr.Range()); d.HasErrors() {
				diags = append(diags, d...)
				return
			}
		}
		*dst = v
	}
	str("name", &s.Name, checkName("cluster name"))
	str("region", &s.Region, checkName("region"))
	str("datacenter", &s.Datacenter, checkName("datacenter"))
	str("artifact_store", &s.ArtifactStore, checkArtifactStore)
	if a, ok := content.Attributes["artifact_keys"]; ok {
		var keys []string
		d := hcldecode.Expr(a.Expr, nil, &keys)
		diags = append(diags, d...)
		if !d.HasErrors() {
			if len(keys) == 0 || slices.Contains(keys, "") {
				diags = append(diags, errAt(a.Expr.Range(), "Invalid artifact_keys", "name one or more files of armored OpenPGP public keys")...)
			}
			s.ArtifactKeys = keys
		}
	}
	if a, ok := content.Attributes["artifact_store"]; ok && s.ArtifactStore != DefaultArtifactStore && len(s.ArtifactKeys) == 0 && !diags.HasErrors() {
		diags = append(diags, errAt(a.Expr.Range(), "Unverifiable artifact_store",
			fmt.Sprintf("%q: give artifact_keys, the OpenPGP public keys trusted to sign its SHA256SUMS (for a store made by steppe artifact build: its steppe-store.asc)", s.ArtifactStore))...)
	}
	str("bundle_store", &s.BundleStore, checkNonEmpty("bundle_store"))

	seen := map[string]*hcl.Block{}
	var pools []Pool
	for _, b := range content.Blocks {
		if prev, ok := seen[b.Type]; ok && b.Type != "pool" {
			diags = append(diags, &hcl.Diagnostic{
				Severity: hcl.DiagError,
				Summary:  fmt.Sprintf("Duplicate %s block", b.Type),
				Detail:   fmt.Sprintf("a %s block was already given at %s", b.Type, rangeString(prev.DefRange)),
				Subject:  b.DefRange.Ptr(),
			})
			continue
		}
		seen[b.Type] = b
		switch b.Type {
		case "versions":
			diags = append(diags, decodeVersions(b.Body, &s.Versions)...)
		case "servers":
			c, d := b.Body.Content(serversSchema)
			diags = append(diags, d...)
			if a, ok := c.Attributes["memory"]; ok {
				diags = append(diags, decodeMemory(a, s.Servers.Memory)...)
			}
			if a, ok := c.Attributes["count"]; ok {
				n, d := decodeCount(a, "servers count")
				diags = append(diags, d...)
				if !d.HasErrors() {
					s.Servers.Count = n
					if n%2 == 0 {
						diags = append(diags, &hcl.Diagnostic{
							Severity: hcl.DiagWarning,
							Summary:  "Even number of servers",
							Detail:   fmt.Sprintf("%d servers tolerate no more failures than %d; use an odd count", n, n-1),
							Subject:  a.Expr.Range().Ptr(),
						})
					}
				}
			}
		case "pool":
			p, d := decodePool(b)
			diags = append(diags, d...)
			if d.HasErrors() {
				continue
			}
			for _, q := range pools {
				if q.Name == p.Name {
					diags = append(diags, &hcl.Diagnostic{
						Severity: hcl.DiagError,
						Summary:  "Duplicate pool name",
						Detail:   fmt.Sprintf("pool %q is declared twice", p.Name),
						Subject:  b.LabelRanges[0].Ptr(),
					})
				}
			}
			pools = append(pools, p)
		case "provider":
			p, d := decodeProvider(b)
			diags = append(diags, d...)
			if !d.HasErrors() {
				s.Provider = p
			}
		case "vault":
			diags = append(diags, decodeVault(b, &s.Vault)...)
		case "dns":
			diags = append(diags, decodeDNS(b, &s.DNS)...)
		}
	}
	if _, ok := seen["vault"]; !ok && s.Versions.Vault != "" {
		// A Vault version asks for Vault.
		s.Vault.Enabled = true
	}
	switch {
	case s.Vault.Enabled && s.Versions.Vault == "":
		s.Versions.Vault = DefaultVaultVersion
	case !s.Vault.Enabled && s.Versions.Vault != "":
		if b, ok := seen["vault"]; ok {
			diags = append(diags, &hcl.Diagnostic{Severity: hcl.DiagWarning, Summary: "Vault version without Vault",
				Detail: fmt.Sprintf("versions.vault is %s but vault is not enabled: no Vault runs", s.Versions.Vault), Subject: b.DefRange.Ptr()})
		}
		s.Versions.Vault = ""
	}
	if len(pools) > 0 {
		s.Pools = pools
	}
	return s, diags
}

func rangeString(r hcl.Range) string {
	return fmt.Sprintf("%s:%d:%d", r.Filename, r.Start.Line, r.Start.Column)
}

func errAt(r hcl.Range, summary, detail string) hcl.Diagnostics {
	return hcl.Diagnostics{{Severity: hcl.DiagError, Summary: summary, Detail: detail, Subject: r.Ptr()}}
}

func checkName(what string) func(string, hcl.Range) hcl.Diagnostics {
	return func(v string, r hcl.Range) hcl.Diagnostics {
		if !validName(v) {
			return errAt(r, "Invalid "+what, fmt.Sprintf("%q: use 1 to 63 lower-case letters, digits and dashes, not starting or ending with a dash", v))
		}
		return nil
	}
}

// checkArtifactStore accepts the default, an http(s) URL, an s3:// URL or
// a file:// URL of a store in the release layout.
func checkArtifactStore(v string, r hcl.Range) hcl.Diagnostics {
	if v == DefaultArtifactStore {
		return nil
	}
	u, err := url.Parse(v)
	switch {
	case err != nil:
		return errAt(r, "Invalid artifact_store", err.Error())
	case (u.Scheme == "http" || u.Scheme == "https") && u.Host != "":
		return nil
	case u.Scheme == "file" && u.Host == "" && path.IsAbs(u.Path):
		return nil
	case u.Scheme == "s3" && u.Host != "":
		return nil // s3://BUCKET/PREFIX[?endpoint=URL&region=R]: artifact.Fetcher reads it
	}
	return errAt(r, "Invalid artifact_store", fmt.Sprintf("%q: want an http(s):// URL, an s3://BUCKET/PREFIX or a file:///absolute/path of a store in the release layout (leave it out for the default)", v))
}

func checkNonEmpty(what string) func(string, hcl.Range) hcl.Diagnostics {
	return func(v string, r hcl.Range) hcl.Diagnostics {
		if strings.TrimSpace(v) == "" {
			return errAt(r, "Empty "+what, "leave it out to get the default")
		}
		return nil
	}
}

func decodeCount(a *hcl.Attribute, what string) (int, hcl.Diagnostics) {
	var n int
	if d := hcldecode.Expr(a.Expr, nil, &n); d.HasErrors() {
		return 0, d
	}
	if n < 1 {
		return 0, errAt(a.Expr.Range(), "Invalid "+what, fmt.Sprintf("%d: must be at least 1", n))
	}
	return n, nil
}

func decodeVersions(body hcl.Body, v *Versions) hcl.Diagnostics {
	c, diags := body.Content(versionsSchema)
	for _, f := range []struct {
		name string
		dst  *string
	}{{"nomad", &v.Nomad}, {"consul", &v.Consul}, {"vault", &v.Vault}, {"coredns", &v.CoreDNS}} {
		name, dst := f.name, f.dst
		a, ok := c.Attributes[name]
		if !ok {
			continue
		}
		var s string
		if d := hcldecode.Expr(a.Expr, nil, &s); d.HasErrors() {
			diags = append(diags, d...)
			continue
		}
		if err := checkVersion(s); err != nil {
			diags = append(diags, errAt(a.Expr.Range(), "Invalid "+name+" version", err.Error())...)
			continue
		}
		*dst = s
	}
	return diags
}

// checkVersion accepts exact release versions only (1.10.5, 1.9.0-beta.1):
// artifacts are fetched and built by exact number, so "1.10" or ">= 1.9"
// cannot be honoured.
func checkVersion(s string) error {
	v, err := version.NewSemver(s)
	if err != nil {
		return fmt.Errorf("%q is not a version: %w", s, err)
	}
	core, _, _ := strings.Cut(strings.SplitN(v.Original(), "+", 2)[0], "-")
	if strings.HasPrefix(core, "v") || strings.Count(core, ".") != 2 {
		return fmt.Errorf("%q: give an exact version such as 1.10.5", s)
	}
	return nil
}

func decodePool(b *hcl.Block) (Pool, hcl.Diagnostics) {
	p := Pool{Name: b.Labels[0], Count: 1, Meta: map[string]string{}, Memory: defaultClientMemory()}
	diags := checkName("pool name")(p.Name, b.LabelRanges[0])
	if p.Name == "server" {
		// Machine names are <cluster>-server-N for servers.
		diags = append(diags, errAt(b.LabelRanges[0], "Invalid pool name", `"server" is reserved for the servers`)...)
	}
	c, d := b.Body.Content(poolSchema)
	diags = append(diags, d...)
	if a, ok := c.Attributes["count"]; ok {
		n, d := decodeCount(a, "pool count")
		diags = append(diags, d...)
		p.Count = n
	}
	if a, ok := c.Attributes["node_class"]; ok {
		diags = append(diags, hcldecode.Expr(a.Expr, nil, &p.NodeClass)...)
	}
	if a, ok := c.Attributes["meta"]; ok {
		diags = append(diags, hcldecode.Expr(a.Expr, nil, &p.Meta)...)
	}
	if a, ok := c.Attributes["memory"]; ok {
		diags = append(diags, decodeMemory(a, p.Memory)...)
	}
	if a, ok := c.Attributes["drivers"]; ok {
		diags = append(diags, decodeDrivers(a, &p.Drivers)...)
	}
	return p, diags
}

// decodeProvider takes any attributes: each provider validates its own
// options, so only their shape (scalar values) is checked here.
func decodeVault(b *hcl.Block, v *VaultSpec) hcl.Diagnostics {
	c, diags := b.Body.Content(vaultSchema)
	v.Enabled = true
	if a, ok := c.Attributes["enabled"]; ok {
		diags = append(diags, hcldecode.Expr(a.Expr, nil, &v.Enabled)...)
	}
	for _, f := range []struct {
		name string
		dst  *int
	}{{"shares", &v.Shares}, {"threshold", &v.Threshold}} {
		if a, ok := c.Attributes[f.name]; ok {
			n, d := decodeCount(a, "vault "+f.name)
			diags = append(diags, d...)
			if !d.HasErrors() {
				*f.dst = n
			}
		}
	}
	if v.Threshold > v.Shares || v.Shares > 255 {
		diags = append(diags, errAt(b.DefRange, "Invalid vault split", fmt.Sprintf("threshold %d of %d shares: want 1 <= threshold <= shares <= 255", v.Threshold, v.Shares))...)
	}
	for _, sb := range c.Blocks {
		if sb.Labels[0] != "transit" {
			diags = append(diags, errAt(sb.LabelRanges[0], "Unsupported seal", fmt.Sprintf("%q: steppe supports seal \"transit\" (cloud KMS seals come with the cloud providers)", sb.Labels[0]))...)
			continue
		}
		if v.Transit != nil {
			diags = append(diags, errAt(sb.DefRange, "Duplicate seal block", "give one seal")...)
			continue
		}
		t := &TransitSeal{MountPath: "transit/"}
		sc, d := sb.Body.Content(transitSchema)
		diags = append(diags, d...)
		for _, f := range []struct {
			name string
			dst  *string
		}{{"address", &t.Address}, {"key_name", &t.KeyName}, {"mount_path", &t.MountPath}, {"ca_file", &t.CAFile}, {"token_file", &t.TokenFile}} {
			if a, ok := sc.Attributes[f.name]; ok {
				diags = append(diags, hcldecode.Expr(a.Expr, nil, f.dst)...)
			}
		}
		if u, err := url.Parse(t.Address); sc.Attributes["address"] != nil && (err != nil || u.Scheme != "https" || u.Host == "") {
			diags = append(diags, errAt(sc.Attributes["address"].Expr.Range(), "Invalid transit address", fmt.Sprintf("%q: want the https:// URL of the Vault that holds the key", t.Address))...)
		}
		v.Transit = t
	}
	return diags
}

func decodeProvider(b *hcl.Block) (Provider, hcl.Diagnostics) {
	p := Provider{Name: b.Labels[0], Options: map[string]string{}}
	diags := checkName("provider name")(p.Name, b.LabelRanges[0])
	attrs, d := decodeHosts(b, &p)
	diags = append(diags, d...)
	names := make([]string, 0, len(attrs))
	for n := range attrs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		a := attrs[n]
		v, d := a.Expr.Value(nil)
		diags = append(diags, d...)
		if d.HasErrors() {
			continue
		}
		s, err := scalarString(v)
		if err != nil {
			diags = append(diags, errAt(a.Expr.Range(), "Invalid provider option "+n, err.Error())...)
			continue
		}
		p.Options[n] = s
	}
	return p, diags
}

func scalarString(v cty.Value) (string, error) {
	if v.IsNull() || !v.IsKnown() {
		return "", errors.New("must have a value")
	}
	switch v.Type() {
	case cty.String:
		return v.AsString(), nil
	case cty.Bool:
		if v.True() {
			return "true", nil
		}
		return "false", nil
	case cty.Number:
		return v.AsBigFloat().Text('f', -1), nil
	}
	return "", fmt.Errorf("must be a string, number or bool, not %s", v.Type().FriendlyName())
}

// Machines is the number of machines the spec asks for.
func (s *Spec) Machines() int {
	n := s.Servers.Count
	for _, p := range s.Pools {
		n += p.Count
	}
	return n
}
