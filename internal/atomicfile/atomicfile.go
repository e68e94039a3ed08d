// Package atomicfile writes files so that a reader, or a crash, sees the old
// content or the new one, never a part of either.
package atomicfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
)

// WriteFile writes data to name with permissions perm.
func WriteFile(name string, data []byte, perm os.FileMode) error {
	return Write(name, perm, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// Write writes what write produces to name with permissions perm: into a
// temporary file in the same directory, synced, then renamed over name,
// and the directory synced so that the rename itself survives a crash. On
// any error before the rename name is left as it was; an error syncing
// the directory comes with the new file in place.
func Write(name string, perm os.FileMode, write func(io.Writer) error) error {
	p, err := Create(name, perm, write)
	if err != nil {
		return err
	}
	return p.Commit()
}

// Pending is a file written and synced under a temporary name beside its
// target, not yet in place: Commit, CommitNew or CommitAll puts it there,
// Discard drops it. It lets a caller check what was written, or write
// several files, before any of them replaces what readers see.
type Pending struct {
	fsys fsys
	tmp  string
	name string
	done bool
}

// Create writes what write produces to a temporary file beside name,
// with permissions perm, synced and closed, and returns it pending. The
// caller commits or discards it (Discard after a commit does nothing, so
// a deferred Discard is safe).
func Create(name string, perm os.FileMode, write func(io.Writer) error) (*Pending, error) {
	return create(host{}, name, perm, write)
}

// CreateIn is Create inside root: name is relative to it, and neither the
// temporary file, nor the rename, nor the sync of the directory reaches a
// name outside it (symbolic links included).
func CreateIn(root *os.Root, name string, perm os.FileMode, write func(io.Writer) error) (*Pending, error) {
	return create(root, name, perm, write)
}

func create(fsys fsys, name string, perm os.FileMode, write func(io.Writer) error) (*Pending, error) {
	var f *os.File
	tmp, err := tempName(name, func(tmp string) error {
		var err error
		// 0600 and then perm: a secret is never readable by others, even
		// for a moment, and perm is exact (no umask).
		f, err = fsys.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		return err
	})
	if err != nil {
		return nil, err
	}
	err = f.Chmod(perm)
	if err == nil {
		err = write(f)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		fsys.Remove(tmp)
		return nil, err
	}
	return &Pending{fsys: fsys, tmp: tmp, name: name}, nil
}

// TempName is the name of the temporary file (relative to the root for
// CreateIn), to read what was written before it is committed.
func (p *Pending) TempName() string { return p.tmp }

// Commit renames the file over its target and syncs the directory.
func (p *Pending) Commit() error {
	if err := p.rename(); err != nil {
		return err
	}
	return syncDir(p.fsys, filepath.Dir(p.name))
}

// CommitNew puts the file in place only if its target does not exist (a
// hard link, then the temporary name removed), so that of two writers
// starting at once only one wins; the other gets an error matching
// fs.ErrExist and the winner's file stays.
func (p *Pending) CommitNew() error {
	if p.done {
		return fmt.Errorf("commit %s: committed or discarded already", p.name)
	}
	p.done = true
	err := p.fsys.Link(p.tmp, p.name)
	p.fsys.Remove(p.tmp)
	if err != nil {
		return err
	}
	return syncDir(p.fsys, filepath.Dir(p.name))
}

// Discard removes the temporary file of a file not committed.
func (p *Pending) Discard() {
	if !p.done {
		p.done = true
		p.fsys.Remove(p.tmp)
	}
}

func (p *Pending) rename() error {
	if p.done {
		return fmt.Errorf("commit %s: committed or discarded already", p.name)
	}
	p.done = true
	if err := p.fsys.Rename(p.tmp, p.name); err != nil {
		p.fsys.Remove(p.tmp)
		return err
	}
	return nil
}

// CommitAll renames files over their targets in order, then syncs each
// of their directories once. Should a rename fail, the files before it
// are in place and those after it are discarded.
func CommitAll(ps ...*Pending) error {
	type dir struct {
		fsys fsys
		name string
	}
	var dirs []dir
	for i, p := range ps {
		if err := p.rename(); err != nil {
			for _, q := range ps[i+1:] {
				q.Discard()
			}
			return err
		}
		d := dir{p.fsys, filepath.Dir(p.name)}
		seen := false
		for _, e := range dirs {
			seen = seen || e == d
		}
		if !seen {
			dirs = append(dirs, d)
		}
	}
	for _, d := range dirs {
		if err := syncDir(d.fsys, d.name); err != nil {
			return err
		}
	}
	return nil
}

// Symlink makes name a symbolic link to target, replacing what name was
// (a file or a link) in one rename: a reader resolves the old target or
// the new one, never neither.
func Symlink(target, name string) error {
	tmp, err := tempName(name, func(tmp string) error { return os.Symlink(target, tmp) })
	if err != nil {
		return err
	}
	p := &Pending{fsys: host{}, tmp: tmp, name: name}
	return p.Commit()
}

// SyncDir syncs the directory dir, so that the names created, renamed or
// removed in it survive a crash.
func SyncDir(dir string) error { return syncDir(host{}, dir) }

func syncDir(fsys fsys, dir string) error {
	d, err := fsys.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// tempName calls create with a hidden name beside name
// (".NAME.tmp-RANDOM") until create does not fail for the name being
// taken, and returns that name.
func tempName(name string, create func(tmp string) error) (string, error) {
	dir, base := filepath.Split(name)
	for range 100 {
		tmp := filepath.Join(dir, "."+base+".tmp-"+strconv.FormatUint(rand.Uint64(), 36))
		if err := create(tmp); !errors.Is(err, fs.ErrExist) {
			return tmp, err
		}
	}
	return "", fmt.Errorf("write %s: no free temporary name beside it after 100 tries", name)
}

// fsys is what a write needs of a file system: the host's, or an os.Root,
// which keeps every name inside its directory.
type fsys interface {
	OpenFile(name string, flag int, perm os.FileMode) (*os.File, error)
	Open(name string) (*os.File, error)
	Rename(oldname, newname string) error
	Link(oldname, newname string) error
	Remove(name string) error
}

type host struct{}

func (host) OpenFile(name string, flag int, perm os.FileMode) (*os.File, error) {
	return os.OpenFile(name, flag, perm)
}
func (host) Open(name string) (*os.File, error)   { return os.Open(name) }
func (host) Rename(oldname, newname string) error { return os.Rename(oldname, newname) }
func (host) Link(oldname, newname string) error   { return os.Link(oldname, newname) }
func (host) Remove(name string) error             { return os.Remove(name) }

// CopyFile copies the file src to dst as Write does: dst has the old
// content or all of src, never a part.
func CopyFile(src, dst string, perm os.FileMode) error {
	p, err := CreateCopy(src, dst, perm)
	if err != nil {
		return err
	}
	return p.Commit()
}

// CreateCopy is Create with the content of the file src.
func CreateCopy(src, dst string, perm os.FileMode) (*Pending, error) {
	in, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	return Create(dst, perm, func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	})
}
