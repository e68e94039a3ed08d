package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path"
	"sort"
	"strings"
	"time"
)

// Disks a machine finds by their virtio serial (or, for the data disk,
// a GPT partition of that name on its boot disk).
const (
	ConfigSerial = "steppe-config"
	DataSerial   = "steppe-data"
	DataLabel    = "steppe-data"
	// SecretsDir is where a machine's secrets are (tmpfs); init links the
	// agent's state_dir/secrets to it.
	SecretsDir = "/run/steppe/secrets"
	// KeysDir holds the trusted public keys the config disk brings.
	KeysDir = "/etc/steppe/keys"
	// APIPortName is the virtio-serial port through which the provider
	// reaches the agent's local API.
	APIPortName = "steppe.api"
	// machineFile and agentFile are the config disk's fixed entries;
	// every other entry is a file the machine gets at that path.
	machineFile = "machine.json"
	agentFile   = "agent.hcl"
	configMax   = 64 << 20
)

// MachineConfig is a machine's identity and network, from its config disk.
type MachineConfig struct {
	Name    string   `json:"name"`
	Address string   `json:"address"` // with its prefix, e.g. 10.213.0.5/24
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	Hosts   []string `json:"hosts,omitempty"` // extra /etc/hosts lines
}

// ConfigFile is a file the config disk puts on the machine.
type ConfigFile struct {
	Path string // absolute, on the machine; below /run or /etc
	Mode os.FileMode
	Data []byte
}

// ConfigDisk is everything a machine learns from its provider at boot.
type ConfigDisk struct {
	Machine MachineConfig
	Agent   []byte // the agent's config file (HCL)
	Files   []ConfigFile
}

// Validate says what is wrong with a machine's config.
func (c ConfigDisk) Validate() error {
	var errs []error
	if c.Machine.Name == "" {
		errs = append(errs, errors.New("machine name is empty"))
	}
	if _, err := netip.ParsePrefix(c.Machine.Address); err != nil {
		errs = append(errs, fmt.Errorf("machine address %q: want ADDRESS/PREFIX such as 10.213.0.5/24: %w", c.Machine.Address, err))
	}
	if c.Machine.Gateway != "" {
		if _, err := netip.ParseAddr(c.Machine.Gateway); err != nil {
			errs = append(errs, fmt.Errorf("gateway %q: %w", c.Machine.Gateway, err))
		}
	}
	if len(c.Agent) == 0 {
		errs = append(errs, errors.New("no agent config"))
	}
	for _, f := range c.Files {
		p := path.Clean(f.Path)
		if p != f.Path || !(strings.HasPrefix(p, "/run/") || strings.HasPrefix(p, "/etc/")) {
			return fmt.Errorf("config disk file %q: want a clean absolute path below /run or /etc", f.Path)
		}
	}
	return errors.Join(errs...)
}

// Marshal returns the disk's bytes: a tar (no filesystem: the machine
// needs no module to read it), padded to whole MiB. Files keep their
// modes; every time is zero so that the same config gives the same disk.
func (c ConfigDisk) Marshal() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	mj, err := json.MarshalIndent(c.Machine, "", "  ")
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, mode os.FileMode, data []byte) error {
		h := &tar.Header{Name: name, Mode: int64(mode.Perm()), Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("config disk: %s: %w", name, err)
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add(machineFile, 0o644, mj); err != nil {
		return nil, err
	}
	if err := add(agentFile, 0o600, c.Agent); err != nil {
		return nil, err
	}
	files := append([]ConfigFile(nil), c.Files...)
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	for _, f := range files {
		if err := add("files"+f.Path, f.Mode, f.Data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	b := buf.Bytes()
	if r := len(b) % mib; r != 0 {
		b = append(b, make([]byte, mib-r)...)
	}
	return b, nil
}

// WriteConfigDisk writes the disk to file, 0600: it holds the machine's
// secrets.
func WriteConfigDisk(file string, c ConfigDisk) error {
	b, err := c.Marshal()
	if err != nil {
		return err
	}
	if err := os.WriteFile(file, b, 0o600); err != nil {
		return fmt.Errorf("config disk: %w", err)
	}
	return os.Chmod(file, 0o600)
}

// ReadConfigDisk reads a config disk (a block device or its image).
func ReadConfigDisk(r io.Reader) (ConfigDisk, error) {
	var c ConfigDisk
	tr := tar.NewReader(io.LimitReader(r, configMax))
	seen := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return c, fmt.Errorf("config disk: %w", err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return c, fmt.Errorf("config disk: %s: %w", h.Name, err)
		}
		switch {
		case h.Name == machineFile:
			if err := json.Unmarshal(data, &c.Machine); err != nil {
				return c, fmt.Errorf("config disk: %s: %w", machineFile, err)
			}
			seen = true
		case h.Name == agentFile:
			c.Agent = data
		case strings.HasPrefix(h.Name, "files/"):
			c.Files = append(c.Files, ConfigFile{Path: strings.TrimPrefix(h.Name, "files"), Mode: os.FileMode(h.Mode).Perm(), Data: data})
		default:
			return c, fmt.Errorf("config disk: unexpected entry %q", h.Name)
		}
	}
	if !seen {
		return c, fmt.Errorf("config disk: no %s (is this a steppe config disk?)", machineFile)
	}
	return c, c.Validate()
}
