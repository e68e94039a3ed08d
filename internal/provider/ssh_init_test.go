package provider

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
)

// TestSystemdUnitVerifies checks the agent's unit with systemd's own
// checker. systemd cannot be PID 1 here (the machine and the test hosts
// do not boot systemd; a systemd in a namespace needs a full boot it cannot
// have), so the unit is verified, not run: the runit and OpenRC
// definitions run for real in e2e TestSSHProvider.
func TestSystemdUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		testenv.Lacks(t, "systemd-analyze not installed (apt-get install systemd): %v", err)
	}
	files, start, stop, err := serviceDefinition(InitSystemd, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || files[0].Path != systemdUnit {
		t.Fatalf("files %+v", files)
	}
	unit := files[0].Content
	for _, want := range []string{"\nDelegate=yes\n", "\nKillMode=process\n", "\nRestart=always\n", "\nWantedBy=multi-user.target\n"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", strings.TrimSpace(want), unit)
		}
	}
	if !strings.Contains(start, "enable --now") || !strings.Contains(stop, "disable --now") {
		t.Errorf("start %q stop %q", start, stop)
	}
	// verify checks that ExecStart is executable: this test binary stands
	// in for the installed steppe.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "steppe-agent.service")
	if err := os.WriteFile(p, []byte(strings.ReplaceAll(unit, SSHBinary, exe)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", p).CombinedOutput()
	// verify exits 0 on unknown keys too, warning: any output is a fault.
	if err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestServiceScriptsParse: the OpenRC script and runit's run files are
// valid sh (they run for real in e2e TestSSHProvider).
func TestServiceScriptsParse(t *testing.T) {
	for _, init := range []Init{InitOpenRC, InitRunit} {
		files, _, _, err := serviceDefinition(init, "/etc/service")
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			p := filepath.Join(t.TempDir(), "script")
			if err := os.WriteFile(p, []byte(f.Content), 0o755); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("sh", "-n", p).CombinedOutput(); err != nil {
				t.Errorf("%s %s: %v\n%s", init, f.Path, err, out)
			}
		}
	}
	if _, _, _, err := serviceDefinition("s6", ""); err == nil || !strings.Contains(err.Error(), "systemd, openrc, runit") {
		t.Errorf("s6: %v", err)
	}
}

func TestParseProbe(t *testing.T) {
	p := parseProbe("uid=0\narch=x86_64\ninit=runit\nrunsvdir=/etc/service\n")
	if p.UID != "0" || p.Init != InitRunit || p.RunsvDir != "/etc/service" || p.Arch != "x86_64" {
		t.Fatalf("%+v", p)
	}
}
