package artifact

import (
	"bytes"
	"context"
	"strings"
	"sync/atomic"

	"github.com/steppe/steppe/internal/progress"
)

// countPackages shows a compile's progress on its task: the packages
// `go build -v` has compiled (the counter's lines) out of the packages
// `go list -deps` finds, which runs alongside the build. Packages the Go
// build cache holds are not compiled, so a warm build ends short of the
// total. stop ends the go list if it still runs.
func countPackages(ctx context.Context, g *goTool, dir string, env, tags []string, t *progress.Task, counter *lineCounter) (stop func()) {
	var total atomic.Int64
	show := func(n int) {
		all := int(total.Load())
		if all > 0 {
			n = min(n, all)
		}
		t.Count(n, all)
	}
	counter.mu.Lock()
	counter.onCount = show
	counter.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		cmd := g.command(ctx, dir, env, "list", "-e", "-deps", "-tags", strings.Join(tags, ","), ".")
		out, err := cmd.Output()
		if err != nil {
			return // no total: the line shows the count alone
		}
		total.Store(int64(bytes.Count(out, []byte{'\n'})))
		show(counter.count())
	}()
	return func() {
		cancel()
		<-done
	}
}
