package cluster

import (
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"strings"
	"syscall"
	"time"
)

// Role is what a machine runs.
type Role string

const (
	RoleServer Role = "server" // Consul server + Nomad server (+ Vault)
	RoleClient Role = "client" // Consul client + Nomad client
)

// Ports every machine uses on its own address. The local provider gives
// each machine its own loopback address, so they never collide.
const (
	ConsulHTTPSPort  = 8501
	ConsulDNSPort    = 8600
	ConsulRPCPort    = 8300
	ConsulSerfLAN    = 8301
	ConsulSerfWAN    = 8302
	NomadHTTPPort    = 4646
	NomadRPCPort     = 4647
	NomadSerfPort    = 4648
	VaultAPIPort     = 8200
	VaultClusterPort = 8201
)

// Machine is one machine of the cluster as planning sees it.
type Machine struct {
	Name    string // unique in the cluster: <cluster>-server-1, <cluster>-<pool>-1
	Role    Role
	Pool    string // "" for servers
	Address string // assigned by the provider; "" until it is
}

// MachineList lists the machines the spec asks for, servers first, without
// addresses (the provider assigns them).
func (s *Spec) MachineList() []Machine {
	var ms []Machine
	for i := 1; i <= s.Servers.Count; i++ {
		ms = append(ms, Machine{Name: fmt.Sprintf("%s-server-%d", s.Name, i), Role: RoleServer})
	}
	for _, p := range s.Pools {
		for i := 1; i <= p.Count; i++ {
			ms = append(ms, Machine{Name: fmt.Sprintf("%s-%s-%d", s.Name, p.Name, i), Role: RoleClient, Pool: p.Name})
		}
	}
	return ms
}

// RoleName is the bundle role of a machine: "server", or "client-<pool>".
func RoleName(m Machine) string {
	if m.Role == RoleServer {
		return "server"
	}
	return "client-" + m.Pool
}

// The machine facts templates use, in internal/render's scope. The three
// directories are machine tags the provider sets (the render scope has no
// directory facts): data_dir (the daemons' state), secrets_dir (where the
// provider delivered MachineSecrets) and config_dir (the stable path of the
// active release's rendered files, such as a "current" symlink).
const (
	factName       = "{{ .Machine.Name }}"
	factAddress    = "{{ .Machine.Address }}"
	factDataDir    = "{{ .Machine.Tags.data_dir }}"
	factSecretsDir = "{{ .Machine.Tags.secrets_dir }}"
	factConfigDir  = "{{ .Machine.Tags.config_dir }}"
)

// Machine tags the plan's templates need (see the fact constants).
const (
	TagDataDir    = "data_dir"
	TagSecretsDir = "secrets_dir"
	TagConfigDir  = "config_dir"
)

// Files of a machine's secrets directory (see MachineSecrets).
const (
	SecretCAFile        = "ca.pem"
	SecretCertFile      = "cert.pem"
	SecretKeyFile       = "key.pem"
	SecretConsulConfig  = "consul.json"
	SecretNomadConfig   = "nomad.json"
	RoleConsulConfig    = "consul.json.tmpl"
	RoleNomadConfig     = "nomad.json.tmpl"
	ConsulProduct       = "consul"
	NomadProduct        = "nomad"
	VaultProduct        = "vault"
	SecretVaultConfig   = "vault.json"
	RoleVaultConfig     = "vault.json.tmpl"
	serviceVault        = "vault"
	serviceConsul       = "consul"
	serviceNomad        = "nomad"
	defaultStopTimeout  = 30 * time.Second
	nomadClientStopWait = 60 * time.Second
)

// RolePlan is everything a bundle of one role holds: templates, services,
// artifacts and variables. Nothing in it is secret: secrets are in each
// machine's secrets directory (MachineSecrets), which the daemons read as
// an extra config file.
type RolePlan struct {
	Role      string
	Files     map[string][]byte // path in the bundle -> template (rendered per machine)
	Services  []ServiceDef
	Artifacts []ArtifactRef
	Vars      map[string]string
}

// ArtifactRef names a binary a role runs.
type ArtifactRef struct {
	Product string
	Version string
}

// ServiceDef is a service of a role. Its fields are named and valued as
// those of supervise.Spec (StopMode "cgroup"|"main", Restart
// "always"|"on-failure"|"never") without importing it, so that planning
// does not depend on the supervisor; Artifact names the product whose
// binary is the command, and Args are templates over the machine facts.
type ServiceDef struct {
	Name     string
	Artifact string // product; the agent resolves its binary path
	// Command is the absolute path of a program of the machine, for a
	// service that is no artifact (dockerd: plan_docker.go).
	Command string
	Args    []string // templates
	Env     []string
	// Dir is the working directory (a template); the agent creates it
	// when absent, as systemd does a StateDirectory. "" is the release.
	Dir          string
	After        []string
	StopSignal   syscall.Signal
	StopTimeout  time.Duration
	StopMode     string
	ReloadSignal syscall.Signal
	Restart      string
	Ready        *Readiness
	// MemoryMax is the service's memory limit in bytes (0: none); a kill
	// by the OOM killer is reported as such.
	MemoryMax int64
}

// Readiness mirrors supervise.Readiness: exactly one of Notify, TCP, HTTP
// and Command is set; TCP and HTTP are templates.
type Readiness struct {
	Notify   bool
	TCP      string
	HTTP     string
	Command  []string
	Timeout  time.Duration
	Interval time.Duration
}

// Values of ServiceDef.StopMode and ServiceDef.Restart (as supervise's).
const (
	StopCgroup    = "cgroup"
	StopMain      = "main"
	RestartAlways = "always"
)

// Plan makes the plan of every role of the spec. servers are the server
// machines with their addresses (retry_join targets). Plan takes no
// secrets, so none can end up in a bundle.
func Plan(spec *Spec, servers []Machine) ([]RolePlan, error) {
	var join []string
	for _, m := range servers {
		if m.Address == "" {
			return nil, fmt.Errorf("plan: server %s has no address", m.Name)
		}
		join = append(join, m.Address)
	}
	if len(join) != spec.Servers.Count {
		return nil, fmt.Errorf("plan: %d server addresses for %d servers", len(join), spec.Servers.Count)
	}
	plans := []RolePlan{}
	p, err := planRole(spec, RoleServer, Pool{}, join)
	if err != nil {
		return nil, err
	}
	plans = append(plans, p)
	for _, pool := range spec.Pools {
		p, err := planRole(spec, RoleClient, pool, join)
		if err != nil {
			return nil, err
		}
		plans = append(plans, p)
	}
	return plans, nil
}

func planRole(spec *Spec, role Role, pool Pool, join []string) (RolePlan, error) {
	name := RoleName(Machine{Role: role, Pool: pool.Name})
	consul, err := marshalTemplate(consulRoleConfig(spec, role, join))
	if err != nil {
		return RolePlan{}, fmt.Errorf("plan %s: consul config: %w", name, err)
	}
	nomad, err := marshalTemplate(nomadRoleConfig(spec, role, pool, join))
	if err != nil {
		return RolePlan{}, fmt.Errorf("plan %s: nomad config: %w", name, err)
	}
	p := RolePlan{
		Role:  name,
		Files: map[string][]byte{RoleConsulConfig: consul, RoleNomadConfig: nomad},
		Artifacts: []ArtifactRef{
			{Product: ConsulProduct, Version: spec.Versions.Consul},
			{Product: NomadProduct, Version: spec.Versions.Nomad},
		},
		Vars: map[string]string{
			"cluster":        spec.Name,
			"region":         spec.Region,
			"datacenter":     spec.Datacenter,
			"role":           string(role),
			"pool":           pool.Name,
			"consul_version": spec.Versions.Consul,
			"nomad_version":  spec.Versions.Nomad,
		},
	}
	mem := pool.Memory
	if role == RoleServer {
		mem = spec.Servers.Memory
	}
	if mem == nil { // a pool the spec no longer names, or a spec made in code
		mem = defaultClientMemory()
		if role == RoleServer {
			mem = defaultServerMemory()
		}
	}
	cs, ns := consulService(), nomadService(role)
	cs.MemoryMax, ns.MemoryMax = mem[ConsulProduct], mem[NomadProduct]
	p.Services = []ServiceDef{cs, ns}
	if role == RoleServer && spec.Versions.Vault != "" {
		vault, err := marshalTemplate(vaultRoleConfig(spec, join))
		if err != nil {
			return RolePlan{}, fmt.Errorf("plan %s: vault config: %w", name, err)
		}
		p.Files[RoleVaultConfig] = vault
		p.Artifacts = append(p.Artifacts, ArtifactRef{Product: VaultProduct, Version: spec.Versions.Vault})
		p.Vars["vault_version"] = spec.Versions.Vault
		vs := vaultService()
		vs.MemoryMax = mem[VaultProduct]
		if vs.MemoryMax == 0 {
			vs.MemoryMax = DefaultServerVaultMemory
		}
		// Vault first: it needs neither Consul nor Nomad (raft storage),
		// and Nomad's tasks need it.
		p.Services = []ServiceDef{vs, cs, ns}
	}
	dockerServices(spec, role, pool, &p)
	if err := planCoreDNS(spec, &p, mem); err != nil {
		return RolePlan{}, err
	}
	return p, nil
}

// renderedName is the name of a role file on a machine once rendered: the
// agent drops the template suffix.
func renderedName(file string) string { return strings.TrimSuffix(file, ".tmpl") }

// daemonPath is the daemons' PATH: the supervisor gives a service only the
// environment it declares, and Nomad runs host tools (df for the disk
// fingerprint, and raw_exec tasks inherit it).
const daemonPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func consulService() ServiceDef {
	return ServiceDef{
		Name:     serviceConsul,
		Artifact: ConsulProduct,
		Env:      []string{daemonPath},
		Args: []string{
			"agent",
			"-config-file=" + path.Join(factConfigDir, renderedName(RoleConsulConfig)),
			"-config-file=" + path.Join(factSecretsDir, SecretConsulConfig),
		},
		// SIGTERM with leave_on_terminate off: a stop is not a departure,
		// for servers (raft membership) and clients alike.
		StopSignal:   syscall.SIGTERM,
		StopTimeout:  defaultStopTimeout,
		StopMode:     StopCgroup,
		ReloadSignal: syscall.SIGHUP,
		Restart:      RestartAlways,
		// Consul sends READY=1 once it has joined the LAN pool.
		Ready: &Readiness{Notify: true, Timeout: 5 * time.Minute},
	}
}

func nomadService(role Role) ServiceDef {
	s := ServiceDef{
		Name:     serviceNomad,
		Artifact: NomadProduct,
		Env:      []string{daemonPath},
		Args: []string{
			"agent",
			"-config=" + path.Join(factConfigDir, renderedName(RoleNomadConfig)),
			"-config=" + path.Join(factSecretsDir, SecretNomadConfig),
		},
		After: []string{serviceConsul},
		// SIGINT is what HashiCorp's own unit files send; with
		// leave_on_interrupt unset it stops without leaving.
		StopSignal:   syscall.SIGINT,
		StopTimeout:  defaultStopTimeout,
		StopMode:     StopCgroup,
		ReloadSignal: syscall.SIGHUP,
		Restart:      RestartAlways,
		Ready:        &Readiness{Notify: true, Timeout: 5 * time.Minute},
	}
	if role == RoleClient {
		// The task executors and tasks in the client's cgroup must outlive
		// the agent (DESIGN: decision 1).
		s.StopMode = StopMain
		s.StopTimeout = nomadClientStopWait
	}
	return s
}

func vaultService() ServiceDef {
	return ServiceDef{
		Name:     serviceVault,
		Artifact: VaultProduct,
		Env:      []string{daemonPath},
		Args: []string{
			"server",
			"-config=" + path.Join(factConfigDir, renderedName(RoleVaultConfig)),
			"-config=" + path.Join(factSecretsDir, SecretVaultConfig),
		},
		// Raft's store must exist before Vault opens it.
		Dir:          path.Join(factDataDir, "vault"),
		StopSignal:   syscall.SIGTERM,
		StopTimeout:  defaultStopTimeout,
		StopMode:     StopCgroup,
		ReloadSignal: syscall.SIGHUP, // reloads TLS certificates and the log level
		Restart:      RestartAlways,
		// Ready when its API listens: a restarted Vault is sealed until
		// steppe (or its transit seal) unseals it, and a sealed Vault is
		// no reason to roll a release back. steppe status says whether
		// each Vault is sealed.
		Ready: &Readiness{TCP: fmt.Sprintf("%s:%d", factAddress, VaultAPIPort), Timeout: 5 * time.Minute},
	}
}

// vaultRoleConfig is Vault's server config: integrated raft storage that
// joins the other servers, TLS with the node certificate on the API and
// (Vault's own certificates) the cluster port.
func vaultRoleConfig(spec *Spec, join []string) map[string]any {
	ca := path.Join(factSecretsDir, SecretCAFile)
	var retry []map[string]any
	for _, a := range join {
		retry = append(retry, map[string]any{
			"leader_api_addr":     fmt.Sprintf("https://%s:%d", a, VaultAPIPort),
			"leader_ca_cert_file": ca,
		})
	}
	return map[string]any{
		"api_addr":     fmt.Sprintf("https://%s:%d", factAddress, VaultAPIPort),
		"cluster_addr": fmt.Sprintf("https://%s:%d", factAddress, VaultClusterPort),
		"cluster_name": spec.Name,
		// HashiCorp's advice with integrated storage: mlock and raft's
		// memory-mapped store do not go together.
		"disable_mlock": true,
		"ui":            true,
		"log_level":     "info",
		"listener": []map[string]any{{"tcp": map[string]any{
			"address":            fmt.Sprintf("%s:%d", factAddress, VaultAPIPort),
			"cluster_address":    fmt.Sprintf("%s:%d", factAddress, VaultClusterPort),
			"tls_cert_file":      path.Join(factSecretsDir, SecretCertFile),
			"tls_key_file":       path.Join(factSecretsDir, SecretKeyFile),
			"tls_client_ca_file": ca,
			"tls_min_version":    "tls12",
		}}},
		"storage": map[string]any{"raft": map[string]any{
			"path":       path.Join(factDataDir, "vault"),
			"node_id":    factName,
			"retry_join": retry,
			// Autopilot promotes a joined server to voter only at a
			// reconcile, every 10 s by default: up waited for it.
			"autopilot_reconcile_interval": "2s",
			"autopilot_update_interval":    "1s",
		}},
		"telemetry": map[string]any{"prometheus_retention_time": "60s", "disable_hostname": true},
	}
}

// VaultAudience is the audience of the workload identities Nomad signs
// for Vault, and VaultJWTPath the auth method's path that trusts them.
const (
	VaultAudience = "vault.io"
	VaultJWTPath  = "jwt-nomad"
)

// DeniedFingerprinters are the Nomad fingerprinters a client on provider
// must not run: each cloud's environment fingerprinter asks that cloud's
// metadata service (169.254.169.254, or metadata.google.internal through
// the machine's resolver) at every start, so it runs only on its own cloud.
// The names are Nomad's (client/fingerprint: envFingerprinters, the same
// from 1.8 to 1.11); the other fingerprinters read the machine or its own
// Consul and Vault.
func DeniedFingerprinters(provider string) []string {
	var deny []string
	for _, f := range []struct{ fingerprinter, provider string }{
		{"env_aws", "aws"},
		{"env_azure", "azure"},
		{"env_digitalocean", "digitalocean"},
		{"env_gce", "gcp"},
	} {
		if f.provider != provider {
			deny = append(deny, f.fingerprinter)
		}
	}
	return deny
}

// consulTelemetry exposes Prometheus metrics at /v1/agent/metrics
// (?format=prometheus) for a token with agent read; the hostname stays out
// of metric names, as Prometheus labels the instance.
func consulTelemetry() map[string]any {
	return map[string]any{"prometheus_retention_time": "60s", "disable_hostname": true}
}

// nomadTelemetry exposes Prometheus metrics at /v1/metrics
// (?format=prometheus), with allocation and node metrics.
func nomadTelemetry() map[string]any {
	return map[string]any{
		"prometheus_metrics":         true,
		"publish_allocation_metrics": true,
		"publish_node_metrics":       true,
		"disable_hostname":           true,
		"collection_interval":        "10s",
	}
}

// joinRetryInterval replaces the daemons' default of 30 s: machines start
// together, and an agent whose first join raced the servers' start would
// otherwise sit out half a minute (at 3 s a client's Consul still lost
// up to 3 s of every up: its first join beat the servers' by a second).
const joinRetryInterval = "1s"

// escapeTemplate makes a value from the spec inert for the template
// engine: a pool's meta value containing "{{" must stay text. A raw
// string, because the JSON encoding of the file would escape quotes.
func escapeTemplate(s string) string {
	return strings.ReplaceAll(s, "{{", "{{`{{`}}")
}

func marshalTemplate(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func consulRoleConfig(spec *Spec, role Role, join []string) map[string]any {
	c := map[string]any{
		"datacenter":     spec.Datacenter,
		"node_name":      factName,
		"data_dir":       path.Join(factDataDir, "consul"),
		"bind_addr":      factAddress,
		"advertise_addr": factAddress,
		"client_addr":    factAddress,
		"retry_join":     join,
		"retry_interval": joinRetryInterval,
		// No call home (HashiCorp's checkpoint service): DESIGN decision 11.
		"disable_update_check":        true,
		"disable_anonymous_signature": true,
		"log_level":                   "INFO",
		"ports": map[string]any{
			// No plaintext API, no plaintext gRPC.
			"http": -1, "https": ConsulHTTPSPort, "grpc": -1, "grpc_tls": -1,
			"dns": ConsulDNSPort, "server": ConsulRPCPort, "serf_lan": ConsulSerfLAN, "serf_wan": ConsulSerfWAN,
		},
		"tls": map[string]any{
			"defaults": map[string]any{
				"verify_incoming": true,
				"verify_outgoing": true,
				"tls_min_version": "TLSv1_2",
			},
			"internal_rpc": map[string]any{"verify_server_hostname": true},
			// As for Nomad's HTTPS: no client certificate, so that a
			// browser opens the UI; the token authorises. It opens
			// nothing that DNS on port 8600 does not already answer (the
			// anonymous token reads the catalog for DNS: see
			// cluster.ConsulACL). RPC and gossip keep mutual TLS and
			// encryption.
			"https": map[string]any{"verify_incoming": false},
		},
		"acl": map[string]any{
			"enabled":                  true,
			"default_policy":           "deny",
			"down_policy":              "extend-cache",
			"enable_token_persistence": false,
		},
		"encrypt_verify_incoming": true,
		"encrypt_verify_outgoing": true,
		// The UI on the HTTPS port, behind ACLs like the API.
		"ui_config": map[string]any{"enabled": true},
		"telemetry": consulTelemetry(),
	}
	if role == RoleServer {
		c["server"] = true
		c["bootstrap_expect"] = spec.Servers.Count
		// A dead server stays a failed voter until it comes back or is
		// replaced on purpose: autopilot never shrinks raft below the
		// server count (losing a server is not shrinking the cluster).
		c["autopilot"] = map[string]any{"min_quorum": spec.Servers.Count}
		// HashiCorp's production recommendation (the default, 5, is
		// tuned for tiny VMs): leaders elected and failures detected
		// five times sooner.
		c["performance"] = map[string]any{"raft_multiplier": 1}
		c["leave_on_terminate"] = false
	} else {
		c["server"] = false
		// A restart is not a departure: without a leave the agent stops
		// at once and rejoins as the same member (an in-place upgrade
		// took 3.5 s longer per client with the leave). A machine that
		// goes for good is force-left and pruned by whoever removes it.
		c["leave_on_terminate"] = false
	}
	return c
}

func nomadRoleConfig(spec *Spec, role Role, pool Pool, join []string) map[string]any {
	c := map[string]any{
		"name":       factName,
		"region":     spec.Region,
		"datacenter": spec.Datacenter,
		"data_dir":   path.Join(factDataDir, "nomad"),
		"bind_addr":  factAddress,
		"advertise":  map[string]any{"http": factAddress, "rpc": factAddress, "serf": factAddress},
		"ports":      map[string]any{"http": NomadHTTPPort, "rpc": NomadRPCPort, "serf": NomadSerfPort},
		// No call home (HashiCorp's checkpoint service): DESIGN decision 11.
		"disable_update_check":        true,
		"disable_anonymous_signature": true,
		"log_level":                   "INFO",
		"leave_on_interrupt":          false,
		"leave_on_terminate":          false,
		"tls": map[string]any{
			"http":                   true,
			"rpc":                    true,
			"verify_server_hostname": true,
			// HashiCorp's recommendation with ACLs on: the HTTPS API (and
			// the UI a browser opens) needs no client certificate, a token
			// authorises each request; RPC keeps mutual TLS. It also lets
			// Consul's auth method fetch Nomad's JWKS URL.
			"verify_https_client": false,
		},
		"acl":       map[string]any{"enabled": true},
		"telemetry": nomadTelemetry(),
		"consul": map[string]any{
			"address":          factAddress + fmt.Sprintf(":%d", ConsulHTTPSPort),
			"ssl":              true,
			"verify_ssl":       true,
			"auto_advertise":   true,
			"server_auto_join": false,
			"client_auto_join": false,
		},
	}
	rpcJoin := make([]string, len(join))
	for i, a := range join {
		rpcJoin[i] = fmt.Sprintf("%s:%d", a, NomadRPCPort)
	}
	if role == RoleServer {
		// Workload identity for Consul (what Nomad 1.10 requires for
		// templates and recommends for services): servers sign the
		// identities; hashi.SetupConsulWorkloadIdentity makes Consul trust
		// them. The TTL is the identity's, not the Consul token's.
		consul := c["consul"].(map[string]any)
		consul["service_identity"] = map[string]any{"aud": []string{"consul.io"}, "ttl": "1h"}
		consul["task_identity"] = map[string]any{"aud": []string{"consul.io"}, "ttl": "1h"}
		c["server"] = map[string]any{
			"enabled":          true,
			"bootstrap_expect": spec.Servers.Count,
			"server_join":      map[string]any{"retry_join": join, "retry_interval": joinRetryInterval},
		}
		// As for Consul: a dead server stays a failed voter.
		c["autopilot"] = map[string]any{"min_quorum": spec.Servers.Count}
		if spec.Versions.Vault != "" {
			// Workload identity for Vault (the only way from Nomad 1.10):
			// servers sign a task's identity for Vault's JWT auth method
			// (hashi.SetupVault); they need no Vault token.
			c["vault"] = map[string]any{
				"enabled":          true,
				"default_identity": map[string]any{"aud": []string{VaultAudience}, "ttl": "1h"},
			}
		}
	} else {
		meta := map[string]string{}
		for k, v := range pool.Meta {
			meta[escapeTemplate(k)] = escapeTemplate(v)
		}
		client := map[string]any{
			"enabled":     true,
			"server_join": map[string]any{"retry_join": rpcJoin, "retry_interval": joinRetryInterval},
			// steppe's pool is the client's Nomad node pool, so that a job
			// can target it (node_pool in the job).
			"node_pool": pool.Name,
			"meta":      meta,
			// Tasks listen on the client's own address, not on 127.0.0.1
			// that every local machine shares (DESIGN: facts): the local
			// provider gives each client an interface holding only its
			// address, named by the task_interface tag.
			// (Raw strings inside the action: the file is JSON, whose
			// encoding would escape double quotes.)
			"network_interface": "{{ default `lo` (index .Machine.Tags `task_interface`) }}",
			// The cloud fingerprinters ask their metadata service at every
			// client start; off everywhere but on that cloud (DESIGN:
			// decision 11).
			"options": map[string]string{"fingerprint.denylist": strings.Join(DeniedFingerprinters(spec.Provider.Name), ",")},
		}
		if pool.NodeClass != "" {
			client["node_class"] = escapeTemplate(pool.NodeClass)
		}
		c["client"] = client
		c["plugin"] = map[string]any{
			"raw_exec": map[string]any{"config": map[string]any{"enabled": true}},
		}
		dockerPlugins(pool, c)
		if spec.Versions.Vault != "" && len(join) > 0 {
			// One Vault address: a standby forwards to the active node.
			c["vault"] = map[string]any{
				"enabled":               true,
				"address":               fmt.Sprintf("https://%s:%d", join[0], VaultAPIPort),
				"ca_file":               path.Join(factSecretsDir, SecretCAFile),
				"jwt_auth_backend_path": VaultJWTPath,
			}
		}
	}
	return c
}

// MachineSecrets is the content of machine m's secrets directory, which
// the provider delivers (0700 directory, 0600 files) at secretsDir on the
// machine: its key and certificate, the CA, and the daemons' secret config
// (gossip keys, agent tokens, TLS file paths) that they read as an extra
// config file after the role's.
func MachineSecrets(spec *Spec, st *State, m Machine, secretsDir string) (map[string][]byte, error) {
	if m.Address == "" {
		return nil, fmt.Errorf("secrets for %s: no address", m.Name)
	}
	kp, err := st.NodeCert(spec, m)
	if err != nil {
		return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
	}
	agentTok, err := st.Token(TokenConsulAgent(m.Name))
	if err != nil {
		return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
	}
	nomadTok, err := st.Token(TokenNomadConsul(m.Name))
	if err != nil {
		return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
	}
	ca := path.Join(secretsDir, SecretCAFile)
	cert := path.Join(secretsDir, SecretCertFile)
	key := path.Join(secretsDir, SecretKeyFile)

	consul := map[string]any{
		"encrypt": st.ConsulGossipKey().Reveal(),
		"tls": map[string]any{"defaults": map[string]any{
			"ca_file": ca, "cert_file": cert, "key_file": key,
		}},
		// No default token: in Consul 1.14 it would also answer every HTTP
		// request that carries no token (a DNS-only token arrives in 1.17).
		"acl": map[string]any{"tokens": map[string]any{
			"agent": agentTok.Reveal(),
		}},
	}
	nomad := map[string]any{
		"tls": map[string]any{"ca_file": ca, "cert_file": cert, "key_file": key},
		"consul": map[string]any{
			"token":     nomadTok.Reveal(),
			"ca_file":   ca,
			"cert_file": cert,
			"key_file":  key,
		},
	}
	if m.Role == RoleServer {
		nomad["server"] = map[string]any{"encrypt": st.NomadGossipKey().Reveal()}
		// The management token exists before Consul does: its leader
		// creates it when it sets up ACLs, so no bootstrap call can be
		// lost to a crash (hashi.BootstrapConsulACL only waits for it).
		mgmt, err := st.Token(TokenConsulBootstrap)
		if err != nil {
			return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
		}
		consul["acl"].(map[string]any)["tokens"].(map[string]any)["initial_management"] = mgmt.Reveal()
	}
	cj, err := json.MarshalIndent(consul, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
	}
	nj, err := json.MarshalIndent(nomad, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
	}
	out := map[string][]byte{
		SecretCAFile:       st.CACertPEM(),
		SecretCertFile:     kp.CertPEM,
		SecretKeyFile:      []byte(kp.KeyPEM.Reveal()),
		SecretConsulConfig: append(cj, '\n'),
		SecretNomadConfig:  append(nj, '\n'),
	}
	if m.Role == RoleServer && spec.Versions.Vault != "" {
		vj, err := vaultSecretFiles(spec, st, secretsDir)
		if err != nil {
			return nil, fmt.Errorf("secrets for %s: %w", m.Name, err)
		}
		maps.Copy(out, vj)
	}
	return out, nil
}
