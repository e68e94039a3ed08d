package supervise

import (
	"fmt"
	"os"
	"strings"
)

// Mount is one mount of this process's mount namespace, as
// /proc/self/mountinfo has it, with its octal escapes undone.
type Mount struct {
	Root   string // the mounted path within its file system
	Point  string // where it is mounted
	FSType string
}

// Mounts reads this process's mount table (/proc/self/mountinfo), in its
// order: a later mount on the same point covers an earlier one.
func Mounts() ([]Mount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	var out []Mount
	for line := range strings.SplitSeq(string(b), "\n") {
		// Fields: id parent major:minor root mountpoint options ... - fstype source super.
		pre, post, ok := strings.Cut(line, " - ")
		f := strings.Fields(pre)
		if !ok || len(f) < 5 {
			continue
		}
		m := Mount{Root: unescapeMount(f[3]), Point: unescapeMount(f[4])}
		if pf := strings.Fields(post); len(pf) > 0 {
			m.FSType = pf[0]
		}
		out = append(out, m)
	}
	return out, nil
}
