package provider

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/steppe/steppe/internal/agent"
	"github.com/steppe/steppe/internal/supervise"
)

// SSHTeardownArg is the hidden first argument that makes steppe, run on an
// ssh host by the provider's Destroy, the host's half of the teardown:
// main calls SSHTeardownMain(os.Args[2:]) when os.Args[1] is it.
//
//	steppe __steppe-ssh locate     print where the running agent keeps its services' cgroups (JSON)
//	steppe __steppe-ssh teardown J kill what is left there, unmount under the state dir, remove the cgroups
//
// It is the installed steppe binary that runs it, removed right after.
const SSHTeardownArg = "__steppe-ssh"

// sshCgroups is where an agent keeps its services' cgroups: below its own
// v2 cgroup and, for memory, its own v1 memory cgroup.
type sshCgroups struct {
	AgentPID int    `json:"agent_pid,omitempty"`
	V2       string `json:"v2,omitempty"`
	MemoryV1 string `json:"memory_v1,omitempty"`
}

// SSHTeardownMain runs the host's half of Destroy and returns only errors.
func SSHTeardownMain(args []string) error {
	if len(args) == 0 {
		return errors.New("ssh teardown: want locate | teardown JSON")
	}
	switch args[0] {
	case "locate":
		b, _ := json.Marshal(locateAgent())
		fmt.Println(string(b))
		return nil
	case "teardown":
		var where sshCgroups
		if len(args) > 1 {
			if err := json.Unmarshal([]byte(args[1]), &where); err != nil {
				return fmt.Errorf("ssh teardown: %w", err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		return teardownHost(ctx, where)
	}
	return fmt.Errorf("ssh teardown: unknown step %q", args[0])
}

// locateAgent finds the agent running SSHConfig and where its services'
// cgroups are; with no agent running, the cgroups of this process's
// parent (the init's, which the agent inherits) are the guess.
func locateAgent() sshCgroups {
	pid := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	// The agent's own command line (supervise-daemon's names it too).
	want := []byte(SSHBinary + "\x00agent\x00-config\x00" + SSHConfig + "\x00")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.HasPrefix(b, want) {
			pid, _ = strconv.Atoi(filepath.Base(filepath.Dir(p)))
			break
		}
	}
	out := sshCgroups{AgentPID: pid}
	if pid == 0 {
		return out
	}
	v2 := supervise.CgroupV2Mount()
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)); err == nil && v2 != "" {
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "0::"); ok {
				out.V2 = filepath.Join(v2, rest, agent.DefaultCgroup)
			}
		}
	}
	if mem, err := supervise.MemoryV1Cgroup(pid); err == nil && mem != "" {
		out.MemoryV1 = filepath.Join(mem, agent.DefaultCgroup)
	}
	return out
}

// teardownHost kills every process left in the agent's cgroups (a Nomad
// client's task executors outlive the agent by design), every process
// whose command line names the state directory, unmounts what Nomad
// mounted below it and removes the cgroups.
func teardownHost(ctx context.Context, where sshCgroups) error {
	var errs []error
	if where.V2 != "" {
		if err := killCgroupTree(ctx, where.V2); err != nil {
			errs = append(errs, err)
		}
	}
	killByPath(SSHStateDir)
	if err := unmountUnder(SSHStateDir); err != nil {
		errs = append(errs, err)
	}
	removeAllocCgroups(filepath.Join(SSHStateDir, "data", "nomad", "alloc"))
	for _, root := range []string{where.V2, where.MemoryV1} {
		if root == "" {
			continue
		}
		if err := removeCgroupTree(root); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
