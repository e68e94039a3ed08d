package supervise

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The in-memory tail keeps at most this many lines and bytes per service.
const (
	tailLines = 256
	tailBytes = 64 << 10
)

// logFile is one service's log: the file the child writes to directly
// (stdout and stderr are an O_APPEND descriptor of it, never a pipe to the
// agent, so a killed agent cannot break a daemon's stdout with SIGPIPE), and
// an in-memory tail the agent keeps by following the file.
//
// Rotation is copy-then-truncate: the file is copied to path.1 (older copies
// shifted up to path.LogKeep) and truncated to zero; thanks to O_APPEND the
// child's next write lands at the new end. Whatever the child writes between
// the copy and the truncate is lost: a window of one file copy, at most
// LogMaxBytes plus what arrived since the last check (checked every second).
type logFile struct {
	path string
	max  int64
	keep int

	mu      sync.Mutex
	w       *os.File // O_APPEND, shared with children and used for agent lines
	off     int64    // how far the tail has read the file
	partial []byte   // a line not yet ended
	lines   []string // the tail, oldest first
	size    int      // bytes in lines
	// pushed counts the lines that entered the tail since the log was
	// opened, and id tells this log from the one before it (an agent
	// restart, a service replaced): together they are a follower's cursor.
	pushed uint64
	id     string
	cut    bool // the tail skipped ahead to the middle of a line
}

func openLog(path string, maxSize int64, keep int) (*logFile, error) {
	w, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	l := &logFile{path: path, max: maxSize, keep: keep, w: w, id: strconv.FormatInt(time.Now().UnixNano(), 36)}
	// Rebuild the tail from the end of the file (after an agent restart).
	if st, err := w.Stat(); err == nil {
		start := max(0, st.Size()-tailBytes)
		l.off, l.cut = start, start > 0 // the first line is likely cut
		l.catchUp()
	}
	return l, nil
}

func (l *logFile) setLimits(max int64, keep int) {
	l.mu.Lock()
	l.max, l.keep = max, keep
	l.mu.Unlock()
}

// agentf writes a line of the agent's own into the service log.
func (l *logFile) agentf(format string, a ...any) {
	line := fmt.Sprintf("%s steppe: %s\n", time.Now().UTC().Format(time.RFC3339Nano), fmt.Sprintf(format, a...))
	l.mu.Lock()
	defer l.mu.Unlock()
	_, _ = l.w.WriteString(line)
}

// catchUp reads what was appended since the last call. Caller holds l.mu.
func (l *logFile) catchUp() {
	// Most calls (one a second per service) find nothing new: tell that
	// from the size of the file through the descriptor already open,
	// without opening and allocating anything.
	var ws unix.Stat_t
	if unix.Fstat(int(l.w.Fd()), &ws) == nil && ws.Size == l.off {
		return
	}
	f, err := os.Open(l.path)
	if err != nil {
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return
	}
	if st.Size() < l.off { // truncated behind our back
		l.off, l.partial, l.cut = 0, nil, false
	}
	if st.Size()-l.off > tailBytes { // skip what the tail would drop anyway
		to := st.Size() - tailBytes
		// Count the lines skipped, so that a follower's cursor still
		// tells how many it missed, and empty the tail: it must stay the
		// last len(lines) lines counted.
		n, atLineStart := countLines(f, l.off, to)
		l.pushed += n
		l.off, l.partial, l.cut = to, nil, !atLineStart
		clear(l.lines)
		l.lines, l.size = l.lines[:0], 0
	}
	buf := make([]byte, st.Size()-l.off)
	n, _ := f.ReadAt(buf, l.off)
	l.off += int64(n)
	data := append(l.partial, buf[:n]...)
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		if l.cut { // the end of a line skipped: counted, not kept
			l.pushed++
			l.cut = false
		} else {
			l.push(string(data[:i]))
		}
		data = data[i+1:]
	}
	l.partial = append([]byte(nil), data...)
}

// countLines counts the line ends in f between from and to, and tells
// whether to is the start of a line.
func countLines(f *os.File, from, to int64) (n uint64, atLineStart bool) {
	buf := make([]byte, min(32<<10, to-from))
	for from < to {
		k, err := f.ReadAt(buf[:min(int64(len(buf)), to-from)], from)
		n += uint64(bytes.Count(buf[:k], []byte{'\n'}))
		from += int64(k)
		atLineStart = k > 0 && buf[k-1] == '\n'
		if err != nil {
			break
		}
	}
	return n, atLineStart
}

func (l *logFile) push(line string) {
	l.pushed++
	l.lines = append(l.lines, line)
	l.size += len(line)
	for len(l.lines) > tailLines || l.size > tailBytes {
		l.size -= len(l.lines[0])
		l.lines[0] = ""
		l.lines = l.lines[1:]
	}
	if cap(l.lines) > 4*tailLines { // do not let the backing array grow forever
		l.lines = append([]string(nil), l.lines...)
	}
}

// tick follows the file and rotates it when it grew past max.
func (l *logFile) tick() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.catchUp()
	if l.max <= 0 || l.off <= l.max {
		return nil
	}
	return l.rotate()
}

func (l *logFile) rotate() error {
	if l.keep > 0 {
		_ = os.Remove(l.path + "." + strconv.Itoa(l.keep))
		for i := l.keep - 1; i >= 1; i-- {
			_ = os.Rename(l.path+"."+strconv.Itoa(i), l.path+"."+strconv.Itoa(i+1))
		}
		if err := copyFile(l.path, l.path+".1"); err != nil {
			return fmt.Errorf("rotate %s: %w", l.path, err)
		}
	}
	if err := os.Truncate(l.path, 0); err != nil {
		return fmt.Errorf("rotate %s: %w", l.path, err)
	}
	l.off, l.partial, l.cut = 0, nil, false
	return nil
}

func copyFile(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}

// tail returns the last n lines. Beyond the in-memory tail it reads the
// files, rotated ones included.
func (l *logFile) tail(n int) ([]string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.catchUp()
	return l.tailLocked(n)
}

func (l *logFile) tailLocked(n int) ([]string, error) {
	if n <= 0 {
		return nil, nil
	}
	if n <= len(l.lines) {
		return append([]string(nil), l.lines[len(l.lines)-n:]...), nil
	}
	var out []string
	for i := 0; i <= l.keep && len(out) < n; i++ {
		p := l.path
		if i > 0 {
			p += "." + strconv.Itoa(i)
		}
		data, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		data = bytes.TrimSuffix(data, []byte("\n"))
		if len(data) == 0 {
			continue
		}
		ls := bytes.Split(data, []byte("\n"))
		k := max(0, len(ls)-(n-len(out)))
		chunk := make([]string, 0, len(ls)-k)
		for _, b := range ls[k:] {
			chunk = append(chunk, string(b))
		}
		out = append(chunk, out...)
	}
	return out, nil
}

// LogChunk is one step of following a service's log.
type LogChunk struct {
	Lines []string `json:"lines"`
	// Cursor asks, in the next call, for the lines after these.
	Cursor string `json:"cursor"`
	// Skipped counts lines that left the in-memory tail before they could
	// be returned (written faster than the follower asked); File still
	// has them (or its rotated copies).
	Skipped uint64 `json:"skipped,omitempty"`
	File    string `json:"file"`
	// Reopened says the cursor belongs to a log opened before this one (the
	// agent restarted, or the service was replaced): lines written in
	// between may be missing, and following goes on from the end.
	Reopened bool `json:"reopened,omitempty"`
}

// follow returns what came after cursor; with no cursor, the last n lines
// as tail does.
func (l *logFile) follow(cursor string, n int) (LogChunk, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.catchUp()
	var c LogChunk
	if cursor == "" {
		lines, err := l.tailLocked(n)
		if err != nil {
			return LogChunk{}, err
		}
		c.Lines = lines
	} else {
		id, pos, ok := strings.Cut(cursor, ":")
		from, err := strconv.ParseUint(pos, 10, 64)
		if !ok || err != nil {
			return LogChunk{}, fmt.Errorf("bad log cursor %q", cursor)
		}
		first := l.pushed - uint64(len(l.lines))
		switch {
		case id != l.id || from > l.pushed:
			c.Reopened = true
			from = l.pushed
		case from < first:
			c.Skipped = first - from
			from = first
		}
		c.Lines = append([]string(nil), l.lines[from-first:]...)
	}
	c.Cursor = l.id + ":" + strconv.FormatUint(l.pushed, 10)
	c.File = l.path
	return c, nil
}

func (l *logFile) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w.Close()
}
