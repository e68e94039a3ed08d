package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/hashi"
	"github.com/steppe/steppe/internal/provider"
)

// The files of `steppe prometheus` in the state directory.
const (
	prometheusDir = "prometheus"
	// consulMetricsTokenFile holds the Consul metrics token's secret, the
	// credentials_file of the Consul scrape job.
	consulMetricsTokenFile = "consul-metrics.token"
)

// Prometheus's scrape configuration, as much of it as steppe writes (the
// field names are Prometheus's).
type promConfig struct {
	ScrapeConfigs []promScrape `yaml:"scrape_configs"`
}

type promScrape struct {
	JobName       string              `yaml:"job_name"`
	Scheme        string              `yaml:"scheme"`
	MetricsPath   string              `yaml:"metrics_path"`
	Params        map[string][]string `yaml:"params"`
	TLSConfig     promTLS             `yaml:"tls_config"`
	Authorization *promAuth           `yaml:"authorization,omitempty"`
	StaticConfigs []promTargets       `yaml:"static_configs"`
}

type promTLS struct {
	CAFile string `yaml:"ca_file"`
}

type promAuth struct {
	Type            string `yaml:"type"`
	CredentialsFile string `yaml:"credentials_file"`
}

type promTargets struct {
	Targets []string          `yaml:"targets"`
	Labels  map[string]string `yaml:"labels"`
}

// Prometheus returns a Prometheus scrape configuration (YAML) for every
// machine of the cluster: each machine's Consul agent
// (/v1/agent/metrics) and Nomad agent (/v1/metrics), over HTTPS, trusting
// the cluster CA. Neither HTTPS API asks for a client certificate, so the
// configuration has none.
//
// Consul's endpoint wants a token with agent read: Prometheus makes it
// (idempotently, through the management token) and keeps its secret 0600
// in the state directory, where the configuration names it as a
// credentials_file; the secret is never printed. It is made here rather
// than by up so that a cluster nobody scrapes holds no such token, and so
// that running this again repairs it. Nomad's endpoint checks no ACL
// (see hashi.TokenConsulMetrics's comment), so its job has no token.
func Prometheus(ctx context.Context, opts Options) ([]byte, error) {
	e, err := open(opts)
	if err != nil {
		return nil, err
	}
	if err := e.needState(); err != nil {
		return nil, err
	}
	ms, err := e.local.List(ctx)
	if err != nil {
		return nil, err
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("cluster %s has no machines (steppe up)", e.spec.Name)
	}
	slices.SortFunc(ms, func(a, b provider.Machine) int { return strings.Compare(a.Name, b.Name) })
	st, err := cluster.OpenState(e.stateDir)
	if err != nil {
		return nil, err
	}
	credentials, err := e.consulMetricsToken(ctx, st, serverAddrs(ms))
	if err != nil {
		return nil, err
	}
	b, err := prometheusConfig(e.spec.Name, st.CAFile(), credentials, ms)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// consulMetricsToken makes sure Consul has the metrics token and that its
// secret is in the credentials file, and returns the file's path.
func (e *env) consulMetricsToken(ctx context.Context, st *cluster.State, servers []string) (string, error) {
	mgmt, ok := st.LookupToken(cluster.TokenConsulBootstrap)
	if !ok {
		return "", errors.New("no Consul management token in the state directory (up has not finished: run steppe up)")
	}
	if len(servers) == 0 {
		return "", fmt.Errorf("cluster %s: no server machine is running (steppe up)", e.spec.Name)
	}
	var secret cluster.Secret
	err := firstAnswering(servers, func(addr string) error {
		c, err := hashi.ConsulClient(net.JoinHostPort(addr, strconv.Itoa(cluster.ConsulHTTPSPort)), hashi.TLSFiles{CAFile: st.CAFile()}, mgmt)
		if err != nil {
			return err
		}
		secret, err = hashi.EnsureConsulMetricsToken(ctx, c, st)
		return err
	})
	if err != nil {
		return "", err
	}
	// A follower answers the agents' stale reads from its own copy of the
	// raft log: until each server has the new token, a scrape through a
	// machine that asks that server is refused (seen: "ACL not found"
	// right after the token was made). The configuration works at once
	// when this returns.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, addr := range servers {
		c, err := hashi.ConsulClient(net.JoinHostPort(addr, strconv.Itoa(cluster.ConsulHTTPSPort)), hashi.TLSFiles{CAFile: st.CAFile()}, secret)
		if err != nil {
			return "", err
		}
		if err := hashi.WaitConsulToken(wctx, c); err != nil {
			return "", fmt.Errorf("consul metrics token on server %s: %w", addr, err)
		}
	}
	dir := filepath.Join(e.stateDir, prometheusDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("prometheus credentials: %w", err)
	}
	path := filepath.Join(dir, consulMetricsTokenFile)
	// No newline: the file is the credential, byte for byte.
	if err := atomicfile.WriteFile(path, []byte(secret.Reveal()), 0o600); err != nil {
		return "", fmt.Errorf("prometheus credentials: %w", err)
	}
	return path, nil
}

// prometheusConfig renders the scrape configuration of machines ms: one
// job for the Consul agents, one for the Nomad agents, a target per
// machine labelled with its name, role and pool.
func prometheusConfig(clusterName, caFile, consulCredentials string, ms []provider.Machine) ([]byte, error) {
	tls := promTLS{CAFile: caFile}
	targets := func(port int) []promTargets {
		var out []promTargets
		for _, m := range ms {
			role := "client"
			if m.Role == cluster.RoleServer {
				role = "server"
			}
			labels := map[string]string{"cluster": clusterName, "machine": m.Name, "role": role}
			if m.Pool != "" {
				labels["pool"] = m.Pool
			}
			out = append(out, promTargets{Targets: []string{net.JoinHostPort(m.Address, strconv.Itoa(port))}, Labels: labels})
		}
		return out
	}
	cfg := promConfig{ScrapeConfigs: []promScrape{
		{
			JobName: "steppe-" + clusterName + "-consul", Scheme: "https", MetricsPath: "/v1/agent/metrics",
			Params: map[string][]string{"format": {"prometheus"}}, TLSConfig: tls,
			Authorization: &promAuth{Type: "Bearer", CredentialsFile: consulCredentials},
			StaticConfigs: targets(cluster.ConsulHTTPSPort),
		},
		{
			JobName: "steppe-" + clusterName + "-nomad", Scheme: "https", MetricsPath: "/v1/metrics",
			Params: map[string][]string{"format": {"prometheus"}}, TLSConfig: tls,
			StaticConfigs: targets(cluster.NomadHTTPPort),
		},
	}}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Prometheus scrape configuration of steppe cluster %s (steppe prometheus).\n", clusterName)
	b.WriteString("# The Consul token is read from its credentials_file, kept 0600 in the state directory;\n")
	b.WriteString("# Prometheus must be able to read it and the CA file. The targets are the machines of\n")
	b.WriteString("# now: run steppe prometheus again after steppe scale.\n")
	b.WriteString("# Each agent's own metrics are a node_exporter textfile on its machine\n")
	fmt.Fprintf(&b, "# (the agent's state dir/%s: node_exporter --collector.textfile.directory=its directory).\n", agent.DefaultMetricsFile)
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(cfg); err != nil {
		return nil, fmt.Errorf("prometheus config: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("prometheus config: %w", err)
	}
	return b.Bytes(), nil
}

// WritePrometheus writes the configuration to path atomically; it holds
// no secret, only the path of one.
func WritePrometheus(path string, config []byte) error {
	if err := atomicfile.WriteFile(path, config, 0o644); err != nil {
		return fmt.Errorf("prometheus config: %w", err)
	}
	return nil
}
