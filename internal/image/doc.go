// Package image builds steppe's machine images (DESIGN decision 15): a
// Linux kernel, the few modules a machine needs and steppe itself as
// /init, packed as an initramfs inside a unified kernel image on the EFI
// system partition of a GPT disk (raw, or qcow2 through qemu-img). The
// root filesystem is the initramfs, in RAM, the same on every boot: the
// machine's state lives on its data disk and its identity on its config
// disk (configdisk.go), never in the image.
//
// Everything written is a function of the inputs (kernel, modules, the
// steppe binary, the systemd EFI stub, mke2fs and its libraries): no
// clock, no random GUID. Two builds of the same inputs give the same bytes.
package image
