package cluster

import (
	"fmt"
)

// CLIEnv is the environment that points the real consul and nomad CLIs at
// the cluster as its operator: addresses, the CA, the operator's client
// certificate and the management tokens. consulAddr and nomadAddr are
// host:port of an HTTPS API. The result holds the tokens in clear, for the
// operator's own shell (`eval "$(steppe env)"`); never log it.
func CLIEnv(st *State, consulAddr, nomadAddr string) ([]string, error) {
	op, err := st.OperatorCert()
	if err != nil {
		return nil, fmt.Errorf("cli env: %w", err)
	}
	env := []string{
		"CONSUL_HTTP_ADDR=https://" + consulAddr,
		"CONSUL_CACERT=" + st.CAFile(),
		"CONSUL_CLIENT_CERT=" + op.CertFile,
		"CONSUL_CLIENT_KEY=" + op.KeyFile,
		"NOMAD_ADDR=https://" + nomadAddr,
		"NOMAD_CACERT=" + st.CAFile(),
		"NOMAD_CLIENT_CERT=" + op.CertFile,
		"NOMAD_CLIENT_KEY=" + op.KeyFile,
	}
	if t, ok := st.LookupToken(TokenConsulBootstrap); ok {
		env = append(env, "CONSUL_HTTP_TOKEN="+t.Reveal())
	}
	if t, ok := st.LookupToken(TokenNomadBootstrap); ok {
		env = append(env, "NOMAD_TOKEN="+t.Reveal())
	}
	return env, nil
}
