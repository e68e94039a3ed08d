package deploy

import (
	"fmt"
	"time"

	"github.com/steppe/steppe/internal/cluster"
)

// certProblems are status's problems with the state directory's
// certificates: each that expires within cluster.ExpiryWarning (or has
// expired), naming the machine and what renews it. A state whose
// certificates cannot be read is a problem too.
func certProblems(st *cluster.State, now time.Time) []string {
	certs, err := st.Certificates()
	if err != nil {
		return []string{"certificates: " + err.Error()}
	}
	return expiryProblems(certs, now, cluster.ExpiryWarning)
}

// expiryProblems says which of certs expire within warn of now.
func expiryProblems(certs []cluster.CertInfo, now time.Time, warn time.Duration) []string {
	var out []string
	for _, c := range certs {
		left := c.NotAfter.Sub(now)
		if left >= warn {
			continue
		}
		what := "certificate of machine " + c.Name
		fix := "run `steppe rotate certs`"
		switch {
		case c.CA:
			what = "the cluster CA"
			// rotate certs reissues with the same CA; a new CA means
			// every machine must trust it first, which steppe does not do.
			fix = "steppe rotate certs does not renew the CA: plan a new cluster or a CA migration before then"
		case c.Name == "operator":
			what = "the operator's certificate"
		}
		when := fmt.Sprintf("expires in %d days (%s)", int(left.Hours()/24), c.NotAfter.UTC().Format(time.DateOnly))
		if left <= 0 {
			when = fmt.Sprintf("expired on %s", c.NotAfter.UTC().Format(time.DateOnly))
		}
		out = append(out, fmt.Sprintf("%s %s: %s", what, when, fix))
	}
	return out
}
