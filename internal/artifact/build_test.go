package artifact

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

func TestBuildMissingMuslIsClearError(t *testing.T) {
	var log bytes.Buffer
	b := &Builder{CacheDir: t.TempDir(), Log: &log, CC: "steppe-no-such-musl-gcc"}
	_, err := b.Build(context.Background(), "nomad", "1.9.3")
	var se *StepError
	if !errors.As(err, &se) || se.Step != "toolchain" {
		t.Fatalf("err = %v, want a toolchain StepError", err)
	}
	if !strings.Contains(err.Error(), "musl-tools") {
		t.Errorf("error %q does not say what to install", err)
	}
}

func TestPickCC(t *testing.T) {
	have := func(names ...string) func(string) (string, error) {
		return func(n string) (string, error) {
			for _, h := range names {
				if h == n {
					return "/usr/bin/" + n, nil
				}
			}
			return "", errors.New("not found")
		}
	}
	for _, tc := range []struct {
		explicit string
		have     []string
		cc, warn string // warn: a substring; "" means none
		err      string
	}{
		{"", []string{"musl-gcc", "gcc"}, "musl-gcc", "", ""},
		{"", []string{"gcc"}, "gcc", "glibc", ""},
		{"", []string{"cc"}, "cc", "glibc", ""},
		{"", nil, "", "", "musl-tools"},
		{"clang", []string{"clang", "musl-gcc"}, "clang", "", ""},
		{"steppe-no-such-cc", []string{"gcc", "musl-gcc"}, "", "", "steppe-no-such-cc is not installed"},
	} {
		cc, warn, err := pickCC(tc.explicit, have(tc.have...))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("pickCC(%q, %v): err %v, want %q", tc.explicit, tc.have, err, tc.err)
			}
			continue
		}
		if err != nil || cc != tc.cc || (tc.warn == "") != (warn == "") || !strings.Contains(warn, tc.warn) {
			t.Errorf("pickCC(%q, %v) = %q, %q, %v; want %q, warning with %q", tc.explicit, tc.have, cc, warn, err, tc.cc, tc.warn)
		}
	}
}

func TestBuildUnobtainableVersionKeepsLog(t *testing.T) {
	var log bytes.Buffer
	cache := t.TempDir()
	b := &Builder{CacheDir: cache, Log: &log}
	_, err := b.Build(context.Background(), "nomad", "1.9.2")
	var se *StepError
	if !errors.As(err, &se) || se.Step != "fetch source" {
		t.Fatalf("err = %v, want a fetch source StepError", err)
	}
	if !errors.Is(err, errUnavailable) || !strings.Contains(err.Error(), "Nomad 1.9.2 cannot be had") {
		t.Errorf("error %q does not say the version cannot be had", err)
	}
	full, rerr := os.ReadFile(se.Log)
	if rerr != nil {
		t.Fatalf("build log not kept: %v", rerr)
	}
	if !strings.Contains(string(full), "FAILED at fetch source") || !strings.Contains(err.Error(), se.Log) {
		t.Errorf("log %s or error lacks the failure: %q", se.Log, err)
	}
	if !strings.Contains(log.String(), "last lines of "+se.Log) {
		t.Errorf("progress output lacks the log tail:\n%s", log.String())
	}
	if _, err := BinaryPath(cache, "nomad", "1.9.2"); err == nil {
		t.Error("a failed build left a binary")
	}
}

func TestBuildUnknownProduct(t *testing.T) {
	_, err := (&Builder{CacheDir: t.TempDir()}).Build(context.Background(), "terraform", "1.9.0")
	if err == nil || !strings.Contains(err.Error(), `unknown product "terraform"`) {
		t.Errorf("err = %v", err)
	}
}

func TestCompileErrorsFromVerboseLog(t *testing.T) {
	// The shape of a real failed `go build -v` log (consul 1.14.8 against
	// the api version its go.mod requires).
	log := `github.com/hashicorp/consul/command/operator/raft
github.com/hashicorp/consul/command/operator/raft/listpeers
# github.com/hashicorp/consul/command/operator/raft/listpeers
command/operator/raft/listpeers/operator_raft_list.go:74:52: raftServer.LastIndex undefined (type *api.RaftServer has no field or method LastIndex)
github.com/hashicorp/consul/command/peering
go: downloading github.com/x/y v1.0.0
`
	p := t.TempDir() + "/build.log"
	if err := os.WriteFile(p, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	got := compileErrors(p, 10)
	if len(got) != 1 || !strings.HasPrefix(got[0], "command/operator/raft/listpeers/operator_raft_list.go:74:52: raftServer.LastIndex undefined") {
		t.Errorf("compileErrors = %q", got)
	}
}
