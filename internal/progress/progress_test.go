package progress

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is the renderer's clock in tests: timing of redraws is output
// formatting, and a test must not depend on how fast the machine is.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// syncBuffer is a bytes.Buffer safe for the ticker goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (s *syncBuffer) take() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.b.String()
	s.b.Reset()
	return out
}

func testReporter(m Mode, width int) (*Reporter, *syncBuffer, *fakeClock) {
	out := &syncBuffer{}
	clk := &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	r := New(out, m)
	r.clock = clk.now
	r.width = func() int { return width }
	r.manual = true
	return r, out, clk
}

// screen plays what a Reporter wrote the way a terminal shows it, for
// the sequences the renderer uses: text, newline, carriage return,
// cursor up (ESC [ n A) and clear to the end of the screen (ESC [ J).
func screen(t *testing.T, out string) []string {
	t.Helper()
	var lines []string
	row, col := 0, 0
	put := func(s string) {
		for len(lines) <= row {
			lines = append(lines, "")
		}
		l := []rune(lines[row])
		for len(l) < col {
			l = append(l, ' ')
		}
		rs := []rune(s)
		l = append(l[:col], append(rs, l[min(len(l), col+len(rs)):]...)...)
		lines[row] = string(l)
		col += len(rs)
	}
	csi := regexp.MustCompile(`^\x1b\[(\d*)([A-Za-z])`)
	for len(out) > 0 {
		switch out[0] {
		case '\n':
			row, col = row+1, 0
			out = out[1:]
		case '\r':
			col = 0
			out = out[1:]
		case 0x1b:
			m := csi.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("unknown escape sequence at %q", out[:min(len(out), 10)])
			}
			n, _ := strconv.Atoi(m[1])
			switch m[2] {
			case "A":
				row = max(0, row-n)
			case "J":
				if row < len(lines) {
					lines[row] = string([]rune(lines[row])[:min(col, len([]rune(lines[row])))])
					lines = lines[:row+1]
					if col == 0 {
						lines = lines[:row]
					}
				}
			default:
				t.Fatalf("renderer used ESC [ %s, which the test terminal does not know", m[2])
			}
			out = out[len(m[0]):]
		default:
			i := strings.IndexAny(out, "\n\r\x1b")
			if i < 0 {
				i = len(out)
			}
			put(out[:i])
			out = out[i:]
		}
	}
	return lines
}

func TestPlainIsTodaysLines(t *testing.T) {
	r, out, clk := testReporter(Plain, 80)
	fmt.Fprintf(r, "==> machines\n")
	a := r.Start("nomad-server-1", "creating")
	a.Phase("waiting for release %d", 3)
	a.Count(2, 5)
	clk.add(3 * time.Second)
	if a.Live() {
		t.Error("a task on plain output says it is live")
	}
	fmt.Fprintf(r, "    partial ")
	fmt.Fprintf(r, "line\n")
	a.Done("    nomad-server-1           release 3 healthy: consul, nomad")
	b := r.Start("nomad-client-1", "draining")
	b.Fail(errors.New("drain timed out"))
	c := r.Start("consul 1.14.11", "")
	c.Done("")
	if r.tick() {
		t.Error("the ticker would run on plain output")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	want := "==> machines\n    partial line\n    nomad-server-1           release 3 healthy: consul, nomad\n"
	if got := out.String(); got != want {
		t.Errorf("plain output:\n%q\nwant\n%q", got, want)
	}
}

func TestTerminalRedrawsInPlace(t *testing.T) {
	r, out, clk := testReporter(Terminal, 80)
	fmt.Fprintf(r, "steppe up: cluster c\n")
	a := r.Start("nomad-server-1", "waiting for release 1")
	b := r.Start("nomad-client-1", "waiting for release 1")
	if !a.Live() {
		t.Error("a task on a terminal says it is not live")
	}
	if got := out.take(); got != "steppe up: cluster c\n" {
		t.Errorf("before the first tick: %q", got)
	}
	r.tick()
	got := out.take()
	wantLines := "  nomad-server-1      0s  waiting for release 1\n  nomad-client-1      0s  waiting for release 1\n"
	if got != wantLines {
		t.Errorf("first draw:\n%q\nwant\n%q", got, wantLines)
	}

	// Updates between ticks are drawn once, by the next tick.
	clk.add(1500 * time.Millisecond)
	a.Phase("service nomad is starting, not ready")
	b.Count(3, 10)
	b.Phase("compiling packages")
	if got := out.take(); got != "" {
		t.Errorf("an update wrote before the tick: %q", got)
	}
	r.tick()
	got = out.take()
	want := "\x1b[2A\r\x1b[J  nomad-server-1      1s  service nomad is starting, not ready\n  nomad-client-1      1s  compiling packages 3/10\n"
	if got != want {
		t.Errorf("redraw:\n%q\nwant\n%q", got, want)
	}
	r.tick()
	if got := out.take(); got != "" {
		t.Errorf("a tick with nothing changed wrote %q", got)
	}

	// A plain line within an Interval of the last draw erases the live
	// lines and leaves them to the next tick.
	clk.add(50 * time.Millisecond)
	fmt.Fprintf(r, "    nomad-server-1  bundle version 1 published (signed)\n")
	got = out.take()
	if want := "\x1b[2A\r\x1b[J    nomad-server-1  bundle version 1 published (signed)\n"; got != want {
		t.Errorf("plain line:\n%q\nwant\n%q", got, want)
	}
	clk.add(100 * time.Millisecond)
	r.tick()
	if got := out.take(); !strings.HasPrefix(got, "  nomad-server-1") || strings.Count(got, "\n") != 2 {
		t.Errorf("tick after a plain line: %q", got)
	}
	// A plain line after an Interval redraws at once; a partial line
	// waits for its end.
	clk.add(time.Second)
	fmt.Fprintf(r, "    half ")
	if got := out.take(); got != "" {
		t.Errorf("a line not ended was written: %q", got)
	}
	fmt.Fprintf(r, "a line\n")
	got = out.take()
	if !strings.HasPrefix(got, "\x1b[2A\r\x1b[J    half a line\n  nomad-server-1      2s") {
		t.Errorf("plain line after an Interval:\n%q", got)
	}

	clk.add(65 * time.Second)
	a.Done("    nomad-server-1           release 1 healthy: consul, nomad")
	b.Fail(errors.New("machine nomad-client-1 did not become healthy\nlogs..."))
	c := r.Start("consul 1.14.11", "publishing")
	clk.add(200 * time.Millisecond)
	r.tick()
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(r, "after close\n")
	c.Done("    consul done after close")

	// The screen, as a person scrolls back over it: every plain line,
	// one final line per task, no live line left behind.
	all := screen(t, "steppe up: cluster c\n"+wantLines+want+"\x1b[2A\r\x1b[J    nomad-server-1  bundle version 1 published (signed)\n"+
		"  nomad-server-1      1s  service nomad is starting, not ready\n  nomad-client-1      1s  compiling packages 3/10\n"+got+out.String())
	wantScreen := []string{
		"steppe up: cluster c",
		"    nomad-server-1  bundle version 1 published (signed)",
		"    half a line",
		"    nomad-server-1           release 1 healthy: consul, nomad",
		"  nomad-client-1   1m07s  failed while compiling packages: machine nomad-clien…", // cut to 80 columns
		"  consul 1.14.11      0s  stopped: publishing",
		"after close",
		"    consul done after close",
	}
	if strings.Join(all, "\n") != strings.Join(wantScreen, "\n") {
		t.Errorf("screen:\n%s\nwant\n%s", strings.Join(all, "\n"), strings.Join(wantScreen, "\n"))
	}
}

// A plain line that drew the live lines leaves the next tick nothing to
// draw within an Interval, whatever changed: at most ten draws a second.
func TestTerminalTickAfterAPlainLineWaits(t *testing.T) {
	r, out, clk := testReporter(Terminal, 80)
	a := r.Start("nomad-server-1", "waiting")
	clk.add(time.Second)
	fmt.Fprintf(r, "a line\n") // draws: the last draw was a second ago
	if got := out.take(); !strings.HasSuffix(got, "a line\n  nomad-server-1      1s  waiting\n") {
		t.Fatalf("a plain line did not draw the live lines: %q", got)
	}
	a.Phase("still waiting")
	clk.add(Interval / 2)
	r.tick()
	if got := out.take(); got != "" {
		t.Errorf("a tick half an Interval after a draw drew again: %q", got)
	}
	clk.add(Interval / 2)
	r.tick()
	if got := out.take(); !strings.Contains(got, "still waiting") {
		t.Errorf("the tick an Interval after the draw did not draw: %q", got)
	}
}

// With no task running a terminal gets the text as it comes, a line not
// ended included; a task's live line then starts on a line of its own.
func TestTerminalIdlePassesTextThrough(t *testing.T) {
	r, out, _ := testReporter(Terminal, 80)
	fmt.Fprintf(r, "export A=1\nprompt> ")
	if got := out.take(); got != "export A=1\nprompt> " {
		t.Errorf("idle terminal wrote %q", got)
	}
	r.Start("consul 1.14.11", "publishing")
	r.tick()
	if got, want := out.take(), "\n  consul 1.14.11      0s  publishing\n"; got != want {
		t.Errorf("first draw after a line not ended: %q, want %q", got, want)
	}
}

func TestTerminalFitsTheWidth(t *testing.T) {
	r, out, _ := testReporter(Terminal, 30)
	r.Start("a-machine-with-a-long-name", "waiting for a very long time indeed")
	r.tick()
	for _, l := range strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n") {
		if n := len([]rune(l)); n >= 30 {
			t.Errorf("line %q is %d columns on a 30-column terminal: it would wrap", l, n)
		}
		if !strings.HasSuffix(l, "…") {
			t.Errorf("line %q was cut without saying so", l)
		}
	}
}

func TestTerminalDoneWithoutLinePrintsItsOwn(t *testing.T) {
	r, out, clk := testReporter(Terminal, 80)
	b := r.Start("consul 1.14.11", "publishing")
	clk.add(4200 * time.Millisecond)
	b.Done("")
	b.Done("") // a second end prints nothing more
	if got, want := out.String(), "  consul 1.14.11      4s  done\n"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if r.tick() {
		t.Error("the ticker keeps running with no task")
	}
}

// The real ticker, with the real clock: however often a task changes,
// the live lines are drawn at most once an Interval.
func TestTickerRedrawsAtMostTenTimesASecond(t *testing.T) {
	out := &syncBuffer{}
	r := New(out, Terminal)
	task := r.Start("nomad 1.9.3", "compiling packages")
	start := time.Now()
	for i := 0; time.Since(start) < 600*time.Millisecond; i++ {
		task.Count(i, 0)
		time.Sleep(2 * time.Millisecond)
	}
	task.Done("")
	took := time.Since(start)
	r.Close()
	draws := strings.Count(out.String(), "compiling packages")
	if limit := int(took/Interval) + 1; draws > limit || draws < 2 {
		t.Errorf("%d draws in %s; want between 2 and %d", draws, took, limit)
	}
	if !strings.HasSuffix(out.String(), "  nomad 1.9.3       0s  done\n") {
		t.Errorf("output does not end with the task's final line: %q", out.String())
	}
}

func TestElapsed(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0s", 999 * time.Millisecond: "0s", 59 * time.Second: "59s", 65 * time.Second: "1m05s",
		59*time.Minute + 59*time.Second: "59m59s", 2*time.Hour + 3*time.Minute + 9*time.Second: "2h03m",
	} {
		if got := Elapsed(d); got != want {
			t.Errorf("Elapsed(%s) = %q, want %q", d, got, want)
		}
	}
}

func TestModes(t *testing.T) {
	for s, want := range map[string]Mode{"": Auto, "auto": Auto, "plain": Plain, "tty": Terminal} {
		if m, err := ParseMode(s); err != nil || m != want {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", s, m, err, want)
		}
	}
	if _, err := ParseMode("fancy"); err == nil || !strings.Contains(err.Error(), "auto, plain or tty") {
		t.Errorf("ParseMode(fancy): %v", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	if IsTerminal(pw) {
		t.Error("a pipe is a terminal")
	}
	if m := Choose(Auto, pw, "xterm"); m != Plain {
		t.Errorf("Choose(auto, pipe) = %v", m)
	}
	if m := Choose(Plain, pw, "xterm"); m != Plain {
		t.Errorf("Choose(plain, pipe) = %v", m)
	}
	if m := Choose(Terminal, pw, "dumb"); m != Terminal {
		t.Errorf("Choose(tty) = %v: a forced mode is kept", m)
	}
	if New(pw, Auto).Mode() != Plain {
		t.Error("New(pipe, Auto) is not plain")
	}

	var buf bytes.Buffer
	if r := From(&buf); r.Mode() != Plain {
		t.Error("From(buffer) is not plain")
	}
	r := New(&buf, Terminal)
	if From(r) != r {
		t.Error("From(reporter) is another reporter")
	}
	var nilR *Reporter
	nilR.Start("x", "y").Done("z") // a nil Reporter takes tasks and shows nothing
}
