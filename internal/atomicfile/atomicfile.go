// Package atomicfile writes files so that a reader, or a crash, sees the old
// content or the new one, never a part of either.
package atomicfile

import (
	"io"
	"os"
	"path/filepath"
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
// any error name is left as it was.
func Write(name string, perm os.FileMode, write func(io.Writer) error) error {
	dir := filepath.Dir(name)
	f, err := os.CreateTemp(dir, "."+filepath.Base(name)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	// The mode is set before any byte is written: a secret is never
	// readable by others, even for a moment.
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := write(f); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, name); err != nil {
		return err
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
