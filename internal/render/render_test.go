package render

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

var facts = Facts{
	Name: "web-1", Address: "10.0.0.5", Pool: "web", Region: "eu", Datacenter: "eu-1",
	Role: "client", Cluster: "prod", Tags: map[string]string{"rack": "r7"},
}

var vars = map[string]string{"servers": "10.0.0.1,10.0.0.2", "log-level": "", "token": `a"b`}

func TestExecute(t *testing.T) {
	const tmpl = `name = {{ quote .Machine.Name }}
bind = "{{ .Machine.Address }}"
dc = "{{ .Machine.Region }}-{{ .Machine.Datacenter }}" pool={{ .Machine.Pool }} role={{ .Machine.Role }} cluster={{ .Machine.Cluster }} rack={{ .Machine.Tags.rack }}
servers = {{ split "," .Vars.servers | toJSON }}
joined = {{ split "," .Vars.servers | join " " | upper }}
level = {{ index .Vars "log-level" | default "INFO" | lower }}
token = {{ quote .Vars.token }}
{{ if hasPrefix "web" .Machine.Name }}web{{ end }} {{ if contains "-" .Machine.Name }}dash{{ end }} {{ if hasSuffix "1" .Machine.Name }}one{{ end }}
{{ replace "." "_" .Machine.Address }} {{ trimPrefix "web-" .Machine.Name }} {{ trimSuffix "-1" .Machine.Name }} [{{ trim "  x  " }}]
{{ indent 2 "a\nb" }}
{{ range $i, $s := split "," .Vars.servers }}{{ if $i }},{{ end }}{{ $s }}{{ end }} {{ len .Vars }} {{ print "p" }}
`
	const want = `name = "web-1"
bind = "10.0.0.5"
dc = "eu-eu-1" pool=web role=client cluster=prod rack=r7
servers = ["10.0.0.1","10.0.0.2"]
joined = 10.0.0.1 10.0.0.2
level = info
token = "a\"b"
web dash one
10_0_0_5 1 web [x]
  a
  b
10.0.0.1,10.0.0.2 3 p
`
	got, err := Execute("nomad.hcl.tmpl", tmpl, facts, vars)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}
}

func TestMissingKeyNamesFileAndLine(t *testing.T) {
	for _, tc := range []struct{ tmpl, want string }{
		{"a\nb\n{{ .Vars.foo }}\n", `render nomad.hcl.tmpl:3:8: at <.Vars.foo>: map has no entry for key "foo"`},
		{"{{ .Machine.Nmae }}", `render nomad.hcl.tmpl:1:11: at <.Machine.Nmae>: map has no entry for key "Nmae"`},
		{"{{ .Machine.Tags.zone }}", `map has no entry for key "zone"`},
		{"{{ .Secrets }}", `map has no entry for key "Secrets"`},
	} {
		_, err := Execute("nomad.hcl.tmpl", tc.tmpl, facts, vars)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.tmpl, err, tc.want)
		}
		var re *Error
		if !errors.As(err, &re) || re.Name != "nomad.hcl.tmpl" {
			t.Errorf("%q: %v is not a *render.Error naming the template", tc.tmpl, err)
		}
	}
}

// TestNoFileEnvExecNetwork tries the functions other template engines
// offer to reach outside; each must fail to parse, naming file and line.
func TestNoFileEnvExecNetwork(t *testing.T) {
	for _, tc := range []struct{ tmpl, want string }{
		{"x\n{{ env \"HOME\" }}", `render t.tmpl:2: function "env" not defined`},
		{"{{ readFile \"/etc/passwd\" }}", `function "readFile" not defined`},
		{"{{ file \"/etc/passwd\" }}", `function "file" not defined`},
		{"{{ exec \"id\" }}", `function "exec" not defined`},
		{"{{ shell \"id\" }}", `function "shell" not defined`},
		{"{{ getenv \"PATH\" }}", `function "getenv" not defined`},
		{"{{ httpGet \"http://127.0.0.1/\" }}", `function "httpGet" not defined`},
		{"{{ key \"consul/kv\" }}", `function "key" not defined`},
		{"{{ secret \"vault/x\" }}", `function "secret" not defined`},
		{"{{ template \"/etc/passwd\" }}", `template "/etc/passwd" not defined`},
		{"a\n\n{{ call .Vars.servers }}", `render t.tmpl:3:3: function "call" is not allowed`},
		{"{{ printf \"%999999999d\" 1 }}", `function "printf" is not allowed`},
		{"{{ html .Vars.token }}", `function "html" is not allowed`},
		{"{{ js .Vars.token }}", `function "js" is not allowed`},
		{"{{ urlquery .Vars.token }}", `function "urlquery" is not allowed`},
		{"{{ if true }}{{ with 1 }}{{ call 1 }}{{ end }}{{ end }}", `function "call" is not allowed`},
		{"{{ define \"x\" }}{{ printf \"x\" }}{{ end }}ok", `function "printf" is not allowed`},
		{"{{ range 1000000000 }}x{{ end }}", "range over a number is not allowed"},
	} {
		_, err := Execute("t.tmpl", tc.tmpl, facts, vars)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.tmpl, err, tc.want)
		}
	}
}

// TestDataHoldsNoFunctions walks the template data: only strings and maps
// of strings, so call has nothing to call and there are no methods.
func TestDataHoldsNoFunctions(t *testing.T) {
	var walk func(path string, v reflect.Value)
	walk = func(path string, v reflect.Value) {
		switch v.Kind() {
		case reflect.Interface:
			walk(path, v.Elem())
		case reflect.String:
		case reflect.Map:
			if v.Type().NumMethod() != 0 || v.Type().Key().Kind() != reflect.String {
				t.Errorf("%s: %s has methods or non-string keys", path, v.Type())
			}
			for _, k := range v.MapKeys() {
				walk(path+"."+k.String(), v.MapIndex(k))
			}
		default:
			t.Errorf("%s: %s (%s) in template data", path, v.Type(), v.Kind())
		}
	}
	walk("", reflect.ValueOf(data(facts, vars)))
	// And the data is a copy: a template cannot change the caller's maps
	// (text/template cannot assign to maps anyway), nor see later changes.
	d := data(facts, vars)
	vars2 := d["Vars"].(map[string]string)
	vars2["servers"] = "changed"
	if vars["servers"] == "changed" {
		t.Fatal("template data shares the caller's map")
	}
}

func TestOutputIsBounded(t *testing.T) {
	big := map[string]string{"big": strings.Repeat("x", 100000)}
	_, err := Execute("bomb.tmpl", `{{ range split "" .Vars.big }}{{ $.Vars.big }}{{ end }}`, facts, big)
	if err == nil || !strings.Contains(err.Error(), "longer than the limit") {
		t.Fatalf("10 GB of output: %v", err)
	}
	if _, err := Execute("t.tmpl", "{{ indent 100000000 \"x\" }}", facts, vars); err == nil {
		t.Fatal("indent by 100000000 accepted")
	}
}

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for p, c := range files {
		full := filepath.Join(dir, p)
		os.MkdirAll(filepath.Dir(full), 0o755)
		if err := os.WriteFile(full, []byte(c), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	var names []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			names = append(names, rel)
		}
		return nil
	})
	slices.Sort(names)
	return names
}

func TestRender(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"nomad/nomad.hcl.tmpl": `name = "{{ .Machine.Name }}"`,
		"consul.json.tmpl":     `{"dc": {{ quote .Machine.Datacenter }}}`,
	})
	written, err := Render(dir, []string{"nomad/nomad.hcl.tmpl", "consul.json.tmpl"}, facts, vars)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(written, []string{"nomad/nomad.hcl", "consul.json"}) {
		t.Fatalf("written %v", written)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "nomad/nomad.hcl"))
	if string(b) != `name = "web-1"` {
		t.Fatalf("nomad.hcl = %q", b)
	}
	fi, _ := os.Stat(filepath.Join(dir, "consul.json"))
	if fi.Mode().Perm() != 0o640 {
		t.Fatalf("output mode %v, want the template's 0640", fi.Mode().Perm())
	}
	// Rendering again is idempotent (an agent restarted mid-render redoes it).
	if _, err := Render(dir, []string{"nomad/nomad.hcl.tmpl", "consul.json.tmpl"}, facts, vars); err != nil {
		t.Fatal(err)
	}
}

// TestRenderAllOrNothing: one bad template among good ones changes no
// output and leaves no temporary file.
func TestRenderAllOrNothing(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"a.conf.tmpl": "good {{ .Machine.Name }}",
		"a.conf":      "old a",
		"b.conf.tmpl": "line 1\n{{ .Vars.nope }}",
		"c.conf.tmpl": "never reached",
	})
	before := listDir(t, dir)
	_, err := Render(dir, []string{"a.conf.tmpl", "b.conf.tmpl", "c.conf.tmpl"}, facts, vars)
	if err == nil || !strings.Contains(err.Error(), `render b.conf.tmpl:2:`) || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("error %v", err)
	}
	if after := listDir(t, dir); !slices.Equal(before, after) {
		t.Fatalf("files before %v, after %v", before, after)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "a.conf")); string(b) != "old a" {
		t.Fatalf("a.conf changed to %q by a failed render", b)
	}
}

func TestRenderStaysInside(t *testing.T) {
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "secret.tmpl"), []byte("{{ .Machine.Name }}"), 0o600)
	dir := writeFiles(t, map[string]string{"ok.tmpl": "x"})
	if err := os.Symlink(filepath.Join(outside, "secret.tmpl"), filepath.Join(dir, "leak.tmpl")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"../" + filepath.Base(outside) + "/secret.tmpl", "leak.tmpl", "/etc/hostname.tmpl", "notemplate"} {
		if _, err := Render(dir, []string{name}, facts, vars); err == nil {
			t.Errorf("rendered %q", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(outside, "secret")); !os.IsNotExist(err) {
		t.Fatal("a file was written outside the release")
	}
}
