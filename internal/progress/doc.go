// Package progress shows the operator's long work as it happens: plain
// lines for logs, pipes and scripts, or on a terminal one live line per
// task (a build, a machine, a step) redrawn in place above which the
// plain lines scroll.
//
// Code reports to a *Reporter: plain lines through its io.Writer, and
// tasks through Start, Phase, Count, Done and Fail. In Plain mode a task
// prints only the line its Done is given, so plain output stays what
// scripts parse; in Terminal mode the live lines are redrawn at most ten
// times a second and every task ends as a plain line in the scrollback.
package progress
