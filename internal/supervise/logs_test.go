package supervise

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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

// A follower gets every line once, in order, across calls; learns how many
// it missed when it fell behind (lines that left the in-memory tail, or
// that the tail never held because they came in a burst past its size);
// and is told when its cursor belongs to a log opened before.
func TestFollowLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "svc.log")
	l, err := openLog(path, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	child, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer child.Close()
	write := func(from, to int, pad string) {
		t.Helper()
		var b strings.Builder
		for i := from; i < to; i++ {
			fmt.Fprintf(&b, "x%d%s\n", i, pad)
		}
		if _, err := child.WriteString(b.String()); err != nil {
			t.Fatal(err)
		}
	}
	follow := func(cursor string, n int) LogChunk {
		t.Helper()
		c, err := l.follow(cursor, n)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	want := func(c LogChunk, from, to int) {
		t.Helper()
		if len(c.Lines) != to-from {
			t.Fatalf("%d lines, want x%d to x%d: %q", len(c.Lines), from, to-1, c.Lines)
		}
		for i, line := range c.Lines {
			if n, _, _ := strings.Cut(line, "."); n != fmt.Sprintf("x%d", from+i) {
				t.Fatalf("line %d is %q, want x%d", i, line, from+i)
			}
		}
	}

	write(0, 10, "")
	c := follow("", 3)
	want(c, 7, 10)
	if c.File != path {
		t.Fatalf("the chunk names the file %q", c.File)
	}
	// Small steps: each line once, in order, then nothing new.
	for k := 10; k < 100; k += 9 {
		write(k, k+9, "")
		c = follow(c.Cursor, 3)
		want(c, k, k+9)
		if c.Skipped != 0 || c.Reopened {
			t.Fatalf("chunk %+v", c)
		}
	}
	if c = follow(c.Cursor, 3); len(c.Lines) != 0 {
		t.Fatalf("nothing was written, follow returned %q", c.Lines)
	}
	// Behind by more than the tail's line count.
	write(100, 100+tailLines+50, "")
	c = follow(c.Cursor, 3)
	if c.Skipped != 50 {
		t.Fatalf("skipped %d, want 50", c.Skipped)
	}
	want(c, 150, 100+tailLines+50)
	// A burst past the tail's byte size: the lines the tail never held
	// are counted too.
	next := 100 + tailLines + 50
	pad := "." + strings.Repeat("p", 1000)
	write(next, next+200, pad)
	c = follow(c.Cursor, 3)
	kept := len(c.Lines)
	if kept == 0 || kept >= 200 || c.Skipped != uint64(200-kept) {
		t.Fatalf("a burst of 200 long lines: %d returned, %d skipped", kept, c.Skipped)
	}
	want(c, next+200-kept, next+200)

	// The log reopened (agent restart): the old cursor is told so and
	// follows from the end.
	old := c.Cursor
	l.close()
	time.Sleep(time.Millisecond) // another opening time, another id
	if l, err = openLog(path, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer l.close()
	// The tail rebuilt from the file's last bytes does not start with the
	// end of a line cut there.
	if len(l.lines) == 0 || !strings.HasPrefix(l.lines[0], "x") {
		t.Fatalf("the tail rebuilt at open starts with %.20q", l.lines)
	}
	c = follow(old, 3)
	if !c.Reopened || len(c.Lines) != 0 {
		t.Fatalf("after a reopen: %+v", c)
	}
	write(1000, 1002, "")
	want(follow(c.Cursor, 3), 1000, 1002)

	for _, bad := range []string{"nocolon", l.id + ":x", l.id + ":-1"} {
		if _, err := l.follow(bad, 3); err == nil || !strings.Contains(err.Error(), "bad log cursor") {
			t.Errorf("cursor %q: %v", bad, err)
		}
	}
}
