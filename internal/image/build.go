package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/pe"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Paths inside the image.
const (
	InitPath     = "init"                  // the kernel runs /init of an initramfs
	ManifestPath = "etc/steppe/image.json" // what the image holds, for status and tests
	// DefaultStub is Debian's systemd-boot-efi stub that makes a kernel,
	// its initramfs and command line one EFI executable.
	DefaultStub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
	// DefaultCmdline is the kernel command line baked into the image:
	// nothing of a machine, nothing secret. The serial console is what the
	// provider logs; panic=-1 reboots instead of hanging on a panic.
	DefaultCmdline = "console=ttyS0 quiet panic=-1"
	// espName is the path firmware boots from a removable or fresh disk.
	espBootPath = "EFI/BOOT/BOOTX64.EFI"
	mib         = 1 << 20
)

// Options say what to build.
type Options struct {
	Kernel     string   // a bzImage (vmlinuz) with an EFI stub
	ModulesDir string   // lib/modules/<release> of that kernel
	Modules    []string // module names; nil: DefaultModules
	Steppe     string   // the steppe binary that becomes /init
	Stub       string   // the systemd EFI stub; "": DefaultStub
	Cmdline    string   // "": DefaultCmdline
	// Mke2fs is the mke2fs that formats the data disk on first boot,
	// carried with its shared libraries; "": the host's.
	Mke2fs string
	Out    string // the disk image to write
	Format string // "raw" (default) or "qcow2"
	// Size is the disk's size in bytes; 0: just what the EFI system
	// partition needs. Room beyond it becomes a steppe-data partition that
	// the machine formats on first boot (a cloud's single root volume).
	Size int64
	// BootDir, when set, also receives vmlinuz, initrd.img and cmdline
	// for QEMU's direct kernel boot (tests: no firmware to wait for).
	BootDir string
}

// Manifest is /etc/steppe/image.json.
type Manifest struct {
	Kernel  string   `json:"kernel"`  // the kernel's release
	Modules []string `json:"modules"` // files below lib/modules/<release>/
	Cmdline string   `json:"cmdline"`
	Mke2fs  string   `json:"mke2fs"`
}

// Result is what Build wrote.
type Result struct {
	Image    string
	Format   string
	Size     int64 // the disk's size (virtual size for qcow2)
	Release  string
	Initrd   int64 // the initramfs's size, compressed
	UKI      int64 // the EFI executable's size
	Manifest Manifest
}

// Build writes the image opts describe. The same inputs give the same
// bytes.
func Build(ctx context.Context, opts Options) (Result, error) {
	if opts.Kernel == "" || opts.Steppe == "" || opts.Out == "" {
		return Result{}, fmt.Errorf("image build: a kernel, a steppe binary and an output file are needed")
	}
	if opts.Format == "" {
		opts.Format = "raw"
	}
	if opts.Format != "raw" && opts.Format != "qcow2" {
		return Result{}, fmt.Errorf("image build: format %q: want raw or qcow2", opts.Format)
	}
	if opts.Stub == "" {
		opts.Stub = DefaultStub
	}
	if opts.Cmdline == "" {
		opts.Cmdline = DefaultCmdline
	}
	if opts.Modules == nil {
		opts.Modules = DefaultModules()
	}
	if opts.ModulesDir == "" {
		d, err := ModulesDirFor(opts.Kernel)
		if err != nil {
			return Result{}, err
		}
		opts.ModulesDir = d
	}
	release := filepath.Base(opts.ModulesDir)
	initrd, man, err := Initramfs(ctx, opts, release)
	if err != nil {
		return Result{}, err
	}
	kernel, err := os.ReadFile(opts.Kernel)
	if err != nil {
		return Result{}, fmt.Errorf("image build: kernel: %w", err)
	}
	if opts.BootDir != "" {
		if err := os.MkdirAll(opts.BootDir, 0o755); err != nil {
			return Result{}, fmt.Errorf("image build: %w", err)
		}
		for name, b := range map[string][]byte{"vmlinuz": kernel, "initrd.img": initrd, "cmdline": []byte(opts.Cmdline)} {
			if err := os.WriteFile(filepath.Join(opts.BootDir, name), b, 0o644); err != nil {
				return Result{}, fmt.Errorf("image build: boot files: %w", err)
			}
		}
	}
	tmp, err := os.MkdirTemp(filepath.Dir(opts.Out), ".image-build-")
	if err != nil {
		return Result{}, fmt.Errorf("image build: %w", err)
	}
	defer os.RemoveAll(tmp)
	uki, err := makeUKI(ctx, tmp, opts.Stub, kernel, initrd, opts.Cmdline, release)
	if err != nil {
		return Result{}, err
	}
	raw := filepath.Join(tmp, "disk.raw")
	size, err := writeDisk(raw, uki, opts.Size)
	if err != nil {
		return Result{}, err
	}
	res := Result{Image: opts.Out, Format: opts.Format, Size: size, Release: release, Initrd: int64(len(initrd)), UKI: int64(len(uki)), Manifest: man}
	if opts.Format == "qcow2" {
		out, err := exec.CommandContext(ctx, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, opts.Out).CombinedOutput()
		if err != nil {
			return Result{}, fmt.Errorf("image build: qemu-img convert to qcow2 (is qemu-utils installed?): %w: %s", err, bytes.TrimSpace(out))
		}
		return res, nil
	}
	if err := os.Rename(raw, opts.Out); err != nil {
		return Result{}, fmt.Errorf("image build: %w", err)
	}
	return res, nil
}

// ModulesDirFor finds the modules of a kernel file: beside it as a
// Debian package lays them out (boot/vmlinuz-R and lib/modules/R), else
// /lib/modules/R.
func ModulesDirFor(kernel string) (string, error) {
	base := filepath.Base(kernel)
	rel, ok := strings.CutPrefix(base, "vmlinuz-")
	if !ok {
		return "", fmt.Errorf("image build: kernel %s is not named vmlinuz-RELEASE: name its modules directory (lib/modules/RELEASE) too", kernel)
	}
	for _, d := range []string{filepath.Join(filepath.Dir(kernel), "..", "lib", "modules", rel), filepath.Join("/lib/modules", rel)} {
		if st, err := os.Stat(filepath.Join(d, "kernel")); err == nil && st.IsDir() {
			return filepath.Clean(d), nil
		}
	}
	return "", fmt.Errorf("image build: no modules for kernel %s (looked beside it and in /lib/modules/%s): name them", kernel, rel)
}

// Initramfs returns the image's root filesystem, a gzipped newc cpio:
// steppe as /init, the modules and their modules.dep, mke2fs with its
// libraries, and a few files every program expects.
func Initramfs(ctx context.Context, opts Options, release string) ([]byte, Manifest, error) {
	steppe, err := os.ReadFile(opts.Steppe)
	if err != nil {
		return nil, Manifest{}, fmt.Errorf("image build: steppe binary: %w", err)
	}
	mods, err := resolveModules(opts.ModulesDir, opts.Modules)
	if err != nil {
		return nil, Manifest{}, fmt.Errorf("image build: %w", err)
	}
	entries := []cpioEntry{
		{Name: InitPath, Mode: 0o755, Data: steppe},
		{Name: "etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/root:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n")},
		{Name: "etc/group", Mode: 0o644, Data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{Name: "etc/nsswitch.conf", Mode: 0o644, Data: []byte("passwd: files\ngroup: files\nhosts: files dns\n")},
		{Name: "sbin/init", Kind: 'l', Data: []byte("/init")},
	}
	for _, d := range []string{"proc", "sys", "dev", "run", "tmp", "var/lib/steppe", "root", "mnt"} {
		entries = append(entries, cpioEntry{Name: d, Mode: 0o755, Kind: 'd'})
	}
	man := Manifest{Kernel: release, Cmdline: opts.Cmdline}
	var dep bytes.Buffer
	if err := writeModulesDep(&dep, mods); err != nil {
		return nil, Manifest{}, err
	}
	mdir := "lib/modules/" + release + "/"
	entries = append(entries, cpioEntry{Name: mdir + ModulesDepFile, Mode: 0o644, Data: dep.Bytes()})
	for _, m := range mods {
		b, err := os.ReadFile(filepath.Join(opts.ModulesDir, filepath.FromSlash(m.Path)))
		if err != nil {
			return nil, Manifest{}, fmt.Errorf("image build: module %s: %w", m.Name, err)
		}
		entries = append(entries, cpioEntry{Name: mdir + m.Path, Mode: 0o644, Data: b})
		man.Modules = append(man.Modules, m.Path)
	}
	mk, err := programWithLibs(ctx, opts.Mke2fs, "mke2fs")
	if err != nil {
		return nil, Manifest{}, err
	}
	for _, f := range mk {
		entries = append(entries, cpioEntry{Name: f.path, Mode: 0o755, Data: f.data})
	}
	man.Mke2fs = mk[0].path
	// A steppe built with cgo loads the C library: carry what it needs.
	libs, err := sharedLibs(ctx, opts.Steppe)
	if err != nil {
		return nil, Manifest{}, err
	}
	have := map[string]bool{}
	for _, f := range mk {
		have[f.path] = true
	}
	for _, l := range libs {
		dst := strings.TrimPrefix(filepath.Clean(l), "/")
		if have[dst] {
			continue
		}
		b, err := os.ReadFile(l)
		if err != nil {
			return nil, Manifest{}, fmt.Errorf("image build: %s: %w", l, err)
		}
		have[dst] = true
		entries = append(entries, cpioEntry{Name: dst, Mode: 0o755, Data: b})
	}
	mj, err := json.MarshalIndent(man, "", "  ")
	if err != nil {
		return nil, Manifest{}, err
	}
	entries = append(entries, cpioEntry{Name: ManifestPath, Mode: 0o644, Data: append(mj, '\n')})

	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return nil, Manifest{}, err
	}
	if err := writeCpio(zw, entries); err != nil {
		return nil, Manifest{}, err
	}
	if err := zw.Close(); err != nil {
		return nil, Manifest{}, fmt.Errorf("image build: compress initramfs: %w", err)
	}
	return buf.Bytes(), man, nil
}

type progFile struct {
	path string // inside the image, no leading slash
	data []byte
}

// programWithLibs returns a host program (found on PATH when prog is
// "") and the shared libraries ldd says it loads, each at the path the
// program asks for, the program first.
func programWithLibs(ctx context.Context, prog, name string) ([]progFile, error) {
	if prog == "" {
		p, err := exec.LookPath(name)
		if err != nil {
			for _, d := range []string{"/usr/sbin", "/sbin"} {
				if _, err2 := os.Stat(filepath.Join(d, name)); err2 == nil {
					p, err = filepath.Join(d, name), nil
					break
				}
			}
		}
		if err != nil {
			return nil, fmt.Errorf("image build: no %s on this host (apt-get install e2fsprogs): %w", name, err)
		}
		prog = p
	}
	libs, err := sharedLibs(ctx, prog)
	if err != nil {
		return nil, err
	}
	files := []progFile{}
	for i, p := range append([]string{prog}, libs...) {
		b, err := os.ReadFile(p) // follows symlinks: the image holds the file at the name asked for
		if err != nil {
			return nil, fmt.Errorf("image build: %s: %w", p, err)
		}
		dst := strings.TrimPrefix(filepath.Clean(p), "/")
		if i == 0 {
			dst = "usr/sbin/" + name
		}
		files = append(files, progFile{path: dst, data: b})
	}
	return files, nil
}

// sharedLibs lists the shared libraries ldd says prog loads, sorted;
// none for a static binary.
func sharedLibs(ctx context.Context, prog string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", prog).CombinedOutput()
	if bytes.Contains(out, []byte("not a dynamic executable")) || bytes.Contains(out, []byte("statically linked")) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("image build: ldd %s: %w: %s", prog, err, bytes.TrimSpace(out))
	}
	re := regexp.MustCompile(`(?:=>\s*)?(/\S+)\s+\(0x`)
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			libs = append(libs, m[1])
		}
	}
	sort.Strings(libs)
	return libs, nil
}

// makeUKI joins the EFI stub, the kernel, the initramfs and the command
// line into one EFI executable (a unified kernel image): firmware boots
// it from the ESP with no boot loader and no boot entry, as a cloud does.
// objcopy places each section after the stub's own.
func makeUKI(ctx context.Context, tmp, stub string, kernel, initrd []byte, cmdline, release string) ([]byte, error) {
	f, err := pe.Open(stub)
	if err != nil {
		return nil, fmt.Errorf("image build: EFI stub %s (apt-get install systemd-boot-efi): %w", stub, err)
	}
	var end uint64
	base := uint64(0)
	switch oh := f.OptionalHeader.(type) {
	case *pe.OptionalHeader64:
		base = oh.ImageBase
	case *pe.OptionalHeader32:
		base = uint64(oh.ImageBase)
	}
	for _, s := range f.Sections {
		end = max(end, uint64(s.VirtualAddress)+uint64(s.VirtualSize))
	}
	f.Close()
	align := func(v uint64) uint64 { return (v + 0xFFFF) &^ 0xFFFF }
	osrel := fmt.Sprintf("NAME=steppe\nID=steppe\nPRETTY_NAME=\"steppe (%s)\"\n", release)
	sections := []struct {
		name string
		data []byte
	}{
		{".osrel", []byte(osrel)},
		{".cmdline", append([]byte(cmdline), 0)},
		{".linux", kernel},
		{".initrd", initrd},
	}
	args := []string{}
	vma := align(base + end)
	for _, s := range sections {
		p := filepath.Join(tmp, strings.TrimPrefix(s.name, "."))
		if err := os.WriteFile(p, s.data, 0o644); err != nil {
			return nil, fmt.Errorf("image build: %w", err)
		}
		args = append(args, "--add-section", s.name+"="+p, "--change-section-vma", fmt.Sprintf("%s=0x%x", s.name, vma))
		vma = align(vma + uint64(len(s.data)))
	}
	out := filepath.Join(tmp, "uki.efi")
	args = append(args, stub, out)
	if b, err := exec.CommandContext(ctx, "objcopy", args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("image build: objcopy (binutils) making the EFI executable: %w: %s", err, bytes.TrimSpace(b))
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("image build: %w", err)
	}
	return reproduciblePE(b)
}

// reproduciblePE zeroes the COFF time stamp objcopy sets to the clock and
// recomputes the optional header's checksum over the result.
func reproduciblePE(b []byte) ([]byte, error) {
	if len(b) < 0x40 {
		return nil, errors.New("image build: the EFI executable is truncated")
	}
	pe := int(binary.LittleEndian.Uint32(b[0x3c:]))
	sumAt := pe + 4 + 20 + 64
	if pe+4+20 > len(b) || sumAt+4 > len(b) || string(b[pe:pe+4]) != "PE\x00\x00" {
		return nil, errors.New("image build: the EFI executable has no PE header")
	}
	binary.LittleEndian.PutUint32(b[pe+8:], 0)
	binary.LittleEndian.PutUint32(b[sumAt:], 0)
	var sum uint64
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint64(binary.LittleEndian.Uint16(b[i:]))
		sum = (sum & 0xFFFF) + (sum >> 16)
	}
	if len(b)%2 == 1 {
		sum += uint64(b[len(b)-1])
		sum = (sum & 0xFFFF) + (sum >> 16)
	}
	sum = (sum & 0xFFFF) + (sum >> 16)
	binary.LittleEndian.PutUint32(b[sumAt:], uint32(sum)+uint32(len(b)))
	return b, nil
}

// writeDisk writes a GPT disk at path: the ESP with the UKI as the
// firmware's default boot file, and the rest, if size leaves any, as an
// empty steppe-data partition. It returns the disk's size.
func writeDisk(path string, uki []byte, size int64) (int64, error) {
	espBytes := (int64(len(uki))*11/10 + 4*mib + mib - 1) / mib * mib
	espFirst := int64(mib)
	need := espFirst + espBytes + mib
	if size == 0 {
		size = need
	}
	size = (size + mib - 1) / mib * mib
	if size < need {
		return 0, fmt.Errorf("image build: -size %d MiB is too small: the image needs %d MiB", size/mib, need/mib)
	}
	f, err := os.Create(path)
	if err != nil {
		return 0, fmt.Errorf("image build: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return 0, fmt.Errorf("image build: %w", err)
	}
	sum := sha256.Sum256(uki)
	guid := func(label string) [16]byte {
		h := sha256.Sum256(append([]byte(label), sum[:]...))
		var g [16]byte
		copy(g[:], h[:16])
		g[7] = g[7]&0x0F | 0x40 // version 4 (in GPT's byte order)
		g[8] = g[8]&0x3F | 0x80
		return g
	}
	parts := []gptPart{{Type: espType, GUID: guid("esp"), Name: "EFI system partition", First: uint64(espFirst / sector), Last: uint64((espFirst+espBytes)/sector - 1)}}
	if rest := size - mib - (espFirst + espBytes); rest >= 16*mib {
		parts = append(parts, gptPart{Type: linuxType, GUID: guid("data"), Name: DataLabel, First: uint64((espFirst + espBytes) / sector), Last: uint64((size-mib)/sector - 1)})
	}
	if err := writeGPT(f, uint64(size/sector), guid("disk"), parts); err != nil {
		return 0, fmt.Errorf("image build: %w", err)
	}
	vol := binary.LittleEndian.Uint32(sum[:4])
	if err := writeFAT16(f, espFirst, uint32(espBytes/sector), uint32(espFirst/sector), vol, []fatFile{{Path: espBootPath, Data: uki}}); err != nil {
		return 0, fmt.Errorf("image build: %w", err)
	}
	if err := f.Sync(); err != nil {
		return 0, fmt.Errorf("image build: %w", err)
	}
	return size, f.Close()
}

// CachedKernel returns the newest kernel scripts/kernel fetched into the
// steppe cache (cache/kernel/<version>/boot/vmlinuz-*).
func CachedKernel(cache string) (string, error) {
	dir := filepath.Join(cache, "kernel")
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		return "", fmt.Errorf("kernel cache: %w", err)
	}
	var best string
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(dir, e.Name(), ".complete")); err != nil {
			continue
		}
		k, _ := filepath.Glob(filepath.Join(dir, e.Name(), "boot", "vmlinuz-*"))
		if len(k) == 1 && (best == "" || versionLess(filepath.Dir(filepath.Dir(best)), filepath.Join(dir, e.Name()))) {
			best = k[0]
		}
	}
	if best == "" {
		return "", fmt.Errorf("no kernel in %s: run scripts/kernel (it fetches Debian's linux-image-cloud-amd64), or give -kernel PATH", dir)
	}
	return best, nil
}

// versionLess compares Debian-ish versions by their numeric fields.
func versionLess(a, b string) bool {
	fa := strings.FieldsFunc(filepath.Base(a), func(r rune) bool { return r < '0' || r > '9' })
	fb := strings.FieldsFunc(filepath.Base(b), func(r rune) bool { return r < '0' || r > '9' })
	for i := 0; i < len(fa) && i < len(fb); i++ {
		if len(fa[i]) != len(fb[i]) {
			return len(fa[i]) < len(fb[i])
		}
		if fa[i] != fb[i] {
			return fa[i] < fb[i]
		}
	}
	return len(fa) < len(fb)
}

// ParseSize reads a size such as 512M, 2G or 1073741824.
func ParseSize(s string) (int64, error) {
	if s == "" || s == "0" {
		return 0, nil
	}
	mult := int64(1)
	switch strings.ToUpper(s[len(s)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	}
	num := s
	if mult != 1 {
		num = s[:len(s)-1]
	}
	var n int64
	if _, err := fmt.Sscanf(num, "%d", &n); err != nil || n <= 0 || fmt.Sprint(n) != num {
		return 0, fmt.Errorf("size %q: want a number of bytes or one with K, M or G, such as 2G", s)
	}
	return n * mult, nil
}
