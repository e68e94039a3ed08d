package render

import "testing"

// FuzzExecute feeds arbitrary template text to the renderer: it must
// never panic, and never produce more than MaxOutputBytes.
func FuzzExecute(f *testing.F) {
	for _, s := range []string{
		"{{ .Machine.Name }}",
		"{{ .Vars.servers | split \",\" }}",
		"{{ range $i, $s := split \",\" .Vars.servers }}{{ $i }}={{ $s }}{{ end }}",
		"{{ call .Vars.x }}",
		"{{ define \"a\" }}{{ template \"a\" }}{{ end }}{{ template \"a\" }}",
		"{{ index .Vars \"log-level\" | default \"x\" | indent 4 }}",
		"{{ toJSON . }}",
		"{{ printf \"%d\" 1 }}",
		"{{ slice .Machine.Name 1 3 }}",
		"{{",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		out, err := Execute("fuzz.tmpl", text, facts, vars)
		if err == nil && len(out) > MaxOutputBytes {
			t.Fatalf("output of %d bytes", len(out))
		}
	})
}
