package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/supervise"
)

// StatusReport is what `steppe agent status -json` prints.
type StatusReport struct {
	Agent    AgentInfo          `json:"agent"`
	Bundle   *BundleStatus      `json:"bundle,omitempty"`
	Services []supervise.Status `json:"services"`
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
}

// control is the part of the supervisor the local API drives.
type control interface {
	Start(ctx context.Context, name string) error
	Stop(ctx context.Context, name string) error
	Restart(ctx context.Context, name string) error
	Reload(ctx context.Context, name string) error
	Logs(name string, n int) ([]string, error)
}

// apiServer answers the local API. Only root (or the agent's own user) may
// connect: the socket is 0600 and every connection's peer credentials are
// checked as well.
type apiServer struct {
	ctl    control
	status func() StatusReport
	log    *slog.Logger
}

func (s *apiServer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.status())
	})
	mux.HandleFunc("GET /v1/services/{name}/logs", func(w http.ResponseWriter, r *http.Request) {
		n := 100
		if v := r.URL.Query().Get("n"); v != "" {
			var err error
			if n, err = strconv.Atoi(v); err != nil || n < 0 {
				writeError(w, http.StatusBadRequest, fmt.Errorf("n = %q: want a number of lines", v))
				return
			}
		}
		lines, err := s.ctl.Logs(r.PathValue("name"), n)
		if err != nil {
			writeError(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string][]string{"lines": lines})
	})
	mux.HandleFunc("POST /v1/services/{name}/{action}", func(w http.ResponseWriter, r *http.Request) {
		name, action := r.PathValue("name"), r.PathValue("action")
		var op func(context.Context, string) error
		switch action {
		case "start":
			op = s.ctl.Start
		case "stop":
			op = s.ctl.Stop
		case "restart":
			op = s.ctl.Restart
		case "reload":
			op = s.ctl.Reload
		default:
			writeError(w, http.StatusNotFound, fmt.Errorf("unknown action %q (want start, stop, restart or reload)", action))
			return
		}
		s.log.Info("control", "service", name, "action", action)
		if err := op(r.Context(), name); err != nil {
			writeError(w, http.StatusConflict, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"service": name, "done": action})
	})
	return mux
}

// newAPIServer serves api. An idle connection is closed after a while, so
// that clients which keep connections open cannot pile up goroutines and
// buffers in the agent.
func newAPIServer(api *apiServer) *http.Server {
	return &http.Server{Handler: api.handler(), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"error":"encode response"}`)
	}
	b = append(b, '\n')
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(b))}
	h["Date"] = nil // nobody reads it on a local socket; spares formatting a time per request
	w.WriteHeader(code)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
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
	http   *http.Client
}

// NewClient returns a client for the agent listening on socket.
func NewClient(socket string) *Client {
	return &Client{
		Socket: socket,
		// One connection per request: callers make a Client per call, and
		// a kept-alive connection per Client would pin a goroutine and its
		// buffers in the agent for as long as the caller lives.
		http: &http.Client{Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		}},
	}
}

// Status fetches the agent's status.
func (c *Client) Status(ctx context.Context) (StatusReport, error) {
	var st StatusReport
	err := c.do(ctx, http.MethodGet, "/v1/status", &st)
	return st, err
}

// Logs fetches the last n lines of a service's log.
func (c *Client) Logs(ctx context.Context, service string, n int) ([]string, error) {
	var out struct {
		Lines []string `json:"lines"`
	}
	err := c.do(ctx, http.MethodGet, "/v1/services/"+url.PathEscape(service)+"/logs?n="+strconv.Itoa(n), &out)
	return out.Lines, err
}

// Control runs start, stop, restart or reload on a service and returns
// when the agent has done it.
func (c *Client) Control(ctx context.Context, service, action string) error {
	return c.do(ctx, http.MethodPost, "/v1/services/"+url.PathEscape(service)+"/"+url.PathEscape(action), nil)
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED) {
			return fmt.Errorf("no agent answers on %s (is `steppe agent` running? -socket or STEPPE_AGENT_SOCKET name another): %w", c.Socket, err)
		}
		if errors.Is(err, os.ErrPermission) {
			return fmt.Errorf("agent socket %s: permission denied (the local API is root-only)", c.Socket)
		}
		return fmt.Errorf("agent api %s: %w", c.Socket, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("agent api %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("agent api %s: %s", path, resp.Status)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("agent api %s: decode: %w", path, err)
	}
	return nil
}
