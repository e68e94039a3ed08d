package image

import (
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// cpioEntry is one file, directory or symlink of an initramfs.
type cpioEntry struct {
	Name string // without a leading slash
	Mode uint32 // permission bits only
	Kind byte   // 'f', 'd' or 'l'
	Data []byte // contents, or the link's target
}

// newc mode type bits.
const (
	cpioDir  = 0o040000
	cpioFile = 0o100000
	cpioLink = 0o120000
)

// writeCpio writes entries as a newc ("070701") archive, the format the
// kernel unpacks into its rootfs. Parents come before children (sorted by
// name, every parent directory added), every time is zero and every
// owner root, so the archive depends on the entries only.
func writeCpio(w io.Writer, entries []cpioEntry) error {
	all := map[string]cpioEntry{}
	for _, e := range entries {
		e.Name = strings.TrimPrefix(path.Clean("/"+e.Name), "/")
		if e.Name == "" {
			continue
		}
		if old, ok := all[e.Name]; ok && !(old.Kind == 'd' && e.Kind == 'd') {
			return fmt.Errorf("initramfs: %s given twice", e.Name)
		}
		all[e.Name] = e
		for d := path.Dir(e.Name); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := all[d]; !ok {
				all[d] = cpioEntry{Name: d, Mode: 0o755, Kind: 'd'}
			}
		}
	}
	names := make([]string, 0, len(all))
	for n := range all {
		names = append(names, n)
	}
	sort.Strings(names)
	ino := uint32(1)
	for _, n := range names {
		e := all[n]
		mode := e.Mode & 0o7777
		nlink := uint32(1)
		switch e.Kind {
		case 'd':
			mode |= cpioDir
			nlink = 2
		case 'l':
			mode |= cpioLink
		default:
			mode |= cpioFile
		}
		if err := cpioRecord(w, ino, mode, nlink, n, e.Data); err != nil {
			return err
		}
		ino++
	}
	return cpioRecord(w, 0, 0, 1, "TRAILER!!!", nil)
}

func cpioRecord(w io.Writer, ino, mode, nlink uint32, name string, data []byte) error {
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("initramfs: write %s: %w", name, err)
	}
	if len(data) == 0 {
		return nil
	}
	if _, err := w.Write(data); err != nil {
		return fmt.Errorf("initramfs: write %s: %w", name, err)
	}
	if r := len(data) % 4; r != 0 {
		if _, err := w.Write(make([]byte, 4-r)); err != nil {
			return fmt.Errorf("initramfs: write %s: %w", name, err)
		}
	}
	return nil
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
