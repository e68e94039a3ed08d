package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// Callers make a Client per call (the CLI, steppe status polling every
// machine). Each call must leave nothing behind in the agent: a kept-alive
// connection per Client would hold a goroutine and buffers there for as long
// as the caller runs. The server is the agent's own, on a real socket; its
// status comes from a function, since only connections are under test.
func TestClientLeavesNoConnectionInTheAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := listenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	api := &apiServer{
		status: func() StatusReport { return StatusReport{Agent: AgentInfo{PID: os.Getpid()}} },
		log:    slog.New(slog.DiscardHandler),
	}
	srv := newAPIServer(api)
	var open atomic.Int64
	srv.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		srv.Close()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	}()

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
	}
	deadline := time.Now().Add(10 * time.Second)
	for open.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still open in the agent after 20 status calls", open.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
