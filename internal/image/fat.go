package image

import (
	"encoding/binary"
	"fmt"
	"io"
	"sort"
	"strings"
)

// fatFile is a file of a FAT volume, by its path of 8.3 names.
type fatFile struct {
	Path string // e.g. EFI/BOOT/BOOTX64.EFI
	Data []byte
}

// fatNode is a directory or file while the volume is laid out.
type fatNode struct {
	name     [11]byte
	dir      bool
	data     []byte
	children map[string]*fatNode
	cluster  uint32
	clusters uint32
}

// writeFAT16 writes a FAT16 volume of sectors sectors at off in w holding
// files. FAT16 is enough for an EFI system partition (UEFI reads FAT12,
// 16 and 32) and far simpler to lay out than FAT32. Every time stamp is
// 1980-01-01 00:00 and the volume ID is given, so the volume depends on
// its inputs only. hidden is the partition's first sector on its disk.
func writeFAT16(w io.WriterAt, off int64, sectors, hidden uint32, volID uint32, files []fatFile) error {
	const reserved, nfats, rootEntries = 4, 2, 512
	rootSectors := uint32(rootEntries * 32 / sector)
	var spc, fatSz, clusters uint32
	for spc = 1; spc <= 128; spc *= 2 {
		tmp1 := sectors - (reserved + rootSectors)
		tmp2 := 256*spc + nfats
		fatSz = (tmp1 + tmp2 - 1) / tmp2
		clusters = (sectors - reserved - rootSectors - nfats*fatSz) / spc
		if clusters <= 65524 {
			break
		}
	}
	if spc > 128 || clusters < 4085 {
		return fmt.Errorf("fat16: a volume of %d sectors is outside FAT16's range (about 2-4000 MiB)", sectors)
	}
	clusterBytes := spc * sector

	root := &fatNode{dir: true, children: map[string]*fatNode{}}
	for _, f := range files {
		parts := strings.Split(f.Path, "/")
		n := root
		for i, p := range parts {
			name, err := shortName(p)
			if err != nil {
				return fmt.Errorf("fat16: %s: %w", f.Path, err)
			}
			c, ok := n.children[p]
			if !ok {
				c = &fatNode{name: name, dir: i < len(parts)-1, children: map[string]*fatNode{}}
				n.children[p] = c
			}
			if i == len(parts)-1 {
				if c.dir {
					return fmt.Errorf("fat16: %s is a directory and a file", f.Path)
				}
				c.data = f.Data
			}
			n = c
		}
	}
	// Allocate clusters depth first, in name order: directories, then
	// files, one contiguous run each.
	next := uint32(2)
	fat := make([]byte, fatSz*sector)
	binary.LittleEndian.PutUint16(fat[0:], 0xFFF8)
	binary.LittleEndian.PutUint16(fat[2:], 0xFFFF)
	var alloc func(n *fatNode) error
	alloc = func(n *fatNode) error {
		for _, k := range sortedKeys(n.children) {
			c := n.children[k]
			size := uint32(len(c.data))
			if c.dir {
				size = uint32(len(c.children)+2) * 32
			}
			c.clusters = (size + clusterBytes - 1) / clusterBytes
			if c.clusters > 0 {
				if next+c.clusters-2 > clusters {
					return fmt.Errorf("fat16: the files do not fit in %d clusters of %d bytes", clusters, clusterBytes)
				}
				c.cluster = next
				for i := range c.clusters {
					v := uint16(next + i + 1)
					if i == c.clusters-1 {
						v = 0xFFFF
					}
					binary.LittleEndian.PutUint16(fat[2*(next+i):], v)
				}
				next += c.clusters
			}
		}
		for _, k := range sortedKeys(n.children) {
			if c := n.children[k]; c.dir {
				if err := alloc(c); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := alloc(root); err != nil {
		return err
	}

	bs := make([]byte, sector)
	copy(bs, []byte{0xEB, 0x3C, 0x90})
	copy(bs[3:], "STEPPE  ")
	binary.LittleEndian.PutUint16(bs[11:], sector)
	bs[13] = byte(spc)
	binary.LittleEndian.PutUint16(bs[14:], reserved)
	bs[16] = nfats
	binary.LittleEndian.PutUint16(bs[17:], rootEntries)
	if sectors < 65536 {
		binary.LittleEndian.PutUint16(bs[19:], uint16(sectors))
	} else {
		binary.LittleEndian.PutUint32(bs[32:], sectors)
	}
	bs[21] = 0xF8
	binary.LittleEndian.PutUint16(bs[22:], uint16(fatSz))
	binary.LittleEndian.PutUint16(bs[24:], 63)
	binary.LittleEndian.PutUint16(bs[26:], 255)
	binary.LittleEndian.PutUint32(bs[28:], hidden)
	bs[36] = 0x80
	bs[38] = 0x29
	binary.LittleEndian.PutUint32(bs[39:], volID)
	copy(bs[43:], "NO NAME    ") // no label: fsck.fat wants one in the root directory too
	copy(bs[54:], "FAT16   ")
	bs[510], bs[511] = 0x55, 0xAA

	at := func(sec uint32) int64 { return off + int64(sec)*sector }
	dataStart := reserved + nfats*fatSz + rootSectors
	clusterAt := func(c uint32) int64 { return at(dataStart + (c-2)*spc) }
	put := func(b []byte, o int64) error {
		if _, err := w.WriteAt(b, o); err != nil {
			return fmt.Errorf("fat16: write: %w", err)
		}
		return nil
	}
	if err := put(bs, at(0)); err != nil {
		return err
	}
	for i := range uint32(nfats) {
		if err := put(fat, at(reserved+i*fatSz)); err != nil {
			return err
		}
	}
	dirBytes := func(n, parent *fatNode, isRoot bool) []byte {
		var b []byte
		if !isRoot {
			b = append(b, dirEntry(dotName("."), true, n.cluster, 0)...)
			pc := uint32(0)
			if parent != root {
				pc = parent.cluster
			}
			b = append(b, dirEntry(dotName(".."), true, pc, 0)...)
		}
		for _, k := range sortedKeys(n.children) {
			c := n.children[k]
			b = append(b, dirEntry(c.name, c.dir, c.cluster, uint32(len(c.data)))...)
		}
		return b
	}
	rootDir := dirBytes(root, nil, true)
	if len(rootDir) > rootEntries*32 {
		return fmt.Errorf("fat16: more than %d entries in the root directory", rootEntries)
	}
	if err := put(rootDir, at(reserved+nfats*fatSz)); err != nil {
		return err
	}
	var write func(n *fatNode) error
	write = func(n *fatNode) error {
		for _, k := range sortedKeys(n.children) {
			c := n.children[k]
			if c.dir {
				if err := put(dirBytes(c, n, false), clusterAt(c.cluster)); err != nil {
					return err
				}
				if err := write(c); err != nil {
					return err
				}
			} else if len(c.data) > 0 {
				if err := put(c.data, clusterAt(c.cluster)); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return write(root)
}

func sortedKeys(m map[string]*fatNode) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}

func dotName(s string) [11]byte {
	var n [11]byte
	copy(n[:], "           ")
	copy(n[:], s)
	return n
}

// shortName is an upper-case 8.3 name in a directory entry's form.
func shortName(s string) ([11]byte, error) {
	var n [11]byte
	copy(n[:], "           ")
	base, ext, _ := strings.Cut(s, ".")
	if base == "" || len(base) > 8 || len(ext) > 3 || strings.Contains(ext, ".") {
		return n, fmt.Errorf("%q is not an 8.3 name", s)
	}
	for _, r := range base + ext {
		if !(r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return n, fmt.Errorf("%q: only upper-case letters, digits, _ and - in an 8.3 name", s)
		}
	}
	copy(n[:8], base)
	copy(n[8:], ext)
	return n, nil
}

func dirEntry(name [11]byte, dir bool, cluster, size uint32) []byte {
	e := make([]byte, 32)
	copy(e, name[:])
	e[11] = 0x20
	if dir {
		e[11] = 0x10
		size = 0
	}
	const date1980 = 1<<5 | 1 // 1980-01-01
	binary.LittleEndian.PutUint16(e[16:], date1980)
	binary.LittleEndian.PutUint16(e[18:], date1980)
	binary.LittleEndian.PutUint16(e[24:], date1980)
	binary.LittleEndian.PutUint16(e[20:], uint16(cluster>>16))
	binary.LittleEndian.PutUint16(e[26:], uint16(cluster))
	binary.LittleEndian.PutUint32(e[28:], size)
	return e
}
