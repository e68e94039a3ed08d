package hcllit

import (
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"
)

// Every literal parses back, through the real HCL parser with variables
// and functions in scope, to the very string it was made from.
func TestRoundTrip(t *testing.T) {
	ctx := &hcl.EvalContext{Variables: map[string]cty.Value{"x": cty.StringVal("INTERPOLATED")}}
	for _, s := range []string{
		"", "plain", `a "quoted" \ back\slash`, "${x}", "$${x}", "%{ if true }y%{ endif }", "$", "%", "${", "tab\tnew\nline\rcr\x01\x7f",
		"unicode: é ☃", "trailing $", "{{ .Machine.Name }}",
	} {
		for _, src := range []string{String(s), List([]string{s, s})} {
			expr, diags := hclsyntax.ParseExpression([]byte(src), "t.hcl", hcl.InitialPos)
			if diags.HasErrors() {
				t.Fatalf("%q as %s: %v", s, src, diags)
			}
			v, diags := expr.Value(ctx)
			if diags.HasErrors() {
				t.Fatalf("%q as %s: %v", s, src, diags)
			}
			if v.Type() == cty.String {
				if v.AsString() != s {
					t.Errorf("%q came back as %q (from %s)", s, v.AsString(), src)
				}
				continue
			}
			for _, e := range v.AsValueSlice() {
				if e.AsString() != s {
					t.Errorf("%q in a list came back as %q (from %s)", s, e.AsString(), src)
				}
			}
		}
	}
}
