package agent

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/supervise"
)

// countingListener counts the connections the server has not closed yet.
type countingListener struct {
	net.Listener
	open *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.open.Add(1)
	return &countedConn{Conn: c, open: l.open}, nil
}

type countedConn struct {
	net.Conn
	open   *atomic.Int64
	closed atomic.Bool
}

func (c *countedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.open.Add(-1)
	}
	return c.Conn.Close()
}

// failingListener fails its first fail calls of Accept, as a listener out of
// descriptors (EMFILE) does; the error is injected because running the test
// process out of descriptors would break the test itself. The server must
// go on accepting afterwards.
type failingListener struct {
	net.Listener
	fail int
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.fail > 0 {
		l.fail--
		return nil, fmt.Errorf("accept: %w", syscall.EMFILE)
	}
	return l.Listener.Accept()
}

// recordingControl stands in for the supervisor: it counts restarts and
// answers logs for "web" only.
type recordingControl struct {
	restarts atomic.Int64
}

func (r *recordingControl) Restart(ctx context.Context, name string) error {
	// Like the supervisor, the operation is handed over only if ctx is
	// still alive when the service's loop takes it, a moment later.
	time.Sleep(time.Millisecond)
	if err := ctx.Err(); err != nil {
		return err
	}
	r.restarts.Add(1)
	return nil
}
func (r *recordingControl) Start(context.Context, string) error  { return nil }
func (r *recordingControl) Stop(context.Context, string) error   { return nil }
func (r *recordingControl) Reload(context.Context, string) error { return nil }
func (r *recordingControl) Logs(name string, n int) ([]string, error) {
	if name != "web" {
		return nil, fmt.Errorf("no service %q", name)
	}
	return []string{fmt.Sprintf("%d lines of web", n)}, nil
}
func (r *recordingControl) FollowLogs(name, cursor string, n int) (supervise.LogChunk, error) {
	lines, err := r.Logs(name, n)
	return supervise.LogChunk{Lines: lines, Cursor: cursor + "+"}, err
}

// startAPI serves api on a real socket in a temp dir and returns the socket
// and the count of connections still open in the server.
func startAPI(t *testing.T, api *apiServer) (string, *atomic.Int64) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := listenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	open := new(atomic.Int64)
	served := make(chan struct{})
	go func() {
		defer close(served)
		api.serve(context.Background(), &failingListener{Listener: countingListener{Listener: ln, open: open}, fail: 2})
	}()
	t.Cleanup(func() {
		ln.Close()
		<-served
	})
	return sock, open
}

// Callers make a Client per call (the CLI, steppe status polling every
// machine). Each call must leave nothing behind in the agent. Only the
// supervisor is replaced here, since connections are under test.
func TestClientLeavesNoConnectionInTheAgent(t *testing.T) {
	sock, open := startAPI(t, &apiServer{
		ctl:    &recordingControl{},
		status: func() StatusReport { return StatusReport{Agent: AgentInfo{PID: os.Getpid()}} },
		log:    slog.New(slog.DiscardHandler),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for range 20 {
		st, err := NewClient(sock).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Agent.PID != os.Getpid() {
			t.Fatalf("status: %+v", st)
		}
		lines, err := NewClient(sock).Logs(ctx, "web", 7)
		if err != nil || len(lines) != 1 || lines[0] != "7 lines of web" {
			t.Fatalf("logs: %q, %v", lines, err)
		}
		chunk, err := NewClient(sock).FollowLogs(ctx, "web", "c", 3)
		if err != nil || len(chunk.Lines) != 1 || chunk.Lines[0] != "3 lines of web" || chunk.Cursor != "c+" {
			t.Fatalf("follow: %+v, %v", chunk, err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for open.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still open in the agent after 40 calls", open.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Errors reach the client as the agent wrote them; a malformed or unknown
// request gets an answer that says what was wrong, not a dropped connection.
func TestAPIErrors(t *testing.T) {
	sock, _ := startAPI(t, &apiServer{
		ctl:    &recordingControl{},
		status: func() StatusReport { return StatusReport{} },
		log:    slog.New(slog.DiscardHandler),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := NewClient(sock).Logs(ctx, "nope", 3); err == nil || err.Error() != `no service "nope"` {
		t.Errorf("logs of an unknown service: %v", err)
	}
	if err := NewClient(sock).Control(ctx, "web", "explode"); err == nil || !strings.Contains(err.Error(), `unknown op "explode"`) {
		t.Errorf("unknown action: %v", err)
	}
	for _, raw := range []string{"not json\n", `{"op":"logs","service":"web","lines":-1}` + "\n", `{"op":"follow","service":"web","lines":-1}` + "\n"} {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(c, raw)
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil || !strings.HasPrefix(line, `{"error":`) {
			t.Errorf("request %q: answer %q, %v", raw, line, err)
		}
	}
	if _, err := NewClient(filepath.Join(t.TempDir(), "none.sock")).Status(ctx); err == nil || !strings.Contains(err.Error(), "no agent answers") {
		t.Errorf("no agent: %v", err)
	}
}

// A client that sends its request and closes its writing side at once (as
// `socat` does when its input ends) still has its request carried out and
// gets the answer.
func TestAPIHalfClosedClient(t *testing.T) {
	ctl := &recordingControl{}
	sock, _ := startAPI(t, &apiServer{ctl: ctl, status: func() StatusReport { return StatusReport{} }, log: slog.New(slog.DiscardHandler)})
	for range 20 {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(c, `{"op":"restart","service":"web"}`)
		if err := c.(*net.UnixConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil || line != "{}\n" {
			t.Fatalf("answer %q, %v", line, err)
		}
	}
	if n := ctl.restarts.Load(); n != 20 {
		t.Fatalf("%d restarts reached the supervisor, want 20", n)
	}
}
