package supervise

import (
	"os"
	"path/filepath"
	"testing"
)

// The agent follows every service's log once a second: when nothing was
// written, that must cost nothing on the heap (an idle agent would
// otherwise grow its heap by the minute), and what is written later still
// reaches the tail.
func TestLogTickIdleAllocatesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "svc.log")
	l, err := openLog(path, 1<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	l.agentf("first %d", 1)
	if err := l.tick(); err != nil {
		t.Fatal(err)
	}
	if allocs := testing.AllocsPerRun(100, func() { _ = l.tick() }); allocs != 0 {
		t.Fatalf("an idle tick allocates %.1f times, want 0", allocs)
	}
	// A child writes through its own descriptor of the file.
	child, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := child.WriteString("from the child\n"); err != nil {
		t.Fatal(err)
	}
	child.Close()
	if err := l.tick(); err != nil {
		t.Fatal(err)
	}
	lines, err := l.tail(2)
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 2 || lines[1] != "from the child" {
		t.Fatalf("tail = %q", lines)
	}
}
