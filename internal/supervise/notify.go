package supervise

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

func (a *service) openNotify() error {
	if a.notifyConn != nil {
		return nil
	}
	c, err := listenNotify(a.notifyPath)
	if err != nil {
		return err
	}
	if err := a.notifyAccess(); err != nil {
		c.Close()
		return err
	}
	// With SO_PASSCRED every datagram carries its sender's pid, checked
	// against the service's processes.
	if rc, err := c.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
		})
	}
	a.notifyConn = c
	go func() {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			pid := 0
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					if cred, err := unix.ParseUnixCredentials(&m); err == nil {
						pid = int(cred.Pid)
					}
				}
			}
			a.send(event{kind: evNotify, notify: parseNotify(buf[:n]), sender: pid})
		}
	}()
	return nil
}

// notifyAccess lets a service that runs as another user reach its notify
// socket: the socket becomes the user's, and the two directories above it
// searchable (not listable; the files in them stay 0600).
func (a *service) notifyAccess() error {
	if a.spec.User == "" && a.spec.Group == "" {
		return nil
	}
	cred, err := credential(a.spec)
	if err != nil || cred == nil {
		return err
	}
	if err := os.Chown(a.notifyPath, int(cred.Uid), int(cred.Gid)); err != nil {
		return fmt.Errorf("notify socket: %w", err)
	}
	for _, d := range []string{a.sup.opts.StateDir, a.dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			return fmt.Errorf("notify socket: %w", err)
		}
	}
	return nil
}

func (a *service) closeNotify() {
	if a.notifyConn != nil {
		a.notifyConn.Close()
		a.notifyConn = nil
	}
}

// handleNotify takes a message from the notify socket, sent by sender (0
// if unknown): STATUS= becomes the Message, MAINPID= the main process
// (when it is one of the service's), READY=1 readiness.
func (a *service) handleNotify(msg notifyMsg, sender int) {
	if sender > 0 && alive(sender, 0) && !a.isMember(sender) {
		a.sup.log.Warn("notify message from a process outside the service ignored", "service", a.name, "pid", sender)
		return
	}
	if msg.status != "" {
		a.message = msg.status
	}
	if msg.mainPID > 0 && (a.main == nil || a.main.pid != msg.mainPID) && a.isMember(msg.mainPID) {
		if p, err := openProc(msg.mainPID, 0); err == nil {
			a.main.close()
			a.setMain(p)
			a.saveRecord()
		}
	}
	if msg.ready && a.phase == StateStarting && a.spec.Ready != nil && a.spec.Ready.Notify {
		a.markReady()
	}
}
