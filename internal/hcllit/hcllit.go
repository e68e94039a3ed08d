// Package hcllit writes Go strings as HCL string literals that parse back
// to exactly the same value: no interpolation, no directive, no escape
// left active.
package hcllit

import (
	"fmt"
	"strings"
)

// Escape is s as the inside of an HCL quoted string: quotes, backslashes
// and control characters escaped, and "${" and "%{" doubled so that
// nothing in s is interpolated.
func Escape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case (c == '$' || c == '%') && i+1 < len(s) && s[i+1] == '{':
			b.WriteByte(c)
			b.WriteByte(c)
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\r':
			b.WriteString(`\r`)
		case c == '\t':
			b.WriteString(`\t`)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, `\u%04x`, c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// String is s as a quoted HCL string literal.
func String(s string) string { return `"` + Escape(s) + `"` }

// List is ss as an HCL tuple of string literals.
func List(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = String(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
