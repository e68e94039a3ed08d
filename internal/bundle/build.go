package bundle

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// SpecName is an optional file at the top of a bundle directory that holds
// what the directory's files cannot say: artifacts, services, templates and
// variables. It is read by ReadSpec and not packed as a file.
const SpecName = "bundle.json"

// Spec is the content of SpecName.
type Spec struct {
	Artifacts []Artifact        `json:"artifacts,omitempty"`
	Services  []string          `json:"services,omitempty"`
	Templates []string          `json:"templates,omitempty"`
	Variables map[string]string `json:"variables,omitempty"`
}

// ReadSpec reads dir/bundle.json; a missing file is an empty Spec.
func ReadSpec(dir string) (Spec, error) {
	var s Spec
	b, err := os.ReadFile(filepath.Join(dir, SpecName))
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, err
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return s, fmt.Errorf("%s: %w", filepath.Join(dir, SpecName), err)
	}
	return s, nil
}

// Build packs the regular files under dir into a bundle written to w, with
// the manifest m (whose Files it fills in). When m.Templates is nil every
// file ending in .tmpl is a template; when m.Services is nil every file
// under services/ is a service definition. With key non-nil the bundle is
// signed; otherwise it must be signed later (SignBundle) before any agent
// accepts it. Symlinks and special files in dir are errors.
func Build(w io.Writer, dir string, m Manifest, key *PrivateKey) (*Manifest, error) {
	m.Files = nil
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() || rel == SpecName {
			return nil
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("build: %s: %s is not a regular file; bundles carry only regular files", p, d.Type())
		}
		if err := CheckPath(rel); err != nil {
			return fmt.Errorf("build: %s: %w", p, err)
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		sum, n, err := hashFile(p)
		if err != nil {
			return fmt.Errorf("build: %w", err)
		}
		m.Files = append(m.Files, File{Path: rel, Size: n, Mode: Mode(fi.Mode().Perm()), SHA256: sum})
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Path < m.Files[j].Path })
	if m.Templates == nil {
		for _, f := range m.Files {
			if strings.HasSuffix(f.Path, TemplateSuffix) {
				m.Templates = append(m.Templates, f.Path)
			}
		}
	}
	if m.Services == nil {
		for _, f := range m.Files {
			if strings.HasPrefix(f.Path, "services/") && !strings.HasSuffix(f.Path, TemplateSuffix) {
				m.Services = append(m.Services, f.Path)
			}
		}
	}
	if m.Format == 0 {
		m.Format = FormatVersion
	}
	raw, err := m.Marshal()
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	var sig []byte
	if key != nil {
		sig = Sign(*key, raw)
	}
	bw := newBundleWriter(w)
	if err := bw.head(raw, sig); err != nil {
		return nil, err
	}
	for _, f := range m.Files {
		if err := bw.addFromDisk(filepath.Join(dir, filepath.FromSlash(f.Path)), f); err != nil {
			return nil, err
		}
	}
	if err := bw.close(); err != nil {
		return nil, err
	}
	return &m, nil
}

// SignBundle copies the bundle read from r to w with a new signature by
// key, replacing any old one. It first checks that every file matches the
// manifest, so that a signature never vouches for an inconsistent bundle.
func SignBundle(ctx context.Context, r io.Reader, w io.Writer, key PrivateKey) (*Manifest, error) {
	s := &resignSink{bw: newBundleWriter(w), key: key}
	m, _, err := readBundle(ctx, r, readOptions{}, s)
	if err != nil {
		return nil, err
	}
	if err := s.bw.close(); err != nil {
		return nil, err
	}
	return m, nil
}

type resignSink struct {
	bw  *bundleWriter
	key PrivateKey
}

func (s *resignSink) manifest(raw, _ []byte, _ *Manifest) error {
	return s.bw.head(raw, Sign(s.key, raw))
}

func (s *resignSink) file(f File, r io.Reader) error {
	return s.bw.add(f, r)
}

// bundleWriter writes the canonical layout: manifest.json, manifest.sig
// (when signed), then the files in manifest order.
type bundleWriter struct {
	gz *gzip.Writer
	tw *tar.Writer
}

func newBundleWriter(w io.Writer) *bundleWriter {
	gz := gzip.NewWriter(w)
	return &bundleWriter{gz: gz, tw: tar.NewWriter(gz)}
}

func (b *bundleWriter) head(raw, sig []byte) error {
	if err := b.small(ManifestName, raw); err != nil {
		return err
	}
	if sig != nil {
		return b.small(SignatureName, sig)
	}
	return nil
}

func (b *bundleWriter) small(name string, data []byte) error {
	hdr := &tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data)), Format: tar.FormatPAX}
	if err := b.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := b.tw.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

func (b *bundleWriter) add(f File, r io.Reader) error {
	hdr := &tar.Header{Name: f.Path, Typeflag: tar.TypeReg, Mode: int64(f.Mode), Size: f.Size, Format: tar.FormatPAX}
	if err := b.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write %s: %w", f.Path, err)
	}
	if _, err := io.CopyN(b.tw, r, f.Size); err != nil {
		return fmt.Errorf("write %s: %w", f.Path, err)
	}
	return nil
}

func (b *bundleWriter) addFromDisk(name string, f File) error {
	fh, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("build: %w", err)
	}
	defer fh.Close()
	h := &hashReader{r: fh, h: sha256.New()}
	if err := b.add(f, h); err != nil {
		return fmt.Errorf("build: %w", err)
	}
	if hex.EncodeToString(h.h.Sum(nil)) != f.SHA256 {
		return fmt.Errorf("build: %s changed while the bundle was being built", name)
	}
	return nil
}

func (b *bundleWriter) close() error {
	if err := b.tw.Close(); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	if err := b.gz.Close(); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	return nil
}

func hashFile(name string) (string, int64, error) {
	f, err := os.Open(name)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("%s: %w", name, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
