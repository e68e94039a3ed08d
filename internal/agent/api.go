package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/backoff"
	"github.com/steppe/steppe/internal/supervise"
)

// StatusReport is what `steppe agent status -json` prints.
type StatusReport struct {
	Agent    AgentInfo          `json:"agent"`
	Bundle   *BundleStatus      `json:"bundle,omitempty"`
	Services []supervise.Status `json:"services"`
	// Resolver is the machine's resolv.conf switch; nil when the agent
	// leaves resolv.conf alone (the local provider: the host's).
	Resolver *ResolverStatus `json:"resolver,omitempty"`
	// Recoveries are the services whose state the agent moved aside
	// because it would not open (recover.go), oldest first.
	Recoveries []Recovery `json:"recoveries,omitempty"`
}

// AgentInfo describes the agent process itself.
type AgentInfo struct {
	PID       int       `json:"pid"`
	Config    string    `json:"config"`
	StateDir  string    `json:"state_dir"`
	StartedAt time.Time `json:"started_at"`
	// ConfigError is why the last config reload was refused; the services
	// kept running on the config before it.
	ConfigError string `json:"config_error,omitempty"`
	// Isolation is "cgroup2", or "fallback" when no writable cgroup v2 was
	// found and a double fork could escape supervision.
	Isolation string `json:"isolation"`
	// Version is the agent's steppe version; Binary the file it runs
	// from, which a self-upgrade replaces.
	Version string `json:"version,omitempty"`
	Binary  string `json:"binary,omitempty"`
	// SelfUpgrade is the outcome of the agent's last self-upgrade.
	SelfUpgrade *SelfUpgradeStatus `json:"self_upgrade,omitempty"`
}

// control is the part of the supervisor the local API drives.
type control interface {
	Start(ctx context.Context, name string) error
	Stop(ctx context.Context, name string) error
	Restart(ctx context.Context, name string) error
	Reload(ctx context.Context, name string) error
	Logs(name string, n int) ([]string, error)
	FollowLogs(name, cursor string, n int) (supervise.LogChunk, error)
}

// The local API is one JSON object per connection each way, on the agent's
// Unix socket: the client writes a request line, the agent answers with a
// response line and closes. Its only clients are steppe's own commands, and
// the agent must stay small: net/http's server, with the stack growth of its
// connection goroutines, made the first request of an agent's life map 3.7
// MiB of the binary again (see BENCHMARKS.md). By hand:
//
//	echo '{"op":"status"}' | socat - UNIX-CONNECT:/run/steppe/agent.sock
type request struct {
	Op      string `json:"op"` // status, logs, follow, start, stop, restart or reload
	Service string `json:"service,omitempty"`
	Lines   int    `json:"lines,omitempty"`  // logs, and follow without a cursor: how many of the last lines
	Cursor  string `json:"cursor,omitempty"` // follow: from the answer before
}

type response struct {
	Error  string `json:"error,omitempty"`
	Result any    `json:"result,omitempty"`
}

// maxRequest bounds what the agent reads from a client.
const maxRequest = 64 << 10

// apiServer answers the local API. Only root (or the agent's own user) may
// connect: the socket is 0600 and every connection's peer credentials are
// checked as well.
type apiServer struct {
	ctl    control
	status func() StatusReport
	log    *slog.Logger
}

// serve answers connections from ln until ln is closed. Requests run with
// ctx: the agent's, which ends when it stops.
func (s *apiServer) serve(ctx context.Context, ln net.Listener) {
	// As net/http's server: 5ms doubling to 1s, no jitter (one listener,
	// no crowd to spread).
	pause := backoff.Policy{Min: 5 * time.Millisecond, Max: time.Second, Factor: 2}
	fails := 0
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// Out of descriptors, say: the API must come back once the
			// pressure is gone, as net/http's server does.
			delay := pause.Delay(fails)
			fails++
			s.log.Warn("local api: accept", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		fails = 0
		go s.handle(ctx, c)
	}
}

func (s *apiServer) handle(ctx context.Context, c net.Conn) {
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var req request
	if err := json.NewDecoder(io.LimitReader(c, maxRequest)).Decode(&req); err != nil {
		s.reply(c, nil, fmt.Errorf("read request: %w", err))
		return
	}
	// A client that goes away does not cancel what it asked for: once a
	// control operation reaches the supervisor it runs to its end anyway,
	// and a client that only closes its writing side (socat does) must not
	// lose its request.
	result, err := s.call(ctx, req)
	s.reply(c, result, err)
}

func (s *apiServer) call(ctx context.Context, req request) (any, error) {
	var op func(context.Context, string) error
	switch req.Op {
	case "status":
		return s.status(), nil
	case "logs":
		if req.Lines < 0 {
			return nil, fmt.Errorf("lines = %d: want a number of lines", req.Lines)
		}
		return s.ctl.Logs(req.Service, req.Lines)
	case "follow":
		if req.Lines < 0 {
			return nil, fmt.Errorf("lines = %d: want a number of lines", req.Lines)
		}
		return s.ctl.FollowLogs(req.Service, req.Cursor, req.Lines)
	case "start":
		op = s.ctl.Start
	case "stop":
		op = s.ctl.Stop
	case "restart":
		op = s.ctl.Restart
	case "reload":
		op = s.ctl.Reload
	default:
		return nil, fmt.Errorf("unknown op %q (want status, logs, follow, start, stop, restart or reload)", req.Op)
	}
	s.log.Info("control", "service", req.Service, "action", req.Op)
	return nil, op(ctx, req.Service)
}

func (s *apiServer) reply(c net.Conn, result any, err error) {
	resp := response{Result: result}
	if err != nil {
		resp = response{Error: err.Error()}
	}
	b, mErr := json.Marshal(resp)
	if mErr != nil {
		b, _ = json.Marshal(response{Error: "encode response: " + mErr.Error()})
	}
	_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(append(b, '\n')); err != nil {
		s.log.Debug("local api: write reply", "err", err)
	}
}

// listenUnix binds the API socket, replacing a stale one (the caller holds
// the agent lock, so no live agent owns it), with mode 0600.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("api socket dir: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale api socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("api socket: %w", err)
	}
	return &peerCheckListener{Listener: ln, uid: uint32(os.Getuid())}, nil
}

// peerCheckListener refuses connections from users other than root and the
// agent's own, in case the socket's mode is ever loosened.
type peerCheckListener struct {
	net.Listener
	uid uint32
}

func (l *peerCheckListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			return c, nil
		}
		raw, err := uc.SyscallConn()
		if err != nil {
			c.Close()
			continue
		}
		var cred *unix.Ucred
		var credErr error
		_ = raw.Control(func(fd uintptr) {
			cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		})
		if credErr != nil || (cred.Uid != 0 && cred.Uid != l.uid) {
			c.Close()
			continue
		}
		return c, nil
	}
}

// Client talks to a running agent's local API.
type Client struct {
	Socket string
	// Dial, when set, connects to the agent instead of dialing Socket
	// locally: the ssh provider reaches a host's socket through SSH.
	Dial func(ctx context.Context) (net.Conn, error)
}

// NewClient returns a client for the agent listening on socket.
func NewClient(socket string) *Client {
	return &Client{Socket: socket}
}

// Status fetches the agent's status.
func (c *Client) Status(ctx context.Context) (StatusReport, error) {
	var st StatusReport
	err := c.call(ctx, request{Op: "status"}, &st)
	return st, err
}

// Logs fetches the last n lines of a service's log.
func (c *Client) Logs(ctx context.Context, service string, n int) ([]string, error) {
	var lines []string
	err := c.call(ctx, request{Op: "logs", Service: service, Lines: n}, &lines)
	return lines, err
}

// FollowLogs returns the lines of a service's log after cursor, the
// Cursor of the chunk before; with no cursor, the last n lines. A client
// follows a log by calling it again with each answer's cursor.
func (c *Client) FollowLogs(ctx context.Context, service, cursor string, n int) (supervise.LogChunk, error) {
	var chunk supervise.LogChunk
	err := c.call(ctx, request{Op: "follow", Service: service, Lines: n, Cursor: cursor}, &chunk)
	return chunk, err
}

// Control runs start, stop, restart or reload on a service and returns
// when the agent has done it.
func (c *Client) Control(ctx context.Context, service, action string) error {
	return c.call(ctx, request{Op: action, Service: service}, nil)
}

// call makes one request on its own connection: nothing stays open in the
// agent between calls.
func (c *Client) call(ctx context.Context, req request, out any) error {
	var d net.Dialer
	dial := func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "unix", c.Socket) }
	if c.Dial != nil {
		dial = c.Dial
	}
	conn, err := dial(ctx)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED):
			return fmt.Errorf("no agent answers on %s (is `steppe agent` running? -socket or STEPPE_AGENT_SOCKET name another): %w", c.Socket, err)
		case errors.Is(err, os.ErrPermission):
			return fmt.Errorf("agent socket %s: permission denied (the local API is root-only)", c.Socket)
		}
		return fmt.Errorf("agent api %s: %w", c.Socket, err)
	}
	defer conn.Close()
	// Cancelling ctx unblocks the read and the write below.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("agent api %s: encode %s: %w", c.Socket, req.Op, err)
	}
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return c.callErr(ctx, req, err)
	}
	var resp struct {
		Error  string          `json:"error"`
		Result json.RawMessage `json:"result"`
	}
	if err := json.NewDecoder(io.LimitReader(conn, 64<<20)).Decode(&resp); err != nil {
		return c.callErr(ctx, req, err)
	}
	if resp.Error != "" {
		return errors.New(resp.Error)
	}
	if out == nil || len(resp.Result) == 0 {
		return nil
	}
	if err := json.Unmarshal(resp.Result, out); err != nil {
		return fmt.Errorf("agent api %s: %s: decode: %w", c.Socket, req.Op, err)
	}
	return nil
}

func (c *Client) callErr(ctx context.Context, req request, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return fmt.Errorf("agent api %s: %s: %w", c.Socket, req.Op, err)
}
