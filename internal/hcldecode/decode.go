// Package hcldecode decodes an HCL expression into a Go value, as
// gohcl.DecodeExpression does (same conversion, same diagnostics),
// without importing gohcl: gohcl drags hclwrite and go-cmp into the
// binary, and go-cmp's initializers allocate about 215 KB at every start
// of every steppe process, the machine agent's included.
package hcldecode

import (
	"fmt"

	"github.com/hashicorp/hcl/v2"
	"github.com/zclconf/go-cty/cty/convert"
	"github.com/zclconf/go-cty/cty/gocty"
)

// Expr evaluates expr in ctx and stores the value in v, a pointer to a
// type cty can imply (string, int, bool, []string, map[string]string and
// the like). A v of another type is a programming error and panics.
func Expr(expr hcl.Expression, ctx *hcl.EvalContext, v any) hcl.Diagnostics {
	val, diags := expr.Value(ctx)
	ty, err := gocty.ImpliedType(v)
	if err != nil {
		panic(fmt.Sprintf("unsuitable decode target %T: %s", v, err))
	}
	if val, err = convert.Convert(val, ty); err == nil {
		err = gocty.FromCtyValue(val, v)
	}
	if err != nil {
		diags = append(diags, &hcl.Diagnostic{
			Severity: hcl.DiagError,
			Summary:  "Unsuitable value type",
			Detail:   fmt.Sprintf("Unsuitable value: %s", err.Error()),
			Subject:  expr.StartRange().Ptr(),
			Context:  expr.Range().Ptr(),
		})
	}
	return diags
}
