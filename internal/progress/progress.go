package progress

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// Interval is the least time between two redraws of the live lines: ten
// a second is smooth to the eye and cheap over a slow link.
const Interval = 100 * time.Millisecond

// Reporter receives plain lines (Write) and tasks (Start) and shows them
// in its mode. It is safe for concurrent use; a nil *Reporter takes
// tasks and shows nothing.
type Reporter struct {
	mu    sync.Mutex
	w     io.Writer
	mode  Mode
	clock func() time.Time
	width func() int // columns; 0 when unknown
	// manual: no ticker goroutine, the tests call tick.
	manual bool

	tasks    []*Task  // running, in the order they started
	drawn    []string // live lines on the screen now
	lastDraw time.Time
	partial  []byte // terminal: the start of a line not yet ended
	midLine  bool   // the last text written did not end its line
	ticking  bool
	stop     chan struct{}
	closed   bool
}

// New is a Reporter writing to w. Auto is resolved with Choose when w is
// an *os.File (TERM from the environment), else it is Plain.
func New(w io.Writer, m Mode) *Reporter {
	r := &Reporter{w: w, clock: time.Now, width: func() int { return 0 }}
	if f, ok := w.(*os.File); ok {
		m = Choose(m, f, os.Getenv("TERM"))
		r.width = func() int { return terminalWidth(f) }
	}
	r.mode = m
	if m == Auto {
		r.mode = Plain
	}
	return r
}

// From is the Reporter w is, else a Plain one writing to w: code that is
// handed an io.Writer reports its tasks through it either way.
func From(w io.Writer) *Reporter {
	if r, ok := w.(*Reporter); ok {
		return r
	}
	if w == nil {
		w = io.Discard
	}
	return New(w, Plain)
}

// SetMode changes the mode before anything was reported: the command line
// knows it only once its flags are parsed. Auto is resolved as New does.
func (r *Reporter) SetMode(m Mode) {
	if f, ok := r.w.(*os.File); ok {
		m = Choose(m, f, os.Getenv("TERM"))
	}
	if m == Auto {
		m = Plain
	}
	r.mu.Lock()
	r.mode = m
	r.mu.Unlock()
}

// Mode is the Reporter's mode, Plain or Terminal.
func (r *Reporter) Mode() Mode {
	if r == nil {
		return Plain
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mode
}

// Write prints plain lines. On a terminal they scroll above the live
// lines, and a line is held until it ends.
func (r *Reporter) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mode != Terminal || (len(r.tasks) == 0 && len(r.drawn) == 0 && len(r.partial) == 0) {
		// Nothing live on the screen: the text goes as it comes.
		if len(p) > 0 {
			r.midLine = p[len(p)-1] != '\n'
		}
		return r.w.Write(p)
	}
	r.partial = append(r.partial, p...)
	i := bytes.LastIndexByte(r.partial, '\n')
	if i < 0 {
		return len(p), nil
	}
	lines := r.partial[:i+1]
	err := r.print(lines)
	r.partial = slices.Clone(r.partial[i+1:])
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close ends the live display: tasks still running are printed as
// stopped, a line not yet ended is printed. It does not close the writer;
// the Reporter prints plain lines afterwards.
func (r *Reporter) Close() error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ticking {
		close(r.stop)
		r.ticking = false
	}
	r.closed = true
	if r.mode != Terminal {
		return nil
	}
	var b bytes.Buffer
	for _, t := range r.tasks {
		t.ended = true
		b.WriteString(r.fit(r.taskLine(t, "stopped: "+t.status())) + "\n")
	}
	r.tasks = nil
	if len(r.partial) > 0 {
		b.Write(r.partial)
		b.WriteString("\n")
		r.partial = nil
	}
	r.mode = Plain // what follows is plain lines, written as they come
	return r.printTerminal(b.Bytes(), true)
}

// print writes plain lines on a terminal: the live lines erased, the
// lines, the live lines drawn again unless they were drawn less than an
// Interval ago (the ticker draws them then).
func (r *Reporter) print(lines []byte) error {
	return r.printTerminal(lines, false)
}

func (r *Reporter) printTerminal(lines []byte, final bool) error {
	var b bytes.Buffer
	b.WriteString(r.erase())
	if len(lines) > 0 {
		b.Write(lines)
		r.midLine = false
	}
	now := r.clock()
	if !final && now.Sub(r.lastDraw) >= Interval {
		r.draw(&b, now)
	}
	_, err := r.w.Write(b.Bytes())
	return err
}

// erase is what moves the cursor up over the live lines and clears them.
func (r *Reporter) erase() string {
	n := len(r.drawn)
	r.drawn = nil
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("\x1b[%dA\r\x1b[J", n)
}

// draw appends the live lines, one per running task, to b.
func (r *Reporter) draw(b *bytes.Buffer, now time.Time) {
	r.drawn = r.render()
	if r.midLine && len(r.drawn) > 0 {
		b.WriteString("\n")
		r.midLine = false
	}
	for _, l := range r.drawn {
		b.WriteString(l)
		b.WriteString("\n")
	}
	r.lastDraw = now
}

// render is the live lines as they should be now.
func (r *Reporter) render() []string {
	var lines []string
	for _, t := range r.tasks {
		lines = append(lines, r.fit(r.taskLine(t, t.status())))
	}
	return lines
}

// tick redraws the live lines if they changed (a phase, a count, the
// elapsed seconds). It reports whether the ticker should keep running.
func (r *Reporter) tick() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.mode != Terminal {
		return false
	}
	lines := r.render()
	// A plain line may have drawn them just now; the tenth of an Interval
	// spared is the ticker's own jitter.
	recent := r.clock().Sub(r.lastDraw) < Interval*9/10
	if !slices.Equal(lines, r.drawn) && !recent {
		var b bytes.Buffer
		b.WriteString(r.erase())
		r.draw(&b, r.clock())
		_, _ = r.w.Write(b.Bytes())
	}
	if len(r.tasks) == 0 {
		r.ticking = false
		return false
	}
	return true
}

func (r *Reporter) startTicker() {
	if r.manual || r.ticking || r.closed {
		return
	}
	r.ticking = true
	r.stop = make(chan struct{})
	go func(stop <-chan struct{}) {
		t := time.NewTicker(Interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if !r.tick() {
					return
				}
			}
		}
	}(r.stop)
}

// taskLine is a task's line: name, elapsed time, what it does.
func (r *Reporter) taskLine(t *Task, status string) string {
	w := 12
	for _, o := range r.tasks {
		w = max(w, len(o.name))
	}
	w = min(w, 32)
	return strings.TrimRight(fmt.Sprintf("  %-*s %7s  %s", w, t.name, Elapsed(r.clock().Sub(t.start)), status), " ")
}

// fit cuts a line to the terminal's width: a line that wraps would take
// two rows, and erase would leave one behind.
func (r *Reporter) fit(s string) string {
	w := r.width()
	if w <= 0 {
		w = 80
	}
	rs := []rune(s)
	if len(rs) < w {
		return s
	}
	return string(rs[:w-2]) + "…"
}

// Elapsed is a duration as a person reads it: 7s, 1m05s, 2h03m.
func Elapsed(d time.Duration) string {
	s := int(d / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	default:
		return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
	}
}

// Task is one piece of long work: a build, a machine, a step. A nil
// *Task does nothing.
type Task struct {
	r            *Reporter
	name         string
	phase        string
	count, total int
	start        time.Time
	ended        bool
}

// Start begins a task named name (the line's first column) doing phase.
func (r *Reporter) Start(name, phase string) *Task {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	t := &Task{r: r, name: name, phase: phase, start: r.clock()}
	if r.mode == Terminal {
		r.tasks = append(r.tasks, t)
		r.startTicker()
	}
	return t
}

// Live says whether anyone sees the task's phase and counts (a terminal),
// so that work done only to feed them can be skipped.
func (t *Task) Live() bool {
	if t == nil {
		return false
	}
	t.r.mu.Lock()
	defer t.r.mu.Unlock()
	return t.r.mode == Terminal && !t.ended
}

// Phase says what the task does now. Only the live line shows it: plain
// output has the caller's own lines.
func (t *Task) Phase(format string, args ...any) {
	if t == nil {
		return
	}
	s := format
	if len(args) > 0 {
		s = fmt.Sprintf(format, args...)
	}
	t.r.mu.Lock()
	t.phase = firstLine(s)
	t.r.mu.Unlock()
}

// Count says how many units of the phase are done (packages compiled)
// out of total; a total of 0 is not known yet.
func (t *Task) Count(n, total int) {
	if t == nil {
		return
	}
	t.r.mu.Lock()
	t.count, t.total = n, total
	t.r.mu.Unlock()
}

// Done ends the task. line, unless empty, is printed as a plain line in
// every mode (the line the caller printed before tasks existed); on a
// terminal an empty line prints the task's own final line.
func (t *Task) Done(line string) {
	if t == nil {
		return
	}
	r := t.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if t.ended && r.mode == Terminal {
		return
	}
	if t.ended && line == "" {
		return
	}
	if r.mode != Terminal {
		t.ended = true
		if line != "" {
			_, _ = io.WriteString(r.w, line+"\n")
		}
		return
	}
	if line == "" {
		line = r.fit(r.taskLine(t, "done"))
	}
	r.end(t, line)
}

// Fail ends the task as failed. Plain output prints nothing (the error is
// the caller's to report); a terminal prints the task's final line.
func (t *Task) Fail(err error) {
	if t == nil {
		return
	}
	r := t.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if t.ended || r.mode != Terminal {
		t.ended = true
		return
	}
	msg := "failed"
	if t.phase != "" {
		msg += " while " + t.phase
	}
	if err != nil {
		msg += ": " + firstLine(err.Error())
	}
	r.end(t, r.fit(r.taskLine(t, msg)))
}

// end removes a running task from the live lines and prints its final
// line in their place.
func (r *Reporter) end(t *Task, line string) {
	t.ended = true
	r.tasks = slices.DeleteFunc(r.tasks, func(o *Task) bool { return o == t })
	_ = r.print([]byte(line + "\n"))
}

// status is the task's phase and count, as its line shows them.
func (t *Task) status() string {
	s := t.phase
	switch {
	case t.total > 0:
		s += fmt.Sprintf(" %d/%d", t.count, t.total)
	case t.count > 0:
		s += fmt.Sprintf(" %d", t.count)
	}
	return strings.TrimSpace(s)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
