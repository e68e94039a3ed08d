package image

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"unicode/utf16"
)

const sector = 512

// GPT partition type GUIDs.
const (
	espType   = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" // EFI system partition
	linuxType = "0FC63DAF-8483-4772-8E79-3D69D8477DE4" // Linux filesystem data
)

// gptPart is one partition, in sectors.
type gptPart struct {
	Type  string   // a type GUID
	GUID  [16]byte // the partition's own GUID, already in on-disk order
	Name  string
	First uint64 // first sector
	Last  uint64 // last sector, inclusive
}

// guidBytes encodes a GUID string in GPT's mixed-endian order.
func guidBytes(s string) ([16]byte, error) {
	var g [16]byte
	var a uint32
	var b, c uint16
	var d [8]byte
	if _, err := fmt.Sscanf(s, "%08X-%04X-%04X-%02X%02X-%02X%02X%02X%02X%02X%02X", &a, &b, &c,
		&d[0], &d[1], &d[2], &d[3], &d[4], &d[5], &d[6], &d[7]); err != nil {
		return g, fmt.Errorf("GUID %q: %w", s, err)
	}
	binary.LittleEndian.PutUint32(g[0:], a)
	binary.LittleEndian.PutUint16(g[4:], b)
	binary.LittleEndian.PutUint16(g[6:], c)
	copy(g[8:], d[:])
	return g, nil
}

// writeGPT writes a protective MBR, the primary and backup GPT headers and
// partition arrays of a disk of sectors sectors. diskGUID is given, not
// random, so that the disk depends on its inputs only.
func writeGPT(w io.WriterAt, sectors uint64, diskGUID [16]byte, parts []gptPart) error {
	const entries, entrySize = 128, 128
	arraySectors := uint64(entries * entrySize / sector)
	if sectors < 2*(arraySectors+2)+1 {
		return fmt.Errorf("gpt: disk of %d sectors is too small", sectors)
	}
	last := sectors - 1
	firstUsable := 2 + arraySectors
	lastUsable := last - 1 - arraySectors

	mbr := make([]byte, sector)
	pe := mbr[446:]
	pe[4] = 0xEE // GPT protective
	pe[1], pe[2], pe[3] = 0x00, 0x02, 0x00
	pe[5], pe[6], pe[7] = 0xFF, 0xFF, 0xFF
	binary.LittleEndian.PutUint32(pe[8:], 1)
	binary.LittleEndian.PutUint32(pe[12:], uint32(min(sectors-1, 0xFFFFFFFF)))
	mbr[510], mbr[511] = 0x55, 0xAA
	if _, err := w.WriteAt(mbr, 0); err != nil {
		return fmt.Errorf("gpt: write protective MBR: %w", err)
	}

	array := make([]byte, entries*entrySize)
	for i, p := range parts {
		if p.First < firstUsable || p.Last > lastUsable || p.Last < p.First {
			return fmt.Errorf("gpt: partition %d (%s) spans sectors %d-%d outside %d-%d", i+1, p.Name, p.First, p.Last, firstUsable, lastUsable)
		}
		e := array[i*entrySize:]
		t, err := guidBytes(p.Type)
		if err != nil {
			return err
		}
		copy(e[0:], t[:])
		copy(e[16:], p.GUID[:])
		binary.LittleEndian.PutUint64(e[32:], p.First)
		binary.LittleEndian.PutUint64(e[40:], p.Last)
		for j, u := range utf16.Encode([]rune(p.Name)) {
			if j >= 36 {
				return fmt.Errorf("gpt: partition name %q longer than 36 characters", p.Name)
			}
			binary.LittleEndian.PutUint16(e[56+2*j:], u)
		}
	}
	arrayCRC := crc32.ChecksumIEEE(array)

	header := func(self, backup, arrayLBA uint64) []byte {
		h := make([]byte, sector)
		copy(h, "EFI PART")
		binary.LittleEndian.PutUint32(h[8:], 0x00010000)
		binary.LittleEndian.PutUint32(h[12:], 92)
		binary.LittleEndian.PutUint64(h[24:], self)
		binary.LittleEndian.PutUint64(h[32:], backup)
		binary.LittleEndian.PutUint64(h[40:], firstUsable)
		binary.LittleEndian.PutUint64(h[48:], lastUsable)
		copy(h[56:], diskGUID[:])
		binary.LittleEndian.PutUint64(h[72:], arrayLBA)
		binary.LittleEndian.PutUint32(h[80:], entries)
		binary.LittleEndian.PutUint32(h[84:], entrySize)
		binary.LittleEndian.PutUint32(h[88:], arrayCRC)
		binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h[:92]))
		return h
	}
	writes := []struct {
		off  uint64
		data []byte
	}{
		{1, header(1, last, 2)},
		{2, array},
		{last - arraySectors, array},
		{last, header(last, 1, last-arraySectors)},
	}
	for _, wr := range writes {
		if _, err := w.WriteAt(wr.data, int64(wr.off*sector)); err != nil {
			return fmt.Errorf("gpt: write at sector %d: %w", wr.off, err)
		}
	}
	return nil
}
