package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/hcldecode"
	"github.com/steppe/steppe/internal/supervise"
)

// Defaults for a machine agent run as root.
const (
	DefaultStateDir = "/var/lib/steppe"
	DefaultSocket   = "/run/steppe/agent.sock"
	DefaultCgroup   = "steppe"
)

// Config is the agent's boot config.
type Config struct {
	Path     string // the file it was read from
	StateDir string
	Socket   string
	Cgroup   string // parent of the services' cgroups: below the agent's own cgroup v2, or below the v2 mount if it starts with "/"
	// UpgradeTimeout is how long a new steppe binary has to report healthy
	// before it is rolled back; 0 means DefaultUpgradeTimeout.
	UpgradeTimeout time.Duration
	Machine        Machine
	// Bundle is where the machine pulls its role's config from; nil: the
	// agent runs only the services of this file.
	Bundle *BundleSource
	// ArtifactKeys are files of armored OpenPGP public keys trusted to sign
	// artifact stores' SHA256SUMS.
	ArtifactKeys []string
	Services     []supervise.Spec
	Metrics      Metrics
	// Resolver, when set, is the resolv.conf the agent switches to the
	// machine's local resolver (resolver.go); nil leaves it alone.
	Resolver *Resolver
}

// Metrics says where the agent writes its own metrics (see metrics.go).
type Metrics struct {
	// Textfile is the file node_exporter's textfile collector reads; ""
	// writes none. When the config sets none, TextfilePath gives the
	// default under the state dir.
	Textfile string
	set      bool
}

// DefaultMetricsFile is the textfile below the agent's state dir, in a
// directory of its own: the collector reads every *.prom file of the
// directory it is given.
const DefaultMetricsFile = "metrics/steppe.prom"

// MetricsTextfile is the metrics textfile the agent writes: the config's,
// else DefaultMetricsFile below the state dir; "" when turned off
// (metrics { textfile = "" }).
func (c *Config) MetricsTextfile() string {
	if c.Metrics.set {
		return c.Metrics.Textfile
	}
	return filepath.Join(c.StateDir, filepath.FromSlash(DefaultMetricsFile))
}

// Machine holds the facts templates see; what is not given is discovered.
type Machine struct {
	Name       string
	Address    string
	Pool       string
	Region     string
	Datacenter string
	Tags       map[string]string
}

// BundleSource says which bundles a machine pulls and trusts.
type BundleSource struct {
	Store   string // a bundle server's URL or a directory
	Cluster string // the cluster and role the machine pulls bundles of
	Role    string
	Keys    []string // files of Ed25519 public keys trusted to sign bundles
	// Wait is how long one long-poll waits for a new version.
	Wait time.Duration
	// HealthTimeout bounds the health gate after an apply.
	HealthTimeout time.Duration
	// Keep is how many releases stay on disk, the current one included.
	Keep int
	// MinVersion is the lowest bundle version the machine accepts, given
	// by whoever created it: a new machine must not take an older signed
	// bundle (valid until it expires) that a store replays.
	MinVersion uint64
}

// ConfigError is every problem found in a config file, each with its
// file:line:column, so that an operator can fix them all in one pass.
type ConfigError struct {
	Diags hcl.Diagnostics
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	for i, d := range e.Diags {
		if i > 0 {
			b.WriteString("\n")
		}
		if d.Subject != nil {
			fmt.Fprintf(&b, "%s:%d:%d: ", d.Subject.Filename, d.Subject.Start.Line, d.Subject.Start.Column)
		}
		b.WriteString(d.Summary)
		if d.Detail != "" {
			b.WriteString(": ")
			b.WriteString(d.Detail)
		}
	}
	return b.String()
}

// LoadConfig reads and validates an agent config file. Nothing in it is
// acted upon: a caller with a running agent can reject a bad file and keep
// everything as it is.
func LoadConfig(path string) (*Config, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return ParseConfig(path, src)
}

// ParseConfig is LoadConfig on bytes already read; path names them in errors.
func ParseConfig(path string, src []byte) (*Config, error) {
	file, diags := hclsyntax.ParseConfig(src, path, hcl.InitialPos)
	if diags.HasErrors() {
		return nil, &ConfigError{diags}
	}
	p := &parser{}
	cfg := p.config(file.Body)
	cfg.Path = path
	if len(p.diags) > 0 {
		return nil, &ConfigError{p.diags}
	}
	return cfg, nil
}

var rootSchema = &hcl.BodySchema{
	Blocks: []hcl.BlockHeaderSchema{
		{Type: "agent"},
		{Type: "machine"},
		{Type: "bundle"},
		{Type: "artifacts"},
		{Type: "metrics"},
		{Type: "resolver"},
		{Type: "service", LabelNames: []string{"name"}},
	},
}

var metricsSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "textfile"}},
}

// bundleRootSchema is what a service file inside a bundle may hold.
var bundleRootSchema = &hcl.BodySchema{
	Blocks: []hcl.BlockHeaderSchema{{Type: "service", LabelNames: []string{"name"}}},
}

var machineSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "name"}, {Name: "address"}, {Name: "pool"}, {Name: "region"}, {Name: "datacenter"}, {Name: "tags"},
	},
}

var bundleSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "store", Required: true},
		{Name: "cluster", Required: true},
		{Name: "role", Required: true},
		{Name: "keys", Required: true},
		{Name: "wait"},
		{Name: "health_timeout"},
		{Name: "keep"},
		{Name: "min_version"},
	},
}

var artifactsSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{{Name: "keys", Required: true}},
}

var agentSchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "state_dir"},
		{Name: "socket"},
		{Name: "cgroup"},
		{Name: "upgrade_timeout"},
	},
}

var serviceSchema = &hcl.BodySchema{
	Attributes: serviceAttrs,
	Blocks:     []hcl.BlockHeaderSchema{{Type: "ready"}},
}

// A service in a bundle may also name the files it reads (so that a change
// to them reloads or restarts it) and what a change does.
var bundleServiceSchema = &hcl.BodySchema{
	Attributes: append(slices.Clone(serviceAttrs), hcl.AttributeSchema{Name: "files"}, hcl.AttributeSchema{Name: "on_change"}),
	Blocks:     []hcl.BlockHeaderSchema{{Type: "ready"}},
}

var serviceAttrs = []hcl.AttributeSchema{
	{Name: "command", Required: true},
	{Name: "args"},
	{Name: "env"},
	{Name: "dir"},
	{Name: "user"},
	{Name: "group"},
	{Name: "after"},
	{Name: "stop_signal"},
	{Name: "stop_timeout"},
	{Name: "stop_mode"},
	{Name: "reload_signal"},
	{Name: "restart"},
	{Name: "backoff_min"},
	{Name: "backoff_max"},
	{Name: "healthy_after"},
	{Name: "memory_max"},
	{Name: "memory_high"},
	{Name: "log_max_size"},
	{Name: "log_keep"},
}

var readySchema = &hcl.BodySchema{
	Attributes: []hcl.AttributeSchema{
		{Name: "notify"},
		{Name: "tcp"},
		{Name: "http"},
		{Name: "command"},
		{Name: "timeout"},
		{Name: "interval"},
	},
}

// parser collects diagnostics instead of stopping at the first problem.
type parser struct {
	diags hcl.Diagnostics
	// resolve, when set, parses a bundle's service file: it turns a
	// service's command into the path to run, or says why it cannot.
	resolve func(command string) (string, error)
	// external are services defined elsewhere that a service may be after.
	external []string
	// vars are the variables a bundle's service file may use, such as
	// "${release}/consul.d" or artifact.nomad; nil in the agent's config.
	vars *hcl.EvalContext
}

func (p *parser) errorf(rng hcl.Range, summary, format string, args ...any) {
	r := rng
	p.diags = append(p.diags, &hcl.Diagnostic{
		Severity: hcl.DiagError,
		Summary:  summary,
		Detail:   fmt.Sprintf(format, args...),
		Subject:  &r,
	})
}

func (p *parser) content(body hcl.Body, schema *hcl.BodySchema) *hcl.BodyContent {
	c, diags := body.Content(schema)
	p.diags = append(p.diags, diags...)
	return c
}

func (p *parser) decode(attr *hcl.Attribute, v any) bool {
	diags := hcldecode.Expr(attr.Expr, p.vars, v)
	p.diags = append(p.diags, diags...)
	return !diags.HasErrors()
}

func (p *parser) str(attrs hcl.Attributes, name string, dst *string) {
	if a, ok := attrs[name]; ok {
		p.decode(a, dst)
	}
}

// scalar decodes the string attribute name, if present, through parse.
func scalar[T any](p *parser, attrs hcl.Attributes, name, summary string, parse func(string) (T, error), dst *T) {
	a, ok := attrs[name]
	if !ok {
		return
	}
	var s string
	if !p.decode(a, &s) {
		return
	}
	v, err := parse(s)
	if err != nil {
		p.errorf(a.Expr.Range(), summary, "%s = %q: %v", name, s, err)
		return
	}
	*dst = v
}

func (p *parser) duration(attrs hcl.Attributes, name string, dst *time.Duration) {
	scalar(p, attrs, name, "Invalid duration", parseDuration, dst)
}

func (p *parser) signal(attrs hcl.Attributes, name string, dst *syscall.Signal) {
	scalar(p, attrs, name, "Invalid signal", parseSignal, dst)
}

func (p *parser) size(attrs hcl.Attributes, name string, dst *int64) {
	scalar(p, attrs, name, "Invalid size", hcldecode.ParseSize, dst)
}

func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("want a duration such as \"500ms\", \"10s\" or \"2m\"")
	}
	return d, nil
}

func (p *parser) config(body hcl.Body) *Config {
	cfg := &Config{StateDir: DefaultStateDir, Socket: DefaultSocket, Cgroup: DefaultCgroup}
	c := p.content(body, rootSchema)
	if c == nil {
		return cfg
	}
	once := map[string]hcl.Range{}
	var services []*hcl.Block
	for _, b := range c.Blocks {
		if b.Type == "service" {
			services = append(services, b)
			continue
		}
		if prev, dup := once[b.Type]; dup {
			p.errorf(b.DefRange, "Duplicate "+b.Type+" block", "the %s block is already defined at %s", b.Type, prev)
			continue
		}
		once[b.Type] = b.DefRange
		switch b.Type {
		case "agent":
			if ac := p.content(b.Body, agentSchema); ac != nil {
				p.str(ac.Attributes, "state_dir", &cfg.StateDir)
				p.str(ac.Attributes, "socket", &cfg.Socket)
				p.str(ac.Attributes, "cgroup", &cfg.Cgroup)
				p.duration(ac.Attributes, "upgrade_timeout", &cfg.UpgradeTimeout)
			}
		case "machine":
			if mc := p.content(b.Body, machineSchema); mc != nil {
				at := mc.Attributes
				p.str(at, "name", &cfg.Machine.Name)
				p.str(at, "address", &cfg.Machine.Address)
				p.str(at, "pool", &cfg.Machine.Pool)
				p.str(at, "region", &cfg.Machine.Region)
				p.str(at, "datacenter", &cfg.Machine.Datacenter)
				if a, ok := at["tags"]; ok {
					p.decode(a, &cfg.Machine.Tags)
				}
			}
		case "bundle":
			cfg.Bundle = p.bundle(b)
		case "artifacts":
			if ac := p.content(b.Body, artifactsSchema); ac != nil {
				if a, ok := ac.Attributes["keys"]; ok && p.decode(a, &cfg.ArtifactKeys) {
					p.readable(a, cfg.ArtifactKeys)
				}
			}
		case "metrics":
			p.metrics(b, &cfg.Metrics)
		case "resolver":
			cfg.Resolver = p.resolver(b)
		}
	}
	defs := p.services(services, serviceSchema)
	for _, d := range defs {
		cfg.Services = append(cfg.Services, d.Spec)
	}
	return cfg
}

func (p *parser) bundle(b *hcl.Block) *BundleSource {
	src := &BundleSource{Wait: 30 * time.Second, HealthTimeout: 60 * time.Second, Keep: 3}
	bc := p.content(b.Body, bundleSchema)
	if bc == nil {
		return src
	}
	at := bc.Attributes
	p.str(at, "store", &src.Store)
	p.str(at, "cluster", &src.Cluster)
	p.str(at, "role", &src.Role)
	if a, ok := at["keys"]; ok && p.decode(a, &src.Keys) {
		if len(src.Keys) == 0 {
			p.errorf(a.Expr.Range(), "No trusted keys", "bundle keys: name at least one public key file")
		}
		p.readable(a, src.Keys)
	}
	p.duration(at, "wait", &src.Wait)
	p.duration(at, "health_timeout", &src.HealthTimeout)
	if a, ok := at["keep"]; ok && p.decode(a, &src.Keep) && src.Keep < 1 {
		p.errorf(a.Expr.Range(), "Invalid keep", "bundle keep = %d: keep at least the current release (1)", src.Keep)
	}
	if a, ok := at["min_version"]; ok {
		p.decode(a, &src.MinVersion)
	}
	return src
}

// metrics reads the metrics block. The textfile must be an absolute path
// ending in ".prom", the only files the textfile collector reads; "" turns
// the file off.
func (p *parser) metrics(b *hcl.Block, m *Metrics) {
	mc := p.content(b.Body, metricsSchema)
	if mc == nil {
		return
	}
	a, ok := mc.Attributes["textfile"]
	if !ok || !p.decode(a, &m.Textfile) {
		return
	}
	m.set = true
	if m.Textfile == "" {
		return
	}
	if !filepath.IsAbs(m.Textfile) || !strings.HasSuffix(m.Textfile, ".prom") || filepath.Base(m.Textfile) == ".prom" {
		p.errorf(a.Expr.Range(), "Invalid metrics textfile", "textfile = %q: want an absolute path ending in \".prom\" (node_exporter's textfile collector reads only those), or \"\" for no metrics file", m.Textfile)
	}
}

// readable checks that every file an attribute names can be read now, so
// that a typo fails at start rather than at the first pull.
func (p *parser) readable(a *hcl.Attribute, files []string) {
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			p.errorf(a.Expr.Range(), "Unreadable key file", "%v", err)
		}
	}
}

// serviceDef is a service as a config or bundle file declares it.
type serviceDef struct {
	Spec supervise.Spec
	// Files (bundle services only) are release paths the service reads;
	// OnChange says what a change to them does: "restart" or "reload".
	Files    []string
	OnChange string
}

func (p *parser) services(blocks []*hcl.Block, schema *hcl.BodySchema) []serviceDef {
	seen := map[string]hcl.Range{}
	after := map[string]*hcl.Attribute{}
	var defs []serviceDef
	for _, b := range blocks {
		name := b.Labels[0]
		if prev, dup := seen[name]; dup {
			p.errorf(b.LabelRanges[0], "Duplicate service", "service %q is already defined at %s", name, prev)
			continue
		}
		seen[name] = b.DefRange
		if slices.Contains(p.external, name) {
			p.errorf(b.LabelRanges[0], "Duplicate service", "service %q is also defined by the agent's own config", name)
			continue
		}
		if !validName(name) {
			p.errorf(b.LabelRanges[0], "Invalid service name", "%q: use letters, digits, '-', '_' and '.', starting with a letter or digit", name)
		}
		def, afterAttr := p.service(name, b.Body, schema)
		if afterAttr != nil {
			after[name] = afterAttr
		}
		defs = append(defs, def)
	}
	specs := make([]supervise.Spec, len(defs))
	for i, d := range defs {
		specs[i] = d.Spec
	}
	p.dependencies(specs, after)
	return defs
}

func validName(s string) bool {
	if s == "" || len(s) > 64 || s == "." || s == ".." {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case (r == '-' || r == '_' || r == '.') && i > 0:
		default:
			return false
		}
	}
	return true
}

func (p *parser) service(name string, body hcl.Body, schema *hcl.BodySchema) (serviceDef, *hcl.Attribute) {
	def := serviceDef{OnChange: "restart"}
	spec := &def.Spec
	spec.Name = name
	c := p.content(body, schema)
	if c == nil {
		return def, nil
	}
	at := c.Attributes
	if a, ok := at["command"]; ok && p.decode(a, &spec.Command) {
		if p.resolve != nil {
			path, err := p.resolve(spec.Command)
			if err != nil {
				p.errorf(a.Expr.Range(), "Bad command", "service %q: %v", name, err)
			}
			spec.Command = path
		} else if err := checkExecutable(spec.Command); err != nil {
			p.errorf(a.Expr.Range(), "Bad command", "service %q: %v", name, err)
		}
	}
	if a, ok := at["files"]; ok && p.decode(a, &def.Files) {
		for _, f := range def.Files {
			if f == "" || filepath.IsAbs(f) || strings.HasPrefix(filepath.Clean(f), "..") {
				p.errorf(a.Expr.Range(), "Invalid files", "service %q: %q must be a path inside the release", name, f)
			}
		}
	}
	if a, ok := at["on_change"]; ok && p.decode(a, &def.OnChange) {
		if def.OnChange != "restart" && def.OnChange != "reload" {
			p.errorf(a.Expr.Range(), "Invalid on_change", "service %q: on_change = %q: want restart or reload", name, def.OnChange)
		}
	}
	if a, ok := at["args"]; ok {
		p.decode(a, &spec.Args)
	}
	if a, ok := at["env"]; ok {
		var env map[string]string
		if p.decode(a, &env) {
			keys := make([]string, 0, len(env))
			for k := range env {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			for _, k := range keys {
				if k == "" || strings.ContainsAny(k, "=\x00") {
					p.errorf(a.Expr.Range(), "Invalid environment variable", "service %q: name %q", name, k)
					continue
				}
				spec.Env = append(spec.Env, k+"="+env[k])
			}
		}
	}
	p.str(at, "dir", &spec.Dir)
	if spec.Dir != "" && !filepath.IsAbs(spec.Dir) {
		p.errorf(at["dir"].Expr.Range(), "Invalid directory", "service %q: dir %q must be an absolute path", name, spec.Dir)
	}
	p.str(at, "user", &spec.User)
	p.str(at, "group", &spec.Group)
	var afterAttr *hcl.Attribute
	if a, ok := at["after"]; ok && p.decode(a, &spec.After) {
		afterAttr = a
	}
	p.signal(at, "stop_signal", &spec.StopSignal)
	p.duration(at, "stop_timeout", &spec.StopTimeout)
	if a, ok := at["stop_mode"]; ok {
		var s string
		if p.decode(a, &s) {
			switch m := supervise.StopMode(s); m {
			case supervise.StopCgroup, supervise.StopMain:
				spec.StopMode = m
			default:
				p.errorf(a.Expr.Range(), "Invalid stop mode", "service %q: stop_mode = %q: want %q or %q", name, s, supervise.StopCgroup, supervise.StopMain)
			}
		}
	}
	p.signal(at, "reload_signal", &spec.ReloadSignal)
	if a, ok := at["restart"]; ok {
		var s string
		if p.decode(a, &s) {
			switch r := supervise.RestartPolicy(s); r {
			case supervise.RestartAlways, supervise.RestartOnFailure, supervise.RestartNever:
				spec.Restart = r
			default:
				p.errorf(a.Expr.Range(), "Invalid restart policy", "service %q: restart = %q: want always, on-failure or never", name, s)
			}
		}
	}
	p.duration(at, "backoff_min", &spec.BackoffMin)
	p.duration(at, "backoff_max", &spec.BackoffMax)
	if spec.BackoffMin > 0 && spec.BackoffMax > 0 && spec.BackoffMin > spec.BackoffMax {
		p.errorf(at["backoff_min"].Expr.Range(), "Invalid backoff", "service %q: backoff_min %v is above backoff_max %v", name, spec.BackoffMin, spec.BackoffMax)
	}
	p.duration(at, "healthy_after", &spec.HealthyAfter)
	p.size(at, "memory_max", &spec.MemoryMax)
	p.size(at, "memory_high", &spec.MemoryHigh)
	p.size(at, "log_max_size", &spec.LogMaxBytes)
	if a, ok := at["log_keep"]; ok {
		var n int
		if p.decode(a, &n) && n < 0 {
			p.errorf(a.Expr.Range(), "Invalid log_keep", "service %q: log_keep = %d: want 0 or more", name, n)
		}
		spec.LogKeep = n
	}
	for _, b := range c.Blocks {
		if spec.Ready != nil {
			p.errorf(b.DefRange, "Duplicate ready block", "service %q has more than one ready block", name)
			continue
		}
		spec.Ready = p.ready(name, b)
	}
	return def, afterAttr
}

func (p *parser) ready(service string, b *hcl.Block) *supervise.Readiness {
	r := &supervise.Readiness{}
	c := p.content(b.Body, readySchema)
	if c == nil {
		return r
	}
	at := c.Attributes
	kinds := 0
	if a, ok := at["notify"]; ok {
		p.decode(a, &r.Notify)
		if r.Notify {
			kinds++
		}
	}
	if a, ok := at["tcp"]; ok && p.decode(a, &r.TCP) {
		kinds++
		if err := checkHostPort(r.TCP); err != nil {
			p.errorf(a.Expr.Range(), "Invalid address", "service %q: ready tcp = %q: %v", service, r.TCP, err)
		}
	}
	if a, ok := at["http"]; ok && p.decode(a, &r.HTTP) {
		kinds++
		if !strings.HasPrefix(r.HTTP, "http://") && !strings.HasPrefix(r.HTTP, "https://") {
			p.errorf(a.Expr.Range(), "Invalid URL", "service %q: ready http = %q: want an http:// or https:// URL", service, r.HTTP)
		}
	}
	if a, ok := at["command"]; ok && p.decode(a, &r.Command) {
		kinds++
		if len(r.Command) == 0 {
			p.errorf(a.Expr.Range(), "Invalid command", "service %q: ready command is empty", service)
		} else if err := checkExecutable(r.Command[0]); err != nil {
			p.errorf(a.Expr.Range(), "Bad command", "service %q: ready command: %v", service, err)
		}
	}
	if kinds != 1 {
		p.errorf(b.DefRange, "Invalid ready block", "service %q: set exactly one of notify, tcp, http and command (found %d)", service, kinds)
	}
	p.duration(at, "timeout", &r.Timeout)
	p.duration(at, "interval", &r.Interval)
	return r
}

// dependencies reports unknown services in `after` and every cycle, naming
// the services on it.
func (p *parser) dependencies(specs []supervise.Spec, after map[string]*hcl.Attribute) {
	known := map[string]bool{}
	for _, s := range specs {
		known[s.Name] = true
	}
	external := map[string]bool{}
	for _, n := range p.external {
		external[n] = true
	}
	graph := map[string][]string{}
	for _, s := range specs {
		for _, d := range s.After {
			switch {
			case d == s.Name:
				p.errorf(after[s.Name].Expr.Range(), "Dependency cycle", "service %q is after itself", s.Name)
			case external[d] && !known[d]:
				// Defined by the agent's config; it cannot be after a
				// bundle service, so no cycle can pass through it.
			case !known[d]:
				p.errorf(after[s.Name].Expr.Range(), "Unknown dependency", "service %q is after %q, which is not defined", s.Name, d)
			default:
				graph[s.Name] = append(graph[s.Name], d)
			}
		}
	}
	// Depth-first search; a back edge closes a cycle, reported once from the
	// first service found on it.
	const (
		unseen = iota
		active
		done
	)
	mark := map[string]int{}
	var stack []string
	var visit func(n string)
	visit = func(n string) {
		mark[n] = active
		stack = append(stack, n)
		for _, d := range graph[n] {
			switch mark[d] {
			case unseen:
				visit(d)
			case active:
				i := slices.Index(stack, d)
				cycle := append(slices.Clone(stack[i:]), d)
				p.errorf(after[n].Expr.Range(), "Dependency cycle", "%s", strings.Join(cycle, " -> "))
			}
		}
		stack = stack[:len(stack)-1]
		mark[n] = done
	}
	for _, s := range specs {
		if mark[s.Name] == unseen {
			visit(s.Name)
		}
	}
}

func checkExecutable(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("%q is not an absolute path", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s does not exist", path)
		}
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s is a directory", path)
	}
	if fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", path)
	}
	return nil
}

func parseSignal(s string) (syscall.Signal, error) {
	name := strings.ToUpper(strings.TrimSpace(s))
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, fmt.Errorf("unknown signal (want a name such as SIGTERM, SIGINT or SIGHUP)")
	}
	return sig, nil
}

func checkHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("bad port %q", port)
	}
	return nil
}

// sourceFile is one file's name and content.
type sourceFile struct {
	Path string
	Src  []byte
}

// parseBundleServices reads the service files of a release together, so
// that a service may come after one defined in another file, or after one
// of the machine's own services (external). Commands go through resolve.
// The files may use vars (see puller.prepare), and nothing else: HCL has
// no file, environment or command access without functions, and none are
// given.
func parseBundleServices(files []sourceFile, external []string, vars *hcl.EvalContext, resolve func(string) (string, error)) ([]serviceDef, error) {
	p := &parser{resolve: resolve, external: external, vars: vars}
	var blocks []*hcl.Block
	for _, f := range files {
		file, diags := hclsyntax.ParseConfig(f.Src, f.Path, hcl.InitialPos)
		p.diags = append(p.diags, diags...)
		if diags.HasErrors() {
			continue
		}
		if c := p.content(file.Body, bundleRootSchema); c != nil {
			blocks = append(blocks, c.Blocks...)
		}
	}
	defs := p.services(blocks, bundleServiceSchema)
	if len(p.diags) > 0 {
		return nil, &ConfigError{p.diags}
	}
	return defs, nil
}
