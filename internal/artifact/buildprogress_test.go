package artifact

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/progress"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A real `go build -v` of a small module: the live line counts the
// packages compiled (the module's own, which live in a new directory and
// so are not in the build cache) out of those go list finds.
func TestCountPackagesShowsCompiledOutOfTotal(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"go.mod":  "module example.com/tiny\n\ngo 1.26\n",
		"main.go": "package main\n\nimport \"example.com/tiny/p0\"\n\nfunc main() { println(p0.F()) }\n",
	}
	for i := range 5 {
		imp, call := "", "1"
		if i < 4 {
			imp, call = fmt.Sprintf("import \"example.com/tiny/p%d\"\n\n", i+1), fmt.Sprintf("p%d.F() + 1", i+1)
		}
		files[fmt.Sprintf("p%d/p.go", i)] = fmt.Sprintf("package p%d\n\n%sfunc F() int { return %s }\n", i, imp, call)
	}
	for name, text := range files {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	env := []string{"CGO_ENABLED=0"}
	g := newGoTool("")
	ctx := context.Background()

	var out lockedBuffer
	rep := progress.New(&out, progress.Terminal)
	task := rep.Start("tiny 1.0.0", "compiling packages")
	counter := &lineCounter{}
	stop := countPackages(ctx, g, dir, env, nil, task, counter)
	cmd := g.command(ctx, dir, env, "build", "-v", "-o", filepath.Join(t.TempDir(), "tiny"), ".")
	cmd.Stdout, cmd.Stderr = counter, counter
	if err := cmd.Run(); err != nil {
		t.Fatalf("go build: %v", err)
	}
	stop()
	// A plain line an Interval after the last draw draws the live lines
	// at once: the last one shows the final count.
	time.Sleep(2 * progress.Interval)
	fmt.Fprintln(rep, "built")
	task.Done("")
	rep.Close()

	cmdList := exec.Command("go", "list", "-deps", ".")
	cmdList.Dir = dir
	listed, err := cmdList.Output()
	if err != nil {
		t.Fatal(err)
	}
	total := strings.Count(string(listed), "\n")
	ms := regexp.MustCompile(`tiny 1\.0\.0 +\d+s  compiling packages (\d+)/(\d+)\n`).FindAllStringSubmatch(out.String(), -1)
	if len(ms) == 0 {
		t.Fatalf("no live line with packages out of the total:\n%q", out.String())
	}
	last := ms[len(ms)-1]
	n, _ := strconv.Atoi(last[1])
	if last[2] != strconv.Itoa(total) || n < 6 || n > total || n != min(counter.count(), total) {
		t.Errorf("last live line says %s/%s packages; go list finds %d, go build -v printed %d", last[1], last[2], total, counter.count())
	}
}
