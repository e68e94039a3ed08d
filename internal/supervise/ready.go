package supervise

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// probe waits until the readiness check r passes, r.Timeout passes, or ctx
// ends. Notify readiness is not probed: READY=1 arrives on the notify socket
// and this only times it out.
func probe(ctx context.Context, r *Readiness) error {
	ctx, cancel := context.WithTimeout(ctx, r.Timeout)
	defer cancel()
	var check func(context.Context) error
	var what string
	switch {
	case r.Notify:
		<-ctx.Done()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("readiness: timeout after %v: no READY=1 on NOTIFY_SOCKET", r.Timeout)
		}
		return ctx.Err()
	case r.TCP != "":
		what = "tcp " + r.TCP
		check = func(ctx context.Context) error {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", r.TCP)
			if err != nil {
				return err
			}
			return c.Close()
		}
	case r.HTTP != "":
		what = r.HTTP
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
		defer client.CloseIdleConnections()
		check = func(ctx context.Context) error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.HTTP, nil)
			if err != nil {
				return err
			}
			resp, err := client.Do(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode < 200 || resp.StatusCode > 299 {
				return fmt.Errorf("status %s", resp.Status)
			}
			return nil
		}
	case len(r.Command) > 0:
		what = strings.Join(r.Command, " ")
		check = func(ctx context.Context) error {
			cmd := exec.CommandContext(ctx, r.Command[0], r.Command[1:]...)
			cmd.Env = []string{}
			cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, nil
			return cmd.Run()
		}
	default:
		return nil
	}
	var last error
	for {
		actx, acancel := context.WithTimeout(ctx, max(r.Interval, time.Second))
		err := check(actx)
		acancel()
		if err == nil {
			return nil
		}
		// An attempt cut short by the overall deadline says less than
		// the one before it ("i/o timeout" instead of "connection refused").
		if ctx.Err() == nil || last == nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("readiness: timeout after %v: %s: %v", r.Timeout, what, shortErr(last))
			}
			return ctx.Err()
		case <-time.After(r.Interval):
		}
	}
}

// shortErr drops the repetition net errors carry ("dial tcp ...: connect:").
func shortErr(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		var sys *os.SyscallError
		if errors.As(op.Err, &sys) {
			return sys.Err.Error()
		}
		return op.Err.Error()
	}
	return err.Error()
}

// notifyMsg is what a service said on its NOTIFY_SOCKET.
type notifyMsg struct {
	ready, reloading, stopping bool
	status                     string
	mainPID                    int
}

func parseNotify(b []byte) notifyMsg {
	var m notifyMsg
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, _ := strings.Cut(line, "=")
		switch k {
		case "READY":
			m.ready = v == "1"
		case "RELOADING":
			m.reloading = v == "1"
		case "STOPPING":
			m.stopping = v == "1"
		case "STATUS":
			m.status = v
		case "MAINPID":
			m.mainPID, _ = strconv.Atoi(v)
		}
	}
	return m
}

// listenNotify binds the service's notify socket at path, replacing a stale
// one: the path stays the same across agent restarts, so an adopted daemon
// that was told this path keeps reaching the new agent.
func listenNotify(path string) (*net.UnixConn, error) {
	if len(path) >= 108 {
		return nil, fmt.Errorf("notify socket path %q is longer than 107 bytes: use a shorter state directory", path)
	}
	_ = os.Remove(path)
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		c.Close()
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	return c, nil
}
