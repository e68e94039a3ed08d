package supervise

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// oomCount reads how many OOM kills the service's memory cgroup has seen.
func (a *service) oomCount() int64 {
	switch {
	case a.cg != "" && a.sup.memV2:
		return readKeyed(filepath.Join(a.cg, "memory.events"), "oom_kill")
	case a.sup.memV1 != "":
		return readKeyed(filepath.Join(a.sup.memV1, a.name, "memory.oom_control"), "oom_kill")
	}
	return 0
}

// checkOOM counts the OOM kills since the last look (oomBase, taken when
// the run began) and reports whether there were any.
func (a *service) checkOOM() bool {
	n := a.oomCount()
	if n < a.oomBase {
		a.oomBase = 0 // the cgroup was made anew under the run: it counts from 0
	}
	if n > a.oomBase {
		a.oomKills += int(n - a.oomBase)
		a.oomBase = n
		return true
	}
	return false
}

// applyMemory writes the memory limits before a start.
func (a *service) applyMemory() error {
	sp := a.spec
	if sp.MemoryMax == 0 && sp.MemoryHigh == 0 {
		if a.cg != "" && a.sup.memV2 {
			_ = os.WriteFile(filepath.Join(a.cg, "memory.max"), []byte("max"), 0)
			_ = os.WriteFile(filepath.Join(a.cg, "memory.high"), []byte("max"), 0)
		}
		return nil
	}
	switch {
	case a.cg != "" && a.sup.memV2:
		if sp.MemoryMax > 0 {
			if err := os.WriteFile(filepath.Join(a.cg, "memory.max"), []byte(strconv.FormatInt(sp.MemoryMax, 10)), 0); err != nil {
				return fmt.Errorf("memory.max: %w", err)
			}
			_ = os.WriteFile(filepath.Join(a.cg, "memory.swap.max"), []byte("0"), 0)
		}
		if sp.MemoryHigh > 0 {
			if err := os.WriteFile(filepath.Join(a.cg, "memory.high"), []byte(strconv.FormatInt(sp.MemoryHigh, 10)), 0); err != nil {
				return fmt.Errorf("memory.high: %w", err)
			}
		}
	case a.memcg != "":
		if err := os.MkdirAll(a.memcg, 0o755); err != nil {
			return fmt.Errorf("memory cgroup: %w", err)
		}
		v := []byte(strconv.FormatInt(sp.MemoryMax, 10))
		// memsw (memory+swap) must stay >= the memory limit: raise it
		// first when it is lower, so no order of writes fails; then set
		// both so the limit cannot be dodged by swapping.
		memsw := filepath.Join(a.memcg, "memory.memsw.limit_in_bytes")
		_ = os.WriteFile(memsw, []byte("-1"), 0)
		if err := os.WriteFile(filepath.Join(a.memcg, "memory.limit_in_bytes"), v, 0); err != nil {
			return fmt.Errorf("memory.limit_in_bytes: %w", err)
		}
		_ = os.WriteFile(memsw, v, 0)
	default:
		if !a.warnedMemory {
			a.warnedMemory = true
			a.log.agentf("memory limit not enforced: no usable memory controller")
			a.sup.log.Warn("memory limit not enforced: no usable memory controller", "service", a.name)
		}
	}
	return nil
}
