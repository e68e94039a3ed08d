package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
)

// kernelOrLack finds the kernel scripts/kernel cached.
func kernelOrLack(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("STEPPE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "steppe")
	}
	k, err := CachedKernel(cache)
	if err != nil {
		testenv.Lacks(t, "%v", err)
	}
	return k
}

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Lacks(t, "%s not installed (see .ci/run): %v", tool, err)
		}
	}
	if _, err := os.Stat(DefaultStub); err != nil {
		testenv.Lacks(t, "no EFI stub (apt-get install systemd-boot-efi): %v", err)
	}
}

func TestResolveModulesRealKernel(t *testing.T) {
	k := kernelOrLack(t)
	dir, err := ModulesDirFor(k)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := resolveModules(dir, []string{"virtio_net", "virtio-pci"})
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
	}
	// DESIGN's facts: virtio_net needs these; each loads after what it needs.
	for _, want := range []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "failover", "net_failover", "virtio_net"} {
		if _, ok := pos[want]; !ok {
			t.Errorf("%s missing from %v", want, mods)
		}
	}
	for _, m := range mods {
		for _, d := range m.Depends {
			if pd, ok := pos[d]; ok && pd > pos[m.Name] {
				t.Errorf("%s comes before its dependency %s", m.Name, d)
			}
		}
	}
	// What the image writes, init reads back in a loadable order.
	var b bytes.Buffer
	if err := writeModulesDep(&b, mods); err != nil {
		t.Fatal(err)
	}
	dep, err := ParseModulesDep(&b)
	if err != nil {
		t.Fatal(err)
	}
	order, err := dep.Order([]string{"virtio_net"})
	if err != nil {
		t.Fatal(err)
	}
	if last := order[len(order)-1]; !strings.HasSuffix(last, "/virtio_net.ko") || !strings.HasSuffix(order[0], "virtio_ring.ko") && !strings.HasSuffix(order[0], "failover.ko") {
		t.Errorf("load order %v", order)
	}
	if _, err := resolveModules(dir, []string{"no_such_module"}); err == nil || !strings.Contains(err.Error(), "no_such_module") {
		t.Errorf("unknown module: %v", err)
	}
	// ext4 is built into Debian's cloud kernel: no file, no error.
	if m, err := resolveModules(dir, []string{"ext4"}); err != nil || len(m) != 0 {
		t.Errorf("built-in ext4: %v %v", m, err)
	}
}

func TestParseModulesDepErrors(t *testing.T) {
	if _, err := ParseModulesDep(strings.NewReader("kernel/a.ko kernel/b.ko\n")); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("no colon: %v", err)
	}
	dep, err := ParseModulesDep(strings.NewReader("kernel/a.ko: kernel/b.ko\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dep.Order([]string{"a"}); err == nil || !strings.Contains(err.Error(), "no module b") {
		t.Errorf("missing dependency: %v", err)
	}
}

func TestConfigDiskRoundTrip(t *testing.T) {
	c := ConfigDisk{
		Machine: MachineConfig{Name: "vm1", Address: "10.213.0.5/24", DNS: []string{"10.213.0.1"}},
		Agent:   []byte("agent {}\n"),
		Files:   []ConfigFile{{Path: "/run/steppe/secrets/gossip.key", Mode: 0o600, Data: []byte("s3cret")}},
	}
	b, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if len(b)%mib != 0 {
		t.Errorf("disk of %d bytes is not whole MiB", len(b))
	}
	b2, _ := c.Marshal()
	if !bytes.Equal(b, b2) {
		t.Error("the same config gave two disks")
	}
	got, err := ReadConfigDisk(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if got.Machine.Name != "vm1" || string(got.Agent) != "agent {}\n" || len(got.Files) != 1 || got.Files[0].Mode != 0o600 || string(got.Files[0].Data) != "s3cret" {
		t.Errorf("read back %+v", got)
	}
	file := filepath.Join(t.TempDir(), "cfg.img")
	if err := WriteConfigDisk(file, c); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(file); st.Mode().Perm() != 0o600 {
		t.Errorf("config disk mode %v, want 0600 (it holds secrets)", st.Mode().Perm())
	}
	bad := c
	bad.Machine.Address = "10.213.0.5"
	if _, err := bad.Marshal(); err == nil || !strings.Contains(err.Error(), "ADDRESS/PREFIX") {
		t.Errorf("address without prefix: %v", err)
	}
	bad = c
	bad.Files = []ConfigFile{{Path: "/var/lib/x", Data: []byte("x")}}
	if _, err := bad.Marshal(); err == nil || !strings.Contains(err.Error(), "below /run or /etc") {
		t.Errorf("file outside /run and /etc: %v", err)
	}
	if _, err := ReadConfigDisk(bytes.NewReader(make([]byte, mib))); err == nil {
		t.Error("an empty disk read as a config disk")
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"": 0, "512M": 512 << 20, "2G": 2 << 30, "4096": 4096} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"x", "-1G", "1.5G", "G"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

// build makes an image of the cached kernel with this test binary as its
// /init (the bytes do not matter to these tests: nothing boots it).
func build(t *testing.T, out, format string, size int64) Result {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	res, err := Build(context.Background(), Options{Kernel: kernelOrLack(t), Steppe: exe, Out: out, Format: format, Size: size})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func sum(t *testing.T, file string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestReproducible: two builds of the same inputs are the same bytes, raw
// and qcow2.
func TestReproducible(t *testing.T) {
	needTools(t, "objcopy", "qemu-img")
	dir := t.TempDir()
	for _, format := range []string{"raw", "qcow2"} {
		a, b := filepath.Join(dir, "a."+format), filepath.Join(dir, "b."+format)
		build(t, a, format, 0)
		build(t, b, format, 0)
		if sum(t, a) != sum(t, b) {
			t.Errorf("%s: two builds of the same inputs differ", format)
		}
	}
}

// TestDiskLayout reads the image back with util-linux and the kernel's
// own FAT driver: a valid GPT (checksums and all) with the ESP and the
// data partition, and the EFI executable at the firmware's default path.
func TestDiskLayout(t *testing.T) {
	needTools(t, "objcopy", "sfdisk", "fsck.fat", "mcopy")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	res := build(t, img, "raw", 256<<20)
	out, err := exec.Command("sfdisk", "--json", img).CombinedOutput()
	if err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	if bytes.Contains(out, []byte("corrupt")) || bytes.Contains(out, []byte("checksum")) {
		t.Fatalf("sfdisk complains:\n%s", out)
	}
	var pt struct {
		PartitionTable struct {
			Label      string `json:"label"`
			Partitions []struct {
				Start, Size int64
				Type, Name  string
			} `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal(out[bytes.IndexByte(out, '{'):], &pt); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	p := pt.PartitionTable
	if p.Label != "gpt" || len(p.Partitions) != 2 || p.Partitions[0].Type != espType || p.Partitions[1].Name != DataLabel {
		t.Fatalf("partitions %+v", p)
	}
	if res.Size != 256<<20 {
		t.Errorf("size %d", res.Size)
	}
	// The ESP as a file of its own: fsck.fat checks it and mtools reads
	// it (the kernel here has no vfat module to mount it).
	esp := p.Partitions[0]
	disk, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	espFile := filepath.Join(dir, "esp.img")
	if err := os.WriteFile(espFile, disk[esp.Start*512:(esp.Start+esp.Size)*512], 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("fsck.fat", "-n", "-v", espFile).CombinedOutput(); err != nil || !bytes.Contains(out, []byte("16 bit entries")) {
		t.Fatalf("fsck.fat: %v\n%s", err, out)
	}
	efiFile := filepath.Join(dir, "BOOTX64.EFI")
	if out, err := exec.Command("mcopy", "-i", espFile, "::EFI/BOOT/BOOTX64.EFI", efiFile).CombinedOutput(); err != nil {
		t.Fatalf("mcopy: %v\n%s", err, out)
	}
	efi, err := os.ReadFile(efiFile)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(efi)) != res.UKI || string(efi[:2]) != "MZ" {
		t.Errorf("BOOTX64.EFI: %d bytes starting %q; the build made %d", len(efi), efi[:2], res.UKI)
	}
	if out, err := exec.Command("objdump", "-h", efiFile).CombinedOutput(); err != nil || !bytes.Contains(out, []byte(".initrd")) || !bytes.Contains(out, []byte(".linux")) {
		t.Errorf("the EFI executable lacks its kernel or initramfs section: %v\n%s", err, out)
	}
	if _, err := Build(context.Background(), Options{Kernel: kernelOrLack(t), Steppe: img, Out: filepath.Join(dir, "x"), Size: 1 << 20}); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Errorf("a disk too small: %v", err)
	}
}
