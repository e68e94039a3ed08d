package supervise

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
)

// An agent that runs in a cgroup of its own (as under systemd with
// Delegate=yes) places its services below that cgroup when CgroupParent
// is relative, and below the v2 mount when it starts with "/". An agent
// in the leaf "agent" it moves itself into (to enable controllers below
// its cgroup) counts from the cgroup above the leaf, so its services stay
// where they were.
func TestCgroupParentBelowOwnCgroup(t *testing.T) {
	m, err := findMounts()
	if err != nil || m.v2 == "" {
		testenv.Lacks(t, "no cgroup v2 mount: %v", err)
	}
	opts := testOptions(t)
	own := filepath.Join(m.v2, opts.CgroupParent, "own")
	if err := os.MkdirAll(filepath.Join(own, agentLeaf), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		in, parent, want string
	}{
		{own, "svc", filepath.Join(own, "svc")},
		{own, opts.CgroupParent + "/abs", filepath.Join(m.v2, opts.CgroupParent, "abs")},
		{filepath.Join(own, agentLeaf), "svc", filepath.Join(own, "svc")},
	} {
		spec := Spec{Name: "sleep", Command: "/bin/sleep", Args: []string{"1000"}}
		agent := startAgentIn(t, c.in, agentConfig{StateDir: shortTempDir(t), CgroupParent: c.parent, Specs: []Spec{spec}})
		st := agent.waitStatus("the service running", func(st []Status) bool {
			return len(st) == 1 && st[0].State == StateRunning && st[0].PID != 0
		})[0]
		want := filepath.Join(c.want, "sleep")
		if st.Cgroup != want {
			t.Errorf("agent in %s, cgroup parent %q: the service's cgroup is %s, want %s", c.in, c.parent, st.Cgroup, want)
		}
		data, _ := os.ReadFile("/proc/" + itoa(st.PID) + "/cgroup")
		if !strings.Contains(string(data), "0::"+strings.TrimPrefix(want, m.v2)+"\n") {
			t.Errorf("agent in %s, cgroup parent %q: pid %d is in %q, want %s", c.in, c.parent, st.PID, data, want)
		}
		agent.terminate()
	}
}

// enableConfig tells a re-executed test binary which controller to enable
// where (enableControllerV2).
type enableConfig struct {
	Controller, Base, Parent string
}

// testEnableMain enables a controller as the agent does, then prints its
// own cgroup v2.
func testEnableMain(js string) int {
	var c enableConfig
	if err := json.Unmarshal([]byte(js), &c); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	m, err := findMounts()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := os.MkdirAll(c.Parent, 0o755); err != nil { // as New does
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if !enableControllerV2(c.Controller, m.v2, c.Base, c.Parent, log) {
		return 1
	}
	m, _ = findMounts()
	fmt.Print(m.own)
	return 0
}

// The agent moves itself into the leaf "agent" of its cgroup to enable a
// controller below it (cgroup v2 lets no process stay in a cgroup whose
// children have controllers), then enables it. The first controller the v2
// root offers stands in for memory (here hugetlb, the only one).
func TestAgentMovesIntoLeafToEnableController(t *testing.T) {
	m, err := findMounts()
	if err != nil || m.v2 == "" {
		testenv.Lacks(t, "no cgroup v2 mount: %v", err)
	}
	have, _ := os.ReadFile(filepath.Join(m.v2, "cgroup.controllers"))
	ctrls := strings.Fields(string(have))
	if len(ctrls) == 0 {
		testenv.Lacks(t, "the cgroup v2 root at %s offers no controller", m.v2)
	}
	ctrl := ctrls[0]
	opts := testOptions(t)
	x := filepath.Join(m.v2, opts.CgroupParent)
	own := filepath.Join(x, "own")
	if err := os.MkdirAll(own, 0o755); err != nil {
		t.Fatal(err)
	}
	// As a delegating init does: the controller offered from the root
	// down to the agent's cgroup; taken back afterwards, deepest first,
	// once the agent's cgroup is gone.
	var enabled []string
	t.Cleanup(func() {
		_ = cgKill(own)
		_ = cgRemove(own)
		for _, d := range slices.Backward(enabled) {
			if err := os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte("-"+ctrl), 0); err != nil {
				t.Logf("leave %s enabled in %s: %v", ctrl, d, err)
			}
		}
	})
	for _, d := range []string{m.v2, filepath.Dir(x), x} {
		sub, _ := os.ReadFile(filepath.Join(d, "cgroup.subtree_control"))
		if hasWord(string(sub), ctrl) {
			continue
		}
		if err := os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte("+"+ctrl), 0); err != nil {
			t.Fatalf("enable %s in %s: %v", ctrl, d, err)
		}
		enabled = append(enabled, d)
	}
	js, _ := json.Marshal(enableConfig{Controller: ctrl, Base: own, Parent: filepath.Join(own, "svc")})
	exe, _ := os.Executable()
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), "STEPPE_TEST_ENABLE="+string(js))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	fd, err := syscall.Open(own, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("enable %s below %s from inside it: %v\n%s", ctrl, own, err, stderr.String())
	}
	if want := strings.TrimPrefix(filepath.Join(own, agentLeaf), m.v2); string(out) != want {
		t.Errorf("the agent ended in %s, want %s", out, want)
	}
	sub, _ := os.ReadFile(filepath.Join(own, "cgroup.subtree_control"))
	svc, _ := os.ReadFile(filepath.Join(own, "svc", "cgroup.controllers"))
	if !hasWord(string(sub), ctrl) || !hasWord(string(svc), ctrl) {
		t.Errorf("%s not enabled below %s: subtree_control %q, the parent's controllers %q", ctrl, own, sub, svc)
	}
}
