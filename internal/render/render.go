// Package render renders a release's configuration templates through a
// deliberately small scope (DESIGN decision 6): Go text/template, whose
// data holds only machine facts and bundle variables (strings and maps of
// strings, never functions or values with methods), with an allow-list of
// pure string functions. A template cannot read files or the environment,
// run commands or reach the network, and a missing key is an error that
// names the template file and line.
//
// Templates see:
//
//	.Machine.Name .Machine.Address .Machine.Pool .Machine.Region
//	.Machine.Datacenter .Machine.Role .Machine.Cluster
//	.Machine.Tags.KEY   (free-form machine tags)
//	.Vars.KEY           (the bundle's variables; index .Vars "a-b" for other names)
//
// Functions (arguments in pipeline order: the piped value comes last):
//
//	lower S, upper S, trim S, trimPrefix PREFIX S, trimSuffix SUFFIX S,
//	replace OLD NEW S, split SEP S, join SEP LIST, quote S (a Go/HCL/JSON
//	double-quoted string), hasPrefix PREFIX S, hasSuffix SUFFIX S,
//	contains SUBSTR S, toJSON V, default DEFAULT S (S, or DEFAULT when S is
//	empty), indent N S (N spaces before every line, N ≤ 64)
//
// and the text/template builtins and, or, not, eq, ne, lt, le, gt, ge,
// index, len, slice, print and println. The builtins call, printf, html, js
// and urlquery are refused when the template is parsed (call could invoke
// a function value; printf's width can allocate without bound), as is a
// range over a number. Output is capped at MaxOutputBytes per template.
package render

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"

	"github.com/steppe/steppe/internal/atomicfile"
)

// Suffix ends every template's name; the output takes the name without it.
const Suffix = ".tmpl"

// Limits on one template.
const (
	MaxTemplateBytes = 1 << 20
	MaxOutputBytes   = 16 << 20
)

// Facts are what a template may know about the machine it renders for.
type Facts struct {
	Name       string
	Address    string
	Pool       string
	Region     string
	Datacenter string
	Role       string
	Cluster    string
	Tags       map[string]string
}

// allowedBuiltin says which text/template builtins a template may use.
func allowedBuiltin(name string) bool {
	switch name {
	case "and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "index", "len", "slice", "print", "println":
		return true
	}
	return false
}

// refusedBuiltins are overridden so that they fail even if the parse-time
// check were bypassed.
func refusedBuiltins() []string { return []string{"call", "printf", "html", "js", "urlquery"} }

func funcs() template.FuncMap {
	fm := template.FuncMap{
		"lower":      strings.ToLower,
		"upper":      strings.ToUpper,
		"trim":       strings.TrimSpace,
		"trimPrefix": func(prefix, s string) string { return strings.TrimPrefix(s, prefix) },
		"trimSuffix": func(suffix, s string) string { return strings.TrimSuffix(s, suffix) },
		"replace":    func(old, new, s string) string { return strings.ReplaceAll(s, old, new) },
		"split":      func(sep, s string) []string { return strings.Split(s, sep) },
		"join":       func(sep string, list []string) string { return strings.Join(list, sep) },
		"quote":      strconv.Quote,
		"hasPrefix":  func(prefix, s string) bool { return strings.HasPrefix(s, prefix) },
		"hasSuffix":  func(suffix, s string) bool { return strings.HasSuffix(s, suffix) },
		"contains":   func(substr, s string) bool { return strings.Contains(s, substr) },
		"toJSON": func(v any) (string, error) {
			b, err := json.Marshal(v)
			return string(b), err
		},
		"default": func(def, s string) string {
			if s == "" {
				return def
			}
			return s
		},
		"indent": func(n int, s string) (string, error) {
			if n < 0 || n > 64 {
				return "", fmt.Errorf("indent %d: want 0 to 64", n)
			}
			pad := strings.Repeat(" ", n)
			return pad + strings.ReplaceAll(s, "\n", "\n"+pad), nil
		},
	}
	for _, name := range refusedBuiltins() {
		fm[name] = func(...any) (string, error) { return "", fmt.Errorf("function %s is not allowed in templates", name) }
	}
	return fm
}

// data builds the only value a template sees: maps of strings, copied, so
// that nothing in it has methods or is a function that call could invoke.
func data(f Facts, vars map[string]string) map[string]any {
	tags := maps.Clone(f.Tags)
	if tags == nil {
		tags = map[string]string{}
	}
	v := maps.Clone(vars)
	if v == nil {
		v = map[string]string{}
	}
	return map[string]any{
		"Machine": map[string]any{
			"Name": f.Name, "Address": f.Address, "Pool": f.Pool, "Region": f.Region,
			"Datacenter": f.Datacenter, "Role": f.Role, "Cluster": f.Cluster, "Tags": tags,
		},
		"Vars": v,
	}
}

// Error is a template error; it names the template and, when known, the
// line and column.
type Error struct {
	Name string // the template's path in the release
	Msg  string // "12:5: map has no entry for key \"foo\"" and the like
	Err  error
}

func (e *Error) Error() string { return "render " + e.Name + ":" + e.Msg }
func (e *Error) Unwrap() error { return e.Err }

func newError(name string, err error) *Error {
	msg := err.Error()
	rest, ok := strings.CutPrefix(msg, "template: "+name+":")
	if !ok {
		return &Error{Name: name, Msg: " " + msg, Err: err}
	}
	// text/template says `12:5: executing "NAME" at <.Vars.foo>: why`;
	// the template's name is said once already.
	const exec = `: executing "`
	if i := strings.Index(rest, exec); i >= 0 {
		after := rest[i+len(exec):]
		if j := strings.Index(after, `" at <`); j >= 0 {
			rest = rest[:i] + ": at <" + after[j+len(`" at <`):]
		}
	}
	return &Error{Name: name, Msg: rest, Err: err}
}

// parseTemplate parses one template and checks it against the allow-list.
func parseTemplate(name, text string) (*template.Template, error) {
	t, err := template.New(name).Option("missingkey=error").Funcs(funcs()).Parse(text)
	if err != nil {
		return nil, newError(name, err)
	}
	fm := funcs()
	for _, sub := range t.Templates() {
		if sub.Tree == nil {
			continue
		}
		if err := check(fm, sub.Tree, sub.Tree.Root); err != nil {
			return nil, &Error{Name: name, Msg: err.Error(), Err: err}
		}
	}
	return t, nil
}

// check walks a parse tree and refuses identifiers outside the allow-list
// and ranges over numbers.
func check(fm template.FuncMap, tree *parse.Tree, n parse.Node) error {
	if n == nil {
		return nil
	}
	where := func(n parse.Node) string {
		loc, _ := tree.ErrorContext(n)
		if i := strings.Index(loc, ":"); i >= 0 {
			return loc[i+1:]
		}
		return loc
	}
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			if err := check(fm, tree, c); err != nil {
				return err
			}
		}
	case *parse.ActionNode:
		return check(fm, tree, n.Pipe)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		for _, c := range n.Cmds {
			if err := check(fm, tree, c); err != nil {
				return err
			}
		}
	case *parse.CommandNode:
		for _, a := range n.Args {
			if err := check(fm, tree, a); err != nil {
				return err
			}
		}
	case *parse.ChainNode:
		return check(fm, tree, n.Node)
	case *parse.IdentifierNode:
		if _, mine := fm[n.Ident]; (mine && !isRefused(n.Ident)) || allowedBuiltin(n.Ident) {
			return nil
		}
		return fmt.Errorf("%s: function %q is not allowed in templates", where(n), n.Ident)
	case *parse.IfNode:
		return checkBranch(fm, tree, &n.BranchNode)
	case *parse.WithNode:
		return checkBranch(fm, tree, &n.BranchNode)
	case *parse.RangeNode:
		if p := n.Pipe; p != nil && len(p.Cmds) == 1 && len(p.Cmds[0].Args) == 1 {
			if _, ok := p.Cmds[0].Args[0].(*parse.NumberNode); ok {
				return fmt.Errorf("%s: range over a number is not allowed in templates", where(n))
			}
		}
		return checkBranch(fm, tree, &n.BranchNode)
	case *parse.TemplateNode:
		return check(fm, tree, n.Pipe)
	}
	return nil
}

func checkBranch(fm template.FuncMap, tree *parse.Tree, b *parse.BranchNode) error {
	if err := check(fm, tree, b.Pipe); err != nil {
		return err
	}
	if err := check(fm, tree, b.List); err != nil {
		return err
	}
	if b.ElseList != nil {
		return check(fm, tree, b.ElseList)
	}
	return nil
}

func isRefused(name string) bool { return slices.Contains(refusedBuiltins(), name) }

var errTooLong = errors.New("output is longer than the limit")

type limitWriter struct {
	w io.Writer
	n int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.n {
		return 0, fmt.Errorf("%w of %d bytes", errTooLong, MaxOutputBytes)
	}
	l.n -= int64(len(p))
	return l.w.Write(p)
}

// Execute renders one template held in memory. name is used in errors.
func Execute(name, text string, facts Facts, vars map[string]string) ([]byte, error) {
	if len(text) > MaxTemplateBytes {
		return nil, &Error{Name: name, Msg: fmt.Sprintf(" %d bytes, more than the limit of %d", len(text), MaxTemplateBytes)}
	}
	t, err := parseTemplate(name, text)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := t.Execute(&limitWriter{w: &buf, n: MaxOutputBytes}, data(facts, vars)); err != nil {
		return nil, newError(name, err)
	}
	return buf.Bytes(), nil
}

// Render renders every template (paths relative to releaseDir, each
// ending in .tmpl) into the file of the same name without .tmpl, with the
// template's permissions. All templates are rendered to hidden temporary
// files first; only when every one succeeded are they renamed into place,
// so a template error leaves no output changed. Files are reached through
// an os.Root: no name resolves outside releaseDir. It returns the paths
// written.
func Render(releaseDir string, templates []string, facts Facts, vars map[string]string) ([]string, error) {
	root, err := os.OpenRoot(releaseDir)
	if err != nil {
		return nil, fmt.Errorf("render: %w", err)
	}
	defer root.Close()
	var done []*atomicfile.Pending
	defer func() {
		for _, p := range done {
			p.Discard() // nothing, once committed
		}
	}()
	var written []string
	for _, name := range templates {
		out, isTmpl := strings.CutSuffix(name, Suffix)
		if !isTmpl || out == "" || strings.HasSuffix(out, "/") {
			return nil, &Error{Name: name, Msg: " name must end in " + Suffix}
		}
		text, mode, err := readTemplate(root, name)
		if err != nil {
			return nil, &Error{Name: name, Msg: " " + err.Error(), Err: err}
		}
		b, err := Execute(name, text, facts, vars)
		if err != nil {
			return nil, err
		}
		// Through the root: the temporary file, the rename and the sync
		// of the directory all stay inside releaseDir.
		p, err := atomicfile.CreateIn(root, out, mode, func(w io.Writer) error {
			_, err := w.Write(b)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("render %s: %w", name, err)
		}
		done = append(done, p)
		written = append(written, out)
	}
	if err := atomicfile.CommitAll(done...); err != nil {
		return nil, fmt.Errorf("render: %w", err)
	}
	return written, nil
}

func readTemplate(root *os.Root, name string) (string, fs.FileMode, error) {
	f, err := root.Open(name)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	if !fi.Mode().IsRegular() {
		return "", 0, fmt.Errorf("not a regular file")
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxTemplateBytes+1))
	if err != nil {
		return "", 0, err
	}
	if len(b) > MaxTemplateBytes {
		return "", 0, fmt.Errorf("more than the limit of %d bytes", MaxTemplateBytes)
	}
	return string(b), fi.Mode().Perm(), nil
}
