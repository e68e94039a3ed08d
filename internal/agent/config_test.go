package agent

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/supervise"
)

// The example must work exactly as written.
const exampleConfig = `service "web" {
  command = "/usr/bin/python3"
  args    = ["-m", "http.server", "18080", "--bind", "127.0.0.1"]
  ready {
    http = "http://127.0.0.1:18080/"
  }
}

service "after-web" {
  command = "/bin/sleep"
  args    = ["100000"]
  after   = ["web"]
}
`

func TestParseExample(t *testing.T) {
	cfg, err := ParseConfig("agent.hcl", []byte(exampleConfig))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Services) != 2 {
		t.Fatalf("services = %d, want 2", len(cfg.Services))
	}
	web, after := cfg.Services[0], cfg.Services[1]
	if web.Name != "web" || web.Command != "/usr/bin/python3" || len(web.Args) != 5 || web.Ready == nil || web.Ready.HTTP != "http://127.0.0.1:18080/" {
		t.Errorf("web = %+v", web)
	}
	if after.Name != "after-web" || len(after.After) != 1 || after.After[0] != "web" {
		t.Errorf("after-web = %+v", after)
	}
	if cfg.StateDir != DefaultStateDir || cfg.Socket != DefaultSocket || cfg.Cgroup != DefaultCgroup {
		t.Errorf("defaults = %q %q %q", cfg.StateDir, cfg.Socket, cfg.Cgroup)
	}
	// The example file shipped with the README is the same config.
	src, err := os.ReadFile(filepath.Join("..", "..", "examples", "agent.hcl"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseConfig("examples/agent.hcl", src); err != nil {
		t.Fatalf("examples/agent.hcl: %v", err)
	}
}

func TestParseEveryField(t *testing.T) {
	src := `
agent {
  state_dir = "/tmp/st"
  socket    = "/tmp/st/a.sock"
  cgroup    = "steppe/node-1"
}
service "db" {
  command       = "/bin/sleep"
  args          = ["1000"]
  env           = { B = "2", A = "1" }
  dir           = "/tmp"
  user          = "nobody"
  group         = "nogroup"
  stop_signal   = "INT"
  stop_timeout  = "3s"
  stop_mode     = "main"
  reload_signal = "SIGUSR1"
  restart       = "on-failure"
  backoff_min   = "10ms"
  backoff_max   = "5s"
  healthy_after = "30s"
  memory_max    = "64MiB"
  memory_high   = "48MiB"
  log_max_size  = "1MiB"
  log_keep      = 5
  ready {
    notify   = true
    timeout  = "20s"
    interval = "100ms"
  }
}
`
	cfg, err := ParseConfig("full.hcl", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != "/tmp/st" || cfg.Socket != "/tmp/st/a.sock" || cfg.Cgroup != "steppe/node-1" {
		t.Errorf("agent block = %+v", cfg)
	}
	s := cfg.Services[0]
	want := supervise.Spec{
		Name: "db", Command: "/bin/sleep", Args: []string{"1000"}, Env: []string{"A=1", "B=2"},
		Dir: "/tmp", User: "nobody", Group: "nogroup",
		StopSignal: syscall.SIGINT, StopTimeout: 3 * time.Second, StopMode: supervise.StopMain,
		ReloadSignal: syscall.SIGUSR1, Restart: supervise.RestartOnFailure,
		BackoffMin: 10 * time.Millisecond, BackoffMax: 5 * time.Second, HealthyAfter: 30 * time.Second,
		MemoryMax: 64 << 20, MemoryHigh: 48 << 20, LogMaxBytes: 1 << 20, LogKeep: 5,
	}
	ready := s.Ready
	s.Ready = nil
	if !specEqual(s, want) {
		t.Errorf("spec =\n%+v\nwant\n%+v", s, want)
	}
	if ready == nil || !ready.Notify || ready.Timeout != 20*time.Second || ready.Interval != 100*time.Millisecond {
		t.Errorf("ready = %+v", ready)
	}
}

func specEqual(a, b supervise.Spec) bool {
	return a.Name == b.Name && a.Command == b.Command && strings.Join(a.Args, "\x00") == strings.Join(b.Args, "\x00") &&
		strings.Join(a.Env, "\x00") == strings.Join(b.Env, "\x00") && a.Dir == b.Dir && a.User == b.User && a.Group == b.Group &&
		a.StopSignal == b.StopSignal && a.StopTimeout == b.StopTimeout && a.StopMode == b.StopMode &&
		a.ReloadSignal == b.ReloadSignal && a.Restart == b.Restart && a.BackoffMin == b.BackoffMin &&
		a.BackoffMax == b.BackoffMax && a.HealthyAfter == b.HealthyAfter && a.MemoryMax == b.MemoryMax &&
		a.MemoryHigh == b.MemoryHigh && a.LogMaxBytes == b.LogMaxBytes && a.LogKeep == b.LogKeep
}

// Every bad config fails with the file, line and what is wrong.
func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, src string
		want      []string // substrings of the error, in order of appearance
	}{
		{"unknown key", `service "a" {
  command = "/bin/true"
  comand2 = "x"
}`, []string{"bad.hcl:3:3: Unsupported argument", "comand2"}},
		{"unknown block", `servce "a" {
}`, []string{"bad.hcl:1:1: Unsupported block type"}},
		{"missing command", `service "a" {
}`, []string{"bad.hcl:1:13: Missing required argument", "command"}},
		{"missing binary", `service "a" {
  command = "/nonexistent/daemon"
}`, []string{"bad.hcl:2:13: Bad command", "/nonexistent/daemon does not exist"}},
		{"relative binary", `service "a" {
  command = "sleep"
}`, []string{"bad.hcl:2:13: Bad command", "not an absolute path"}},
		{"not executable", `service "a" {
  command = "/etc/passwd"
}`, []string{"bad.hcl:2:13: Bad command", "not executable"}},
		{"bad duration", `service "a" {
  command      = "/bin/true"
  stop_timeout = "10 seconds"
}`, []string{"bad.hcl:3:18: Invalid duration", `stop_timeout = "10 seconds"`}},
		{"bad readiness duration", `service "a" {
  command = "/bin/true"
  ready {
    tcp     = "127.0.0.1:80"
    timeout = "soon"
  }
}`, []string{"bad.hcl:5:15: Invalid duration", `timeout = "soon"`}},
		{"duplicate names", `service "a" {
  command = "/bin/true"
}
service "a" {
  command = "/bin/true"
}`, []string{"bad.hcl:4:9: Duplicate service", `"a" is already defined at bad.hcl:1,1-12`}},
		{"cycle", `service "a" {
  command = "/bin/true"
  after   = ["b"]
}
service "b" {
  command = "/bin/true"
  after   = ["c"]
}
service "c" {
  command = "/bin/true"
  after   = ["a"]
}`, []string{"Dependency cycle", "a -> b -> c -> a"}},
		{"self dependency", `service "a" {
  command = "/bin/true"
  after   = ["a"]
}`, []string{"bad.hcl:3:13: Dependency cycle", `"a" is after itself`}},
		{"unknown dependency", `service "a" {
  command = "/bin/true"
  after   = ["ghost"]
}`, []string{"bad.hcl:3:13: Unknown dependency", `"ghost", which is not defined`}},
		{"bad signal", `service "a" {
  command     = "/bin/true"
  stop_signal = "SIGNOPE"
}`, []string{"bad.hcl:3:17: Invalid signal"}},
		{"bad stop mode", `service "a" {
  command   = "/bin/true"
  stop_mode = "group"
}`, []string{"bad.hcl:3:15: Invalid stop mode"}},
		{"bad restart", `service "a" {
  command = "/bin/true"
  restart = "sometimes"
}`, []string{"bad.hcl:3:13: Invalid restart policy"}},
		{"bad size", `service "a" {
  command    = "/bin/true"
  memory_max = "lots"
}`, []string{"bad.hcl:3:16: Invalid size"}},
		{"two readiness kinds", `service "a" {
  command = "/bin/true"
  ready {
    tcp  = "127.0.0.1:1"
    http = "http://127.0.0.1:1/"
  }
}`, []string{"bad.hcl:3:3: Invalid ready block", "found 2"}},
		{"wrong type", `service "a" {
  command = "/bin/true"
  args    = "not-a-list"
}`, []string{"bad.hcl:3:14: Unsuitable value type"}},
		{"syntax error", `service "a" {
  command = "/bin/true"
`, []string{"bad.hcl:1:13: Unclosed configuration block"}},
		{"several errors at once", `service "a" {
  command = "/nonexistent"
}
service "b" {
  command      = "/bin/true"
  stop_timeout = "x"
}`, []string{"bad.hcl:2:13: Bad command", "bad.hcl:6:18: Invalid duration"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("bad.hcl", []byte(tc.src))
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			rest := msg
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("error %q\ndoes not contain %q (in order)", msg, w)
				}
				rest = rest[i+len(w):]
			}
		})
	}
}
