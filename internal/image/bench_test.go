package image_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/steppe/steppe/internal/image"
)

// BenchmarkBuild: `steppe image build` of Debian's cloud kernel and a
// static steppe, raw; reports the disk's and the initramfs's sizes.
func BenchmarkBuild(b *testing.B) {
	kernel := bootPrereqs(b)
	dir := b.TempDir()
	steppe := buildSteppe(b, dir)
	var res image.Result
	b.ResetTimer()
	for i := range b.N {
		var err error
		res, err = image.Build(context.Background(), image.Options{Kernel: kernel, Steppe: steppe, Out: filepath.Join(dir, "img"+string(rune('a'+i%26)))})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	st, _ := os.Stat(res.Image)
	b.ReportMetric(float64(st.Size())/(1<<20), "MiB-image")
	b.ReportMetric(float64(res.Initrd)/(1<<20), "MiB-initramfs")
	b.ReportMetric(float64(res.UKI)/(1<<20), "MiB-efi")
}

// BenchmarkBoot: VM start to the agent answering status through the API
// port (agent-s), and to its first service ready (ready-s), under TCG
// here (KVM where /dev/kvm exists); direct kernel boot and UEFI (OVMF).
// Run it under the e2e lock.
func BenchmarkBoot(b *testing.B) {
	kernel := bootPrereqs(b)
	dir := b.TempDir()
	steppe := buildSteppe(b, dir)
	img := filepath.Join(dir, "steppe.img")
	bootDir := filepath.Join(dir, "boot")
	if _, err := image.Build(context.Background(), image.Options{Kernel: kernel, Steppe: steppe, Out: img, BootDir: bootDir}); err != nil {
		b.Fatal(err)
	}
	bridge(b, "stqimg0")
	cfg := filepath.Join(dir, "config.img")
	if err := image.WriteConfigDisk(cfg, image.ConfigDisk{Machine: image.MachineConfig{Name: "vm1", Address: "10.213.30.2/24"}, Agent: []byte(agentHCL)}); err != nil {
		b.Fatal(err)
	}
	cmdline, _ := os.ReadFile(filepath.Join(bootDir, "cmdline"))
	for _, mode := range []string{"direct", "uefi"} {
		b.Run(mode, func(b *testing.B) {
			var agentSum, readySum time.Duration
			for i := range b.N {
				vm := image.VM{Dir: filepath.Join(dir, mode, string(rune('a'+i%26))), ConfigDisk: cfg, DataDisk: filepath.Join(dir, mode+"-data.img"), Tap: "stqimg0"}
				if mode == "direct" {
					vm.Kernel, vm.Initrd, vm.Cmdline = filepath.Join(bootDir, "vmlinuz"), filepath.Join(bootDir, "initrd.img"), string(cmdline)
				} else {
					vm.Image = img
				}
				if err := image.MakeDisk(vm.DataDisk, 256<<20); err != nil {
					b.Fatal(err)
				}
				agentAt, readyAt, stop := bootTimes(b, vm)
				stop()
				if i == b.N-1 {
					// Where the time went, by init's own clock (since it started).
					for _, l := range strings.Split(console(vm), "\n") {
						if strings.Contains(l, "since_boot") || strings.Contains(l, "agent started") || strings.Contains(l, "steppe init starting") {
							b.Log(l)
						}
					}
				}
				agentSum += agentAt
				readySum += readyAt
			}
			b.ReportMetric(agentSum.Seconds()/float64(b.N), "agent-s")
			b.ReportMetric(readySum.Seconds()/float64(b.N), "ready-s")
		})
	}
}
