// Package bundle builds, signs, verifies, unpacks and stores the signed
// configuration bundles that machines pull.
//
// A bundle is a gzip-compressed tar stream whose first entry is
// manifest.json, whose second entry is manifest.sig (a detached Ed25519
// signature over the exact manifest bytes), and whose remaining entries are
// regular files, each listed in the manifest with its size, mode and SHA-256.
// The reader checks the signature before it parses the manifest, and checks
// every later entry against the signed manifest before any byte of it
// becomes visible, so nothing unsigned is ever trusted.
package bundle

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// FormatVersion is the manifest format this package writes and reads.
const FormatVersion = 1

// Names of the two leading entries of every bundle tarball.
const (
	ManifestName  = "manifest.json"
	SignatureName = "manifest.sig"
)

// TemplateSuffix ends the name of every template; the rendered file takes
// the name without it.
const TemplateSuffix = ".tmpl"

// maxManifestBytes bounds the manifest before it is read into memory.
const maxManifestBytes = 4 << 20

// Manifest describes one bundle. It is the only signed part of a bundle:
// the files are trusted through their hashes in it.
type Manifest struct {
	Format  int    `json:"format"`
	Cluster string `json:"cluster"`
	Role    string `json:"role"`
	// Version only grows: agents refuse a version that is not greater than
	// the last one they accepted.
	Version uint64    `json:"version"`
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires"`
	Files   []File    `json:"files"`
	// Artifacts are the binaries the bundle's services run.
	Artifacts []Artifact `json:"artifacts,omitempty"`
	// Services are the paths (among Files) of service definitions.
	Services []string `json:"services,omitempty"`
	// Templates are the paths (among Files, ending in .tmpl) to render.
	Templates []string `json:"templates,omitempty"`
	// Variables are visible to templates as .Vars.
	Variables map[string]string `json:"variables,omitempty"`
}

// File is one regular file of a bundle.
type File struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	Mode   Mode   `json:"mode"`
	SHA256 string `json:"sha256"`
}

// Mode holds permission bits only (no setuid, setgid or sticky bits). It is
// written as an octal string such as "0644" so that people can read it.
type Mode uint32

// MarshalJSON writes the mode as a four-digit octal string.
func (m Mode) MarshalJSON() ([]byte, error) {
	return []byte(fmt.Sprintf("%q", fmt.Sprintf("%04o", uint32(m)))), nil
}

// UnmarshalJSON reads a four-digit octal string.
func (m *Mode) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("mode must be an octal string such as \"0644\"")
	}
	if len(s) != 4 || s[0] != '0' {
		return fmt.Errorf("mode %q: want four octal digits such as \"0644\"", s)
	}
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o777 {
		return fmt.Errorf("mode %q: want permission bits only, such as \"0644\"", s)
	}
	*m = Mode(v)
	return nil
}

// Artifact references a binary by product and version, fetched either from
// a release-style store or from a plain URL, and pinned by SHA-256.
type Artifact struct {
	Product string `json:"product"`
	Version string `json:"version"`
	// Store is the base URL of a release-style store (index, SHA256SUMS,
	// signature). Exactly one of Store and URL is set.
	Store string `json:"store,omitempty"`
	// URL is a plain download URL; SHA256 is then required.
	URL    string `json:"url,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
}

// ParseManifest decodes and validates a manifest. Unknown fields, trailing
// data and duplicate or unsafe paths are errors.
func ParseManifest(b []byte) (*Manifest, error) {
	if len(b) > maxManifestBytes {
		return nil, fmt.Errorf("manifest: %d bytes is more than the limit of %d", len(b), maxManifestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("manifest: trailing data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Marshal encodes the manifest after validating it. The bytes returned are
// the ones to sign: the signature covers them exactly.
func (m *Manifest) Marshal() ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	return append(b, '\n'), nil
}

// Validate checks everything in the manifest that does not need the files.
func (m *Manifest) Validate() error {
	if m.Format != FormatVersion {
		return fmt.Errorf("manifest: format %d is not supported (want %d)", m.Format, FormatVersion)
	}
	if err := CheckName("cluster", m.Cluster); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if err := CheckName("role", m.Role); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if m.Version == 0 {
		return fmt.Errorf("manifest: version must be greater than 0")
	}
	if m.Expires.IsZero() {
		return fmt.Errorf("manifest: expires is missing")
	}
	if !m.Created.IsZero() && !m.Expires.After(m.Created) {
		return fmt.Errorf("manifest: expires %s is not after created %s", m.Expires.Format(time.RFC3339), m.Created.Format(time.RFC3339))
	}
	files := make(map[string]bool, len(m.Files))
	for i, f := range m.Files {
		if err := CheckPath(f.Path); err != nil {
			return fmt.Errorf("manifest: file %d: %w", i, err)
		}
		if files[f.Path] {
			return fmt.Errorf("manifest: file %q is listed twice", f.Path)
		}
		files[f.Path] = true
		if f.Size < 0 {
			return fmt.Errorf("manifest: file %q: negative size %d", f.Path, f.Size)
		}
		if f.Mode > 0o777 {
			return fmt.Errorf("manifest: file %q: mode %o has bits beyond permissions", f.Path, f.Mode)
		}
		if err := checkSHA256(f.SHA256); err != nil {
			return fmt.Errorf("manifest: file %q: %w", f.Path, err)
		}
	}
	// A path that is also a parent directory of another could not be
	// unpacked; say so here instead of half way through an unpack.
	for p := range files {
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if files[d] {
				return fmt.Errorf("manifest: %q is a file but also the directory of %q", d, p)
			}
		}
	}
	for _, s := range m.Services {
		if !files[s] {
			return fmt.Errorf("manifest: service definition %q is not among the files", s)
		}
	}
	for _, t := range m.Templates {
		if !files[t] {
			return fmt.Errorf("manifest: template %q is not among the files", t)
		}
		out, ok := strings.CutSuffix(t, TemplateSuffix)
		if !ok || path.Base(out) == "" || strings.HasSuffix(out, "/") {
			return fmt.Errorf("manifest: template %q: name must end in %s", t, TemplateSuffix)
		}
		if files[out] {
			return fmt.Errorf("manifest: template %q would overwrite the file %q", t, out)
		}
	}
	for i, a := range m.Artifacts {
		if a.Product == "" || a.Version == "" {
			return fmt.Errorf("manifest: artifact %d: product and version are required", i)
		}
		if (a.Store == "") == (a.URL == "") {
			return fmt.Errorf("manifest: artifact %s@%s: set exactly one of store and url", a.Product, a.Version)
		}
		if a.URL != "" || a.SHA256 != "" {
			if err := checkSHA256(a.SHA256); err != nil {
				return fmt.Errorf("manifest: artifact %s@%s: %w", a.Product, a.Version, err)
			}
		}
	}
	for k, v := range m.Variables {
		if k == "" || !utf8.ValidString(k) || !utf8.ValidString(v) {
			return fmt.Errorf("manifest: variable %q: names must be non-empty and names and values valid UTF-8", k)
		}
	}
	return nil
}

// File returns the manifest entry for p.
func (m *Manifest) File(p string) (File, bool) {
	for _, f := range m.Files {
		if f.Path == p {
			return f, true
		}
	}
	return File{}, false
}

func checkSHA256(s string) error {
	if len(s) != 64 {
		return fmt.Errorf("sha256 %q: want 64 lower-case hex digits", s)
	}
	if _, err := hex.DecodeString(s); err != nil || strings.ToLower(s) != s {
		return fmt.Errorf("sha256 %q: want 64 lower-case hex digits", s)
	}
	return nil
}

// CheckName accepts cluster and role names: 1 to 64 of [A-Za-z0-9._-], not
// starting with a dot, so that they are safe as path and URL segments.
func CheckName(what, s string) error {
	if s == "" || len(s) > 64 || s[0] == '.' {
		return fmt.Errorf("%s %q: want 1 to 64 of [A-Za-z0-9._-], not starting with a dot", what, s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%s %q: want 1 to 64 of [A-Za-z0-9._-], not starting with a dot", what, s)
		}
	}
	return nil
}

// CheckPath accepts a file path inside a bundle: relative, clean, no "."
// or ".." component, no empty component, valid UTF-8 without control
// characters, not one of the two manifest entry names, at most 1024 bytes.
func CheckPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("empty path")
	case len(p) > 1024:
		return fmt.Errorf("path %.40q...: longer than 1024 bytes", p)
	case !utf8.ValidString(p):
		return fmt.Errorf("path %q: not valid UTF-8", p)
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("path %q: absolute paths are refused", p)
	case p == ManifestName || p == SignatureName:
		return fmt.Errorf("path %q: reserved for the manifest", p)
	}
	for _, c := range p {
		if c < 0x20 || c == 0x7f || c == '\\' {
			return fmt.Errorf("path %q: control characters and backslashes are refused", p)
		}
	}
	for _, part := range strings.Split(p, "/") {
		switch part {
		case "..":
			return fmt.Errorf("path %q: \"..\" is refused (path traversal)", p)
		case ".", "":
			return fmt.Errorf("path %q: not clean (empty or \".\" component)", p)
		}
	}
	return nil
}
