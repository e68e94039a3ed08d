package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"gopkg.in/yaml.v3"

	"github.com/steppe/steppe/internal/deploy"
)

// scrapeFile is the part of Prometheus's configuration file that steppe
// prometheus writes, with Prometheus's field names. It is decoded with
// unknown fields refused: a key Prometheus would not know fails the test.
type scrapeFile struct {
	ScrapeConfigs []struct {
		JobName     string              `yaml:"job_name"`
		Scheme      string              `yaml:"scheme"`
		MetricsPath string              `yaml:"metrics_path"`
		Params      map[string][]string `yaml:"params"`
		TLSConfig   struct {
			CAFile   string `yaml:"ca_file"`
			CertFile string `yaml:"cert_file"`
			KeyFile  string `yaml:"key_file"`
		} `yaml:"tls_config"`
		Authorization *struct {
			Type            string `yaml:"type"`
			Credentials     string `yaml:"credentials"`
			CredentialsFile string `yaml:"credentials_file"`
		} `yaml:"authorization"`
		StaticConfigs []struct {
			Targets []string          `yaml:"targets"`
			Labels  map[string]string `yaml:"labels"`
		} `yaml:"static_configs"`
	} `yaml:"scrape_configs"`
}

// scrapeAccept is what Prometheus 3 asks for by default (scrape_protocols):
// OpenMetrics first, then the classic text format.
const scrapeAccept = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1"

// TestPrometheus: after up, steppe prometheus writes a scrape
// configuration that Prometheus would accept, and every target it lists
// answers the scrape Prometheus would make (https, the CA file, the
// credentials file as a Bearer token) with the daemon's own series. The
// Consul metrics token reads metrics and nothing else; a second run
// changes nothing. Each machine's agent writes its own textfile, which
// parses and names the release and the verified artifacts.
func TestPrometheus(t *testing.T) {
	c := newUpCluster(t, "e2eprom", 51)
	c.up()
	st := c.status()
	if !st.Healthy {
		t.Fatalf("cluster not healthy: %q", st.Problems)
	}
	roles := map[string]string{} // address -> server or client
	for _, a := range st.Agents {
		roles[a.Address] = "client"
		if a.Role == "server" {
			roles[a.Address] = "server"
		}
	}

	outFile := filepath.Join(c.dir, "prometheus.yml")
	if out, err := c.steppe(2*time.Minute, "prometheus", "-state", c.state, "-out", outFile); err != nil || out != "" {
		t.Fatalf("steppe prometheus -out: %v\n%s", err, out)
	}
	raw, err := os.ReadFile(outFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("steppe prometheus:\n%s", raw)
	var cfg scrapeFile
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("the configuration does not decode strictly: %v", err)
	}

	jobs := map[string]int{}
	var consulToken string
	scraped := 0
	for _, sc := range cfg.ScrapeConfigs {
		product := ""
		switch {
		case strings.HasSuffix(sc.JobName, "-consul"):
			product = "consul"
		case strings.HasSuffix(sc.JobName, "-nomad"):
			product = "nomad"
		default:
			t.Errorf("unexpected job %q", sc.JobName)
			continue
		}
		jobs[product]++
		if sc.Scheme != "https" || sc.TLSConfig.CAFile == "" {
			t.Errorf("job %s: scheme %q, ca_file %q: want https with the cluster CA", sc.JobName, sc.Scheme, sc.TLSConfig.CAFile)
		}
		if sc.TLSConfig.CertFile != "" || sc.TLSConfig.KeyFile != "" {
			t.Errorf("job %s: a client certificate, which neither HTTPS API asks for", sc.JobName)
		}
		if !strings.HasPrefix(sc.TLSConfig.CAFile, c.state+"/") {
			t.Errorf("job %s: ca_file %s is not in the state directory", sc.JobName, sc.TLSConfig.CAFile)
		}
		token := ""
		switch {
		case product == "nomad" && sc.Authorization != nil:
			t.Errorf("job %s: Nomad's /v1/metrics checks no ACL, yet the job has an authorization", sc.JobName)
		case product == "consul":
			a := sc.Authorization
			if a == nil || a.Type != "Bearer" || a.Credentials != "" || a.CredentialsFile == "" {
				t.Fatalf("job %s: authorization %+v, want a Bearer credentials_file and no inline credentials", sc.JobName, a)
			}
			fi, err := os.Stat(a.CredentialsFile)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 || !strings.HasPrefix(a.CredentialsFile, c.state+"/") {
				t.Errorf("credentials file %s: mode %v, want 0600 in the state directory", a.CredentialsFile, fi.Mode().Perm())
			}
			b, err := os.ReadFile(a.CredentialsFile)
			if err != nil {
				t.Fatal(err)
			}
			// As Prometheus reads a credentials_file.
			token = strings.TrimSpace(string(b))
			consulToken = token
			if token == "" || bytes.Contains(raw, []byte(token)) {
				t.Errorf("credentials file empty, or its secret printed in the configuration")
			}
		}
		client := scrapeClient(t, sc.TLSConfig.CAFile)
		var targets []string
		for _, stc := range sc.StaticConfigs {
			for _, target := range stc.Targets {
				targets = append(targets, target)
				addr := strings.Split(target, ":")[0]
				if stc.Labels["role"] != roles[addr] || stc.Labels["machine"] == "" || stc.Labels["cluster"] != "e2eprom" {
					t.Errorf("job %s target %s: labels %v (machine's role %q)", sc.JobName, target, stc.Labels, roles[addr])
				}
				u := url.URL{Scheme: sc.Scheme, Host: target, Path: sc.MetricsPath, RawQuery: url.Values(sc.Params).Encode()}
				fams := scrape(t, client, u.String(), token)
				scraped++
				checkSeries(t, product, roles[addr], target, fams)
			}
		}
		want := slices.Clone(c.addrs)
		slices.Sort(want)
		var got []string
		for _, tg := range targets {
			got = append(got, strings.Split(tg, ":")[0])
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("job %s: targets on %q, want every machine %q", sc.JobName, got, want)
		}
	}
	if jobs["consul"] != 1 || jobs["nomad"] != 1 || scraped != 2*len(c.addrs) {
		t.Fatalf("jobs %v, %d scrapes: want one Consul and one Nomad job, %d scrapes", jobs, scraped, 2*len(c.addrs))
	}

	c.checkMetricsToken(consulToken)

	// Run again, to standard output: the same configuration, the same
	// token, and one metrics token in Consul.
	again, err := c.steppe(2*time.Minute, "prometheus", "-state", c.state)
	if err != nil {
		t.Fatalf("second steppe prometheus: %v\n%s", err, again)
	}
	if again != string(raw) {
		t.Errorf("second run printed another configuration:\n%s", again)
	}
	c.checkAgentTextfiles(st.Agents)
}

// scrapeClient is the client Prometheus makes of a tls_config with only a
// ca_file: the system roots replaced by that CA, the target's host as the
// name to verify.
func scrapeClient(t testing.TB, caFile string) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("%s holds no certificate", caFile)
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// scrape GETs url as Prometheus does and parses the body in the format
// the server answered with.
func scrape(t testing.TB, client *http.Client, u, token string) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", scrapeAccept)
	req.Header.Set("X-Prometheus-Scrape-Timeout-Seconds", "10")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s: %v", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s: %s", u, resp.Status, body)
	}
	format := expfmt.ResponseFormat(resp.Header)
	if format.FormatType() == expfmt.TypeUnknown {
		t.Fatalf("scrape %s: Content-Type %q is no exposition format", u, resp.Header.Get("Content-Type"))
	}
	d := expfmt.NewDecoder(bytes.NewReader(body), format)
	fams := map[string]*dto.MetricFamily{}
	for {
		var f dto.MetricFamily
		err := d.Decode(&f)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("scrape %s: the body (%s) does not parse: %v", u, format, err)
		}
		fams[f.GetName()] = &f
	}
	if len(fams) == 0 {
		t.Fatalf("scrape %s: no series", u)
	}
	return fams
}

// checkSeries checks that a daemon's scrape holds its own series: the Go
// runtime's of every agent, raft's of a Consul server, the client's of a
// Nomad client and the server's own (nomad_nomad_...) of a Nomad server.
func checkSeries(t testing.TB, product, role, target string, fams map[string]*dto.MetricFamily) {
	t.Helper()
	has := func(prefix string) bool {
		for name := range fams {
			if strings.HasPrefix(name, prefix) {
				return true
			}
		}
		return false
	}
	want := []string{product + "_runtime_num_goroutines"}
	switch {
	case product == "consul" && role == "server":
		want = append(want, "consul_raft_")
	case product == "nomad" && role == "server":
		want = append(want, "nomad_nomad_")
	case product == "nomad" && role == "client":
		want = append(want, "nomad_client_")
	}
	for _, w := range want {
		if !has(w) {
			var names []string
			for n := range fams {
				names = append(names, n)
			}
			slices.Sort(names)
			t.Errorf("%s (%s %s): no series %s*; it has %d: %s", target, product, role, w, len(names), strings.Join(names, " "))
		}
	}
}

// checkMetricsToken proves the metrics token least privileged: it is of
// one policy, steppe's metrics one; KV and the ACL endpoints refuse it
// (403); without it the metrics endpoint refuses too.
func (c *upCluster) checkMetricsToken(token string) {
	t := c.t
	t.Helper()
	env := c.envMap()
	client := scrapeClient(t, env["CONSUL_CACERT"])
	base := env["CONSUL_HTTP_ADDR"]
	call := func(method, path, tok string) (int, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var body io.Reader
		if method == http.MethodPut {
			body = strings.NewReader("x")
		}
		req, err := http.NewRequestWithContext(ctx, method, base+path, body)
		if err != nil {
			t.Fatal(err)
		}
		if tok != "" {
			req.Header.Set("X-Consul-Token", tok)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	// A key the metrics token must not read: a single key's read is
	// refused; a listing filters it out (Consul answers 404 for a listing
	// left empty).
	if code, body := call(http.MethodPut, "/v1/kv/steppe-e2e/secret", env["CONSUL_HTTP_TOKEN"]); code != http.StatusOK {
		t.Fatalf("put a key with the management token: %d %s", code, body)
	}
	if code, body := call(http.MethodGet, "/v1/kv/?recurse=true", token); code == http.StatusOK || strings.Contains(body, "steppe-e2e") {
		t.Errorf("metrics token: the KV listing answered %d: %s", code, body)
	}
	for _, r := range []struct{ method, path string }{
		{http.MethodGet, "/v1/kv/steppe-e2e/secret"},
		{http.MethodPut, "/v1/kv/steppe-metrics-probe"},
		{http.MethodGet, "/v1/acl/tokens"},
		{http.MethodGet, "/v1/acl/policies"},
		{http.MethodGet, "/v1/acl/roles"},
		{http.MethodGet, "/v1/operator/raft/configuration"},
	} {
		if code, body := call(r.method, r.path, token); code != http.StatusForbidden {
			t.Errorf("metrics token: %s %s answered %d, want 403: %s", r.method, r.path, code, body)
		}
	}
	if code, body := call(http.MethodGet, "/v1/agent/metrics?format=prometheus", ""); code != http.StatusForbidden {
		t.Errorf("no token: /v1/agent/metrics answered %d, want 403: %s", code, body)
	}
	code, self := call(http.MethodGet, "/v1/acl/token/self", token)
	if code != http.StatusOK || !strings.Contains(self, `"Name":"steppe-metrics"`) || strings.Count(self, `"Name":`) != 1 {
		t.Errorf("metrics token's own record (%d): want exactly the policy steppe-metrics: %s", code, self)
	}
	code, tokens := call(http.MethodGet, "/v1/acl/tokens", env["CONSUL_HTTP_TOKEN"])
	if code != http.StatusOK {
		t.Fatalf("list tokens: %d %s", code, tokens)
	}
	if n := strings.Count(tokens, `"Description":"steppe: Prometheus metrics"`); n != 1 {
		t.Errorf("%d metrics tokens in Consul, want 1", n)
	}
	code, pol := call(http.MethodGet, "/v1/acl/policy/name/steppe-metrics", env["CONSUL_HTTP_TOKEN"])
	if code != http.StatusOK || !strings.Contains(pol, `agent_prefix \"\" { policy = \"read\" }`) || strings.Count(pol, "policy =") != 1 {
		t.Errorf("policy steppe-metrics (%d): want agent_prefix read and nothing else: %s", code, pol)
	}
}

// checkAgentTextfiles reads every machine's agent textfile (the default
// path below the agent's state dir, where the local provider keeps it):
// it parses, says release 1, the daemons running and ready, and the
// consul and nomad artifacts with the SHA-256 they were verified with.
func (c *upCluster) checkAgentTextfiles(agents []deploy.AgentStatus) {
	t := c.t
	t.Helper()
	hex64 := regexp.MustCompile(`^[0-9a-f]{64}$`)
	for _, a := range agents {
		path := filepath.Join(c.state, "machines", a.Machine, "state", "metrics", "steppe.prom")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Errorf("machine %s: %v", a.Machine, err)
			continue
		}
		parser := expfmt.NewTextParser(model.LegacyValidation)
		fams, err := parser.TextToMetricFamilies(bytes.NewReader(b))
		if err != nil {
			t.Errorf("machine %s: %s does not parse: %v\n%s", a.Machine, path, err, b)
			continue
		}
		gauge := func(name string, labels map[string]string) (float64, bool) {
		next:
			for _, m := range fams[name].GetMetric() {
				for _, l := range m.GetLabel() {
					if v, ok := labels[l.GetName()]; ok && v != l.GetValue() {
						continue next
					}
				}
				return m.GetGauge().GetValue(), true
			}
			return 0, false
		}
		if v, ok := gauge("steppe_agent_bundle_version", nil); !ok || v != 1 {
			t.Errorf("machine %s: bundle version %v (present %v), want 1", a.Machine, v, ok)
		}
		for _, svc := range []string{"consul", "nomad"} {
			if v, ok := gauge("steppe_agent_service_ready", map[string]string{"service": svc}); !ok || v != 1 {
				t.Errorf("machine %s: %s ready %v (present %v)", a.Machine, svc, v, ok)
			}
		}
		products := map[string]string{}
		for _, m := range fams["steppe_agent_artifact_info"].GetMetric() {
			l := map[string]string{}
			for _, p := range m.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			products[l["product"]] = l["sha256"]
			if !hex64.MatchString(l["sha256"]) || l["version"] == "" {
				t.Errorf("machine %s: artifact %v without a version or a SHA-256", a.Machine, l)
			}
		}
		if _, ok := products["consul"]; !ok {
			t.Errorf("machine %s: no consul artifact: %v", a.Machine, products)
		}
		if _, ok := products["nomad"]; !ok {
			t.Errorf("machine %s: no nomad artifact: %v", a.Machine, products)
		}
	}
}
