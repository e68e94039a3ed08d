package provider

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// hostKeyCallback checks a host's key against, in order: the key the spec
// gives for it; the known_hosts file the spec names; the provider's own
// known_hosts (keys trusted on first use before). A key that differs from
// a known one is refused, always. An unknown key is refused unless
// TrustOnFirstUse, and then recorded in the provider's known_hosts.
func (s *SSH) hostKeyCallback(h SSHHost) ssh.HostKeyCallback {
	return func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		fp := ssh.FingerprintSHA256(key)
		if h.HostKey != "" {
			want, _, _, _, err := ssh.ParseAuthorizedKey([]byte(h.HostKey))
			if err != nil {
				return fmt.Errorf("host key refused: the spec's host_key: %w", err)
			}
			if string(want.Marshal()) != string(key.Marshal()) {
				return fmt.Errorf("host key refused: the host offered %s %s, the spec's host_key is %s %s: if the host was reinstalled, put its new key in the spec; otherwise someone may be in the middle", key.Type(), fp, want.Type(), ssh.FingerprintSHA256(want))
			}
			return nil
		}
		own := filepath.Join(s.opts.Dir, sshKnownHosts)
		files := []string{own}
		if h.KnownHosts != "" {
			files = append([]string{h.KnownHosts}, files...)
		}
		var exist []string
		for _, f := range files {
			if _, err := os.Stat(f); err == nil {
				exist = append(exist, f)
			} else if f == h.KnownHosts {
				return fmt.Errorf("host key refused: known_hosts %s: %v", f, err)
			}
		}
		if len(exist) > 0 {
			cb, err := knownhosts.New(exist...)
			if err != nil {
				return fmt.Errorf("host key refused: %w", err)
			}
			err = cb(hostname, remote, key)
			var ke *knownhosts.KeyError
			switch {
			case err == nil:
				return nil
			case errors.As(err, &ke) && len(ke.Want) > 0:
				var known []string
				for _, w := range ke.Want {
					known = append(known, fmt.Sprintf("%s %s (%s:%d)", w.Key.Type(), ssh.FingerprintSHA256(w.Key), w.Filename, w.Line))
				}
				return fmt.Errorf("host key refused: the host offered %s %s, but its known key is %s: if the host was reinstalled, remove the old line; otherwise someone may be in the middle", key.Type(), fp, strings.Join(known, ", "))
			case !errors.As(err, &ke):
				return fmt.Errorf("host key refused: %w", err)
			}
		}
		if !s.opts.TrustOnFirstUse {
			return fmt.Errorf("host key refused: the host's key %s %s is unknown: give it in the spec (host_key), in a known_hosts file (known_hosts), or trust it on first use, an explicit choice of the operator (SSHOptions.TrustOnFirstUse; it is then recorded in %s)", key.Type(), fp, own)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if err := os.MkdirAll(s.opts.Dir, 0o700); err != nil {
			return fmt.Errorf("record host key: %w", err)
		}
		f, err := os.OpenFile(own, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("record host key: %w", err)
		}
		line := knownhosts.Line([]string{knownhosts.Normalize(hostname)}, key) + "\n"
		if _, err := f.WriteString(line); err != nil {
			f.Close()
			return fmt.Errorf("record host key in %s: %w", own, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("record host key in %s: %w", own, err)
		}
		return f.Close()
	}
}
