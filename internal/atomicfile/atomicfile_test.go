package atomicfile

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "secret")
	if err := WriteFile(name, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(name, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(name)
	if err != nil || string(b) != "two" {
		t.Fatalf("content %q, %v", b, err)
	}
	fi, err := os.Stat(name)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", fi.Mode(), err)
	}
	assertOnly(t, dir, "secret")
}

// A failed write leaves the old file as it was and no temporary behind.
func TestFailedWriteKeepsOld(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "f")
	if err := WriteFile(name, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	err := Write(name, 0o644, func(w io.Writer) error {
		w.Write([]byte("half"))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	if b, _ := os.ReadFile(name); string(b) != "old" {
		t.Fatalf("content %q after a failed write", b)
	}
	assertOnly(t, dir, "f")
	if err := WriteFile(filepath.Join(dir, "missing", "f"), nil, 0o644); err == nil {
		t.Fatal("no error writing into a missing directory")
	}
}

func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != len(names) {
		var got []string
		for _, e := range ents {
			got = append(got, e.Name())
		}
		t.Fatalf("dir holds %q, want %q", got, names)
	}
}

// A pending file can be read under its temporary name while the target
// still holds the old content; Discard leaves nothing behind.
func TestCreateCheckCommit(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "snap")
	if err := WriteFile(name, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := Create(name, 0o600, func(w io.Writer) error {
		_, err := io.WriteString(w, "new")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p.TempName()); err != nil || string(b) != "new" {
		t.Fatalf("pending content %q, %v", b, err)
	}
	if b, _ := os.ReadFile(name); string(b) != "old" {
		t.Fatalf("target %q before the commit", b)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	p.Discard() // after a commit: nothing
	if b, _ := os.ReadFile(name); string(b) != "new" {
		t.Fatalf("target %q after the commit", b)
	}
	if err := p.Commit(); err == nil {
		t.Error("a second commit of one pending file succeeded")
	}
	q, err := Create(name, 0o600, func(w io.Writer) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	q.Discard()
	if b, _ := os.ReadFile(name); string(b) != "new" {
		t.Fatalf("target %q after a discard", b)
	}
	assertOnly(t, dir, "snap")
}

// Of two writers of one new file, the first to commit wins; the other
// gets fs.ErrExist, the winner's content stays, no temporary is left.
func TestCommitNew(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "key")
	var ps []*Pending
	for _, s := range []string{"first", "second"} {
		p, err := Create(name, 0o600, func(w io.Writer) error {
			_, err := io.WriteString(w, s)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	if err := ps[0].CommitNew(); err != nil {
		t.Fatal(err)
	}
	if err := ps[1].CommitNew(); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second CommitNew: %v, want fs.ErrExist", err)
	}
	if b, _ := os.ReadFile(name); string(b) != "first" {
		t.Fatalf("content %q, want the first writer's", b)
	}
	fi, err := os.Stat(name)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", fi.Mode(), err)
	}
	assertOnly(t, dir, "key")
}

// CommitAll puts every file in place; a rename that fails (onto a
// directory) keeps the files before it and discards those after it.
func TestCommitAll(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	pending := func(names ...string) []*Pending {
		var ps []*Pending
		for _, n := range names {
			p, err := Create(filepath.Join(dir, n), 0o644, func(w io.Writer) error {
				_, err := io.WriteString(w, n)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			ps = append(ps, p)
		}
		return ps
	}
	if err := CommitAll(pending("a", "sub/b", "c")...); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "sub/b", "c"} {
		if b, _ := os.ReadFile(filepath.Join(dir, n)); string(b) != n {
			t.Fatalf("%s holds %q", n, b)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "d", "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := CommitAll(pending("e", "d", "f")...); err == nil {
		t.Fatal("renaming a file over a directory succeeded")
	}
	if _, err := os.Stat(filepath.Join(dir, "e")); err != nil {
		t.Errorf("the file before the failed rename: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "f")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the file after the failed rename: %v, want none", err)
	}
	assertOnly(t, dir, "a", "c", "d", "e", "sub")
	assertOnly(t, filepath.Join(dir, "sub"), "b")
}

// CreateIn writes inside its root and refuses a name that leads out of
// it, through .. or a symbolic link.
func TestCreateInStaysInside(t *testing.T) {
	outside := t.TempDir()
	dir := t.TempDir()
	if err := os.Symlink(outside, filepath.Join(dir, "out")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "in"), 0o755); err != nil {
		t.Fatal(err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	write := func(w io.Writer) error {
		_, err := io.WriteString(w, "x")
		return err
	}
	p, err := CreateIn(root, "in/ok", 0o640, write)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "in", "ok"))
	if err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("in/ok: %v, %v", fi, err)
	}
	for _, name := range []string{"out/leak", "../" + filepath.Base(outside) + "/leak"} {
		if p, err := CreateIn(root, name, 0o644, write); err == nil {
			p.Discard()
			t.Errorf("CreateIn %q succeeded", name)
		}
	}
	assertOnly(t, outside)
	assertOnly(t, filepath.Join(dir, "in"), "ok")
}

func TestSymlink(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "current")
	for _, target := range []string{"1", "2"} {
		if err := Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		if got, err := os.Readlink(link); err != nil || got != target {
			t.Fatalf("link -> %q, %v; want %q", got, err, target)
		}
	}
	assertOnly(t, dir, "current")
	if err := Symlink("1", filepath.Join(dir, "missing", "current")); err == nil {
		t.Fatal("no error making a link in a missing directory")
	}
}

// helperEnv names the directory TestHelperWrites writes in when the test
// binary runs as the traced helper of TestWritesAreDurable.
const helperEnv = "STEPPE_ATOMICFILE_HELPER_DIR"

// TestHelperWrites does one write of each kind; it does nothing unless
// run by TestWritesAreDurable.
func TestHelperWrites(t *testing.T) {
	dir := os.Getenv(helperEnv)
	if dir == "" {
		return
	}
	write := func(w io.Writer) error {
		_, err := io.WriteString(w, "x")
		return err
	}
	if err := Write(filepath.Join(dir, "write"), 0o644, write); err != nil {
		t.Fatal(err)
	}
	p, err := Create(filepath.Join(dir, "new"), 0o600, write)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CommitNew(); err != nil {
		t.Fatal(err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	var ps []*Pending
	for _, n := range []string{"sub/a", "sub/b"} {
		p, err := CreateIn(root, n, 0o644, write)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	if err := CommitAll(ps...); err != nil {
		t.Fatal(err)
	}
	if err := Symlink("write", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
}

// Every file is synced before it is renamed or linked into place, and its
// directory after, as strace sees it.
func TestWritesAreDurable(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	lines := testenv.Strace(t, "fsync,fdatasync,rename,renameat,renameat2,link,linkat,symlink,symlinkat", []string{helperEnv + "=" + dir}, "-test.run=^TestHelperWrites$", "-test.count=1")
	// A name in a call: either absolute, or after a directory descriptor
	// (-y prints its path), as through an os.Root.
	arg := `(?:(?:AT_FDCWD|\d+)(?:<([^>]+)>)?, )?"([^"]+)"`
	move := regexp.MustCompile(`(rename|link|symlink)(?:at2?)?\(` + arg + `, ` + arg)
	fsync := regexp.MustCompile(`f(?:data)?sync\(\d+<([^>]+)>`)
	abs := func(dir, name string) string {
		if filepath.IsAbs(name) {
			return name
		}
		return filepath.Join(dir, name)
	}
	var synced, links []string
	placed := map[string]bool{}
	for i, line := range lines {
		if m := fsync.FindStringSubmatch(line); m != nil {
			synced = append(synced, m[1])
			continue
		}
		m := move.FindStringSubmatch(line)
		if m == nil || strings.Contains(line, "= -1") {
			continue
		}
		kind, src, dst := m[1], abs(m[2], m[3]), abs(m[4], m[5])
		if kind == "symlink" {
			links = append(links, dst) // a link has no content to sync
			continue
		}
		if !strings.HasPrefix(dst, dir+"/") || strings.HasPrefix(filepath.Base(dst), ".") {
			continue // making a temporary, or not the helper's
		}
		placed[strings.TrimPrefix(dst, dir+"/")] = true
		if !slices.Contains(synced, src) && !slices.Contains(links, src) {
			t.Errorf("%s put in place by %s without an fsync first:\n%s", src, kind, strings.Join(lines[max(0, i-5):i+1], "\n"))
		}
		// The directory is synced before the next write begins (with the
		// sync of its temporary file, or a temporary link).
		dirSynced := false
		for _, next := range lines[i+1:] {
			fm := fsync.FindStringSubmatch(next)
			if fm != nil && fm[1] == filepath.Dir(dst) {
				dirSynced = true
				break
			}
			if fm != nil && strings.HasPrefix(filepath.Base(fm[1]), ".") || strings.Contains(next, "symlink") {
				break
			}
		}
		if !dirSynced {
			t.Errorf("%s of %s is not followed by an fsync of %s", kind, dst, filepath.Dir(dst))
		}
	}
	for _, n := range []string{"write", "new", "sub/a", "sub/b", "link"} {
		if !placed[n] {
			t.Errorf("no rename or link onto %s in the trace:\n%s", n, strings.Join(lines, "\n"))
		}
	}
}
