package upgrade

import (
	"fmt"

	version "github.com/hashicorp/go-version"
)

// CheckVersions applies steppe's version policy to moving product from
// the version a cluster runs to another: no downgrade (raft servers may
// not read what a newer version wrote) and no jump of more than one minor
// version or across a major one (HashiCorp tests and documents upgrades
// from one minor release to the next), unless forced. from == to is fine:
// there is nothing to do.
func CheckVersions(product, from, to string, force bool) error {
	f, err := version.NewVersion(from)
	if err != nil {
		return fmt.Errorf("%s: the running version %q: %w", product, from, err)
	}
	t, err := version.NewVersion(to)
	if err != nil {
		return fmt.Errorf("%s: the target version %q: %w", product, to, err)
	}
	if force {
		return nil
	}
	fs, ts := f.Segments(), t.Segments()
	switch {
	case t.LessThan(f):
		return fmt.Errorf("%s %s → %s is a downgrade: refused (servers may not read the raft log a newer version wrote; restore a snapshot instead, or force)", product, from, to)
	case ts[0] != fs[0]:
		return fmt.Errorf("%s %s → %s crosses a major version: refused (upgrade to the last %d.x first, read the upgrade guide, or force)", product, from, to, fs[0])
	case ts[1] > fs[1]+1:
		return fmt.Errorf("%s %s → %s jumps %d minor versions: refused (HashiCorp supports one minor version at a time: upgrade to %d.%d.x first, or force)", product, from, to, ts[1]-fs[1], fs[0], fs[1]+1)
	}
	return nil
}

// crosses says whether moving from → to installs release rel for the
// first time: from < rel <= to, comparing cores (1.10.0-beta counts as 1.10.0).
func crosses(from, to, rel string) (bool, error) {
	f, err := version.NewVersion(from)
	if err != nil {
		return false, err
	}
	t, err := version.NewVersion(to)
	if err != nil {
		return false, err
	}
	r, err := version.NewVersion(rel)
	if err != nil {
		return false, err
	}
	return f.Core().LessThan(r) && t.Core().GreaterThanOrEqual(r), nil
}
