package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/steppe/steppe/internal/image"
)

func runImage(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] != "build" {
		return fmt.Errorf("%w: steppe image build [-kernel PATH] [-out FILE] [-format raw|qcow2] [-size SIZE]", errUsage)
	}
	fs := flag.NewFlagSet("steppe image build", flag.ContinueOnError)
	kernel := fs.String("kernel", "", "a kernel (vmlinuz with an EFI stub); default: Debian's cloud kernel from the steppe cache (scripts/kernel)")
	modules := fs.String("modules", "", "that kernel's lib/modules/RELEASE; default: beside the kernel or /lib/modules/RELEASE")
	out := fs.String("out", "steppe.img", "the image file to write")
	format := fs.String("format", "raw", "raw (GPT, EFI system partition) or qcow2")
	size := fs.String("size", "", "the disk's size (e.g. 2G); room beyond the boot partition becomes a data partition formatted on first boot")
	steppe := fs.String("steppe", "", "the steppe binary to make /init; default: this one")
	bootDir := fs.String("boot-dir", "", "also write vmlinuz, initrd.img and cmdline here, for QEMU's direct kernel boot")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: steppe image build takes flags only, got %q", errUsage, fs.Args())
	}
	sz, err := image.ParseSize(*size)
	if err != nil {
		return fmt.Errorf("%w: -size: %w", errUsage, err)
	}
	if *kernel == "" {
		cache := os.Getenv("STEPPE_CACHE")
		if cache == "" {
			home, _ := os.UserHomeDir()
			cache = filepath.Join(home, ".cache", "steppe")
		}
		if *kernel, err = image.CachedKernel(cache); err != nil {
			return err
		}
	}
	if *steppe == "" {
		if *steppe, err = os.Executable(); err != nil {
			return fmt.Errorf("find this steppe binary: %w", err)
		}
	}
	start := time.Now()
	res, err := image.Build(ctx, image.Options{Kernel: *kernel, ModulesDir: *modules, Steppe: *steppe, Out: *out, Format: *format, Size: sz, BootDir: *bootDir})
	if err != nil {
		return err
	}
	st, err := os.Stat(res.Image)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s image, %d MiB disk (%d MiB file), kernel %s, %d modules, initramfs %d KiB, built in %s\n",
		res.Image, res.Format, res.Size>>20, st.Size()>>20, res.Release, len(res.Manifest.Modules), res.Initrd>>10, time.Since(start).Round(time.Millisecond))
	return nil
}
