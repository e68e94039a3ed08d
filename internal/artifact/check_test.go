package artifact

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCheckStatic(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	prog := `package main

import ("fmt"; "os")

func main() {
	if len(os.Args) > 1 && os.Args[1] == "version" {
		fmt.Println(os.Getenv("SAY"))
	}
}
`
	if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	static := filepath.Join(dir, "static")
	cmd := exec.Command("go", "build", "-o", static, src)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOTOOLCHAIN=local", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := checkStatic(static); err != nil {
		t.Errorf("static Go binary: %v", err)
	}
	// A dynamically linked program of the host.
	dyn, err := exec.LookPath("ls")
	if err != nil {
		t.Fatalf("no ls on PATH: %v", err)
	}
	if err := checkStatic(dyn); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("%s: err = %v, want dynamically linked", dyn, err)
	}
	if err := checkStatic(src); err == nil {
		t.Error("a Go source file passed as an ELF executable")
	}
}

func TestCheckVersionRunsBinary(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "nomad")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho 'Nomad v1.9.3'\necho 'BuildDate 2024-11-11T16:35:41Z'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := checkVersion(ctx, script, "Nomad", "1.9.3"); err != nil {
		t.Errorf("matching version rejected: %v", err)
	}
	if _, err := checkVersion(ctx, script, "Nomad", "1.9.30"); err == nil {
		t.Error("Nomad v1.9.3 accepted as 1.9.30")
	}
	if _, err := checkVersion(ctx, filepath.Join(dir, "missing"), "Nomad", "1.9.3"); err == nil {
		t.Error("missing binary passed")
	}
}

func TestVersionLineMatches(t *testing.T) {
	cases := []struct {
		line, title, version string
		ok                   bool
	}{
		{"Nomad v1.9.3", "Nomad", "1.9.3", true},
		{"Consul v1.14.11", "Consul", "1.14.11", true},
		{"Vault v1.21.0 (818ca8b3575ea937ca48b640baf35e1b2ede1833), built 2025-10-22T02:33:18Z", "Vault", "1.21.0", true},
		{"Nomad v1.9.3-dev", "Nomad", "1.9.3", false},
		{"Consul v1.14.1", "Consul", "1.14.11", false},
		{"Consul v1.14.11", "Consul", "1.14.1", false},
		{"nomad v1.9.3", "Nomad", "1.9.3", false},
	}
	for _, c := range cases {
		if got := versionLineMatches(c.line, c.title, c.version); got != c.ok {
			t.Errorf("versionLineMatches(%q, %q, %q) = %v", c.line, c.title, c.version, got)
		}
	}
}

func TestParseRef(t *testing.T) {
	p, v, err := ParseRef("nomad@v1.9.3")
	if err != nil || p != "nomad" || v != "1.9.3" {
		t.Errorf("ParseRef(nomad@v1.9.3) = %q %q %v", p, v, err)
	}
	if _, v, err := ParseRef("nomad@1.9.3+ent"); err != nil || v != "1.9.3+ent" {
		t.Errorf("ParseRef(nomad@1.9.3+ent) = %q, %v", v, err)
	}
	for _, bad := range []string{"nomad", "nomad@", "@1.9.3", "terraform@1.9.0", "nomad@1.9", "nomad@latest", "nomad@1.9.3/../x", "nomad@1.9.3-rc/1", "nomad@1.9.3+", "nomad@1.9.3+a/b"} {
		if _, _, err := ParseRef(bad); err == nil {
			t.Errorf("ParseRef(%q) accepted", bad)
		}
	}
	if _, _, err := ParseRef("terraform@1.9.0"); err == nil || !strings.Contains(err.Error(), "known: consul, coredns, nomad, vault") {
		t.Errorf("unknown product error does not list the known ones: %v", err)
	}
}

func TestLDFlagsStampLikeReleaseBuilds(t *testing.T) {
	ps := products()
	when := time.Date(2024, 11, 11, 16, 35, 41, 0, time.UTC)
	nomad := ldflags(ps["nomad"], "1.9.3", "d92bf1014886c0ff9f882f4a2691d5ae8ad8131c", when)
	for _, want := range []string{
		"-s -w",
		"-linkmode external -extldflags -static",
		"-X github.com/hashicorp/nomad/version.GitCommit=d92bf1014886c0ff9f882f4a2691d5ae8ad8131c",
		"-X github.com/hashicorp/nomad/version.BuildDate=2024-11-11T16:35:41Z",
		"-X github.com/hashicorp/nomad/version.VersionPrerelease=",
	} {
		if !strings.Contains(nomad, want) {
			t.Errorf("nomad ldflags %q lack %q", nomad, want)
		}
	}
	consul := ldflags(ps["consul"], "1.14.8", "c9c7d1f4976799e44e9ccaf057b202adac38d62d", when)
	if !strings.Contains(consul, "version.GitCommit=c9c7d1f4 ") || strings.Contains(consul, "linkmode") {
		t.Errorf("consul ldflags = %q", consul)
	}
	// Without a recorded origin there is no commit to stamp.
	if got := ldflags(ps["consul"], "1.14.11", "", when); strings.Contains(got, "GitCommit") {
		t.Errorf("consul ldflags without commit = %q", got)
	}
}

func TestToolchainWarning(t *testing.T) {
	if w := toolchainWarning(goMod{Go: "1.23"}, "go1.26.8"); !strings.Contains(w, "Go 1.23") || !strings.Contains(w, "go1.26.8") {
		t.Errorf("warning = %q", w)
	}
	if w := toolchainWarning(goMod{Go: "1.26", Toolchain: "go1.26.2"}, "go1.26.8"); w != "" {
		t.Errorf("same minor warned: %q", w)
	}
	if w := toolchainWarning(goMod{Go: "1.25.1"}, "go1.26.8"); w == "" {
		t.Error("go 1.25.1 vs go1.26.8 not warned")
	}
}

func TestBinaryPathNotBuilt(t *testing.T) {
	cache := t.TempDir()
	_, err := BinaryPath(cache, "nomad", "1.9.3")
	if err == nil || !strings.Contains(err.Error(), "steppe artifact build nomad@1.9.3") {
		t.Errorf("err = %v, want how to build it", err)
	}
	if _, err := BinaryPath(cache, "terraform", "1.0.0"); err == nil {
		t.Error("unknown product accepted")
	}
}
