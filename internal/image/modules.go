package image

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// DefaultModules returns the modules every machine loads at boot, by
// name: the virtio PCI transport and its block, network, console (the
// API channel) and entropy devices, the ACPI power button and the event
// devices it reports on (a clean shutdown when the provider or a cloud
// asks for one). Their dependencies come along.
func DefaultModules() []string {
	return []string{"virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "button", "evdev"}
}

// ModulesDepFile is the file, below lib/modules/<release>/, that lists
// the image's modules and what each needs, in depmod's format.
const ModulesDepFile = "modules.dep"

// Module is one kernel module of a kernel's tree.
type Module struct {
	Name    string   // as modprobe names it: dashes read as underscores
	Path    string   // relative to lib/modules/<release>/
	Depends []string // names, from the module's .modinfo
}

// moduleName is the name of a module file: its base without .ko, with
// underscores for dashes, as the kernel and modprobe treat them alike.
func moduleName(file string) string {
	base := filepath.Base(file)
	base = strings.TrimSuffix(base, ".ko")
	return strings.ReplaceAll(base, "-", "_")
}

// scanModules indexes the modules under dir (lib/modules/<release>) by
// name, reading each one's dependencies from its .modinfo section (Debian's
// package ships no modules.dep: depmod makes it at install).
func scanModules(dir string) (map[string]Module, map[string]bool, error) {
	mods := map[string]Module{}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		mods[moduleName(p)] = Module{Name: moduleName(p), Path: filepath.ToSlash(rel)}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("kernel modules %s: %w", dir, err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[moduleName(l)] = true
		}
	}
	return mods, builtin, nil
}

// modinfoDepends reads the depends= entry of a module's .modinfo.
func modinfoDepends(file string) ([]string, error) {
	f, err := elf.Open(file)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", file, err)
	}
	defer f.Close()
	s := f.Section(".modinfo")
	if s == nil {
		return nil, fmt.Errorf("module %s: no .modinfo section (not a kernel module?)", file)
	}
	b, err := s.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: read .modinfo: %w", file, err)
	}
	var deps []string
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok && len(v) > 0 {
			for _, d := range strings.Split(string(v), ",") {
				deps = append(deps, moduleName(d))
			}
		}
	}
	return deps, nil
}

// resolveModules returns the named modules and everything they depend on,
// dependencies first. A name the kernel has built in is skipped; a name it
// has neither built in nor as a module is an error.
func resolveModules(dir string, names []string) ([]Module, error) {
	mods, builtin, err := scanModules(dir)
	if err != nil {
		return nil, err
	}
	var out []Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		name = moduleName(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel modules: dependency cycle through %s", name)
		case 2:
			return nil
		}
		m, ok := mods[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			if from != "" {
				return fmt.Errorf("kernel modules %s: %s (needed by %s) is neither a module nor built in", dir, name, from)
			}
			return fmt.Errorf("kernel modules %s: no module %q and none built in (is the name right? see %s/kernel)", dir, name, dir)
		}
		state[name] = 1
		deps, err := modinfoDepends(filepath.Join(dir, filepath.FromSlash(m.Path)))
		if err != nil {
			return err
		}
		m.Depends = deps
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		out = append(out, m)
		return nil
	}
	sorted := append([]string(nil), names...)
	sort.Strings(sorted)
	for _, n := range sorted {
		if err := visit(n, ""); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// writeModulesDep writes mods in depmod's format: "path: dep-path ...".
func writeModulesDep(w io.Writer, mods []Module) error {
	paths := map[string]string{}
	for _, m := range mods {
		paths[m.Name] = m.Path
	}
	for _, m := range mods {
		var deps []string
		for _, d := range m.Depends {
			if p, ok := paths[d]; ok {
				deps = append(deps, p)
			}
		}
		line := m.Path + ":"
		if len(deps) > 0 {
			line += " " + strings.Join(deps, " ")
		}
		if _, err := io.WriteString(w, line+"\n"); err != nil {
			return err
		}
	}
	return nil
}

// ModulesDep is a parsed modules.dep: each module's file and the files it
// needs, by module name.
type ModulesDep map[string]Module

// ParseModulesDep reads a modules.dep (depmod's, or an image's).
func ParseModulesDep(r io.Reader) (ModulesDep, error) {
	dep := ModulesDep{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		file, deps, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("modules.dep line %d: %q has no colon", n, line)
		}
		m := Module{Name: moduleName(strings.TrimSuffix(strings.TrimSuffix(file, ".xz"), ".zst")), Path: file}
		for _, d := range strings.Fields(deps) {
			m.Depends = append(m.Depends, moduleName(strings.TrimSuffix(strings.TrimSuffix(d, ".xz"), ".zst")))
		}
		dep[m.Name] = m
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.dep: %w", err)
	}
	return dep, nil
}

// Order returns the files to load for names, each after what it needs.
func (d ModulesDep) Order(names []string) ([]string, error) {
	var out []string
	done := map[string]bool{}
	var visit func(name string, depth int) error
	visit = func(name string, depth int) error {
		name = moduleName(name)
		if done[name] {
			return nil
		}
		if depth > 64 {
			return fmt.Errorf("modules.dep: dependency chain through %s too deep (a cycle?)", name)
		}
		m, ok := d[name]
		if !ok {
			return fmt.Errorf("modules.dep: no module %s in the image (build it with that module)", name)
		}
		for _, dep := range m.Depends {
			if err := visit(dep, depth+1); err != nil {
				return err
			}
		}
		done[name] = true
		out = append(out, m.Path)
		return nil
	}
	for _, n := range names {
		if err := visit(n, 0); err != nil {
			return nil, err
		}
	}
	return out, nil
}
