// Package hcldecode decodes HCL expressions into Go values, as
// gohcl.DecodeExpression does (same conversion, same diagnostics), and
// reads the sizes config files give as strings. It does not import gohcl:
// gohcl drags hclwrite and go-cmp into the binary, and go-cmp's
// initializers allocate about 215 KB at every start of every steppe
// process, the machine agent's included.
package hcldecode

import (
	"fmt"
	"strconv"
	"strings"

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

// ParseSize reads a size in bytes: "512MiB", "1G", "64k" or a plain
// number. The agent's config and the cluster spec share it.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.TrimSpace(t[i:])
	}
	mult := map[string]float64{
		"": 1, "b": 1,
		"k": 1 << 10, "kb": 1e3, "kib": 1 << 10,
		"m": 1 << 20, "mb": 1e6, "mib": 1 << 20,
		"g": 1 << 30, "gb": 1e9, "gib": 1 << 30,
		"t": 1 << 40, "tb": 1e12, "tib": 1 << 40,
	}[strings.ToLower(unit)]
	if mult == 0 {
		return 0, fmt.Errorf("unknown unit %q (want B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)", unit)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("want a size such as \"256MiB\"")
	}
	return int64(f * mult), nil
}
