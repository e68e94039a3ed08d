package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/steppe/steppe/internal/supervise"
)

// A dockerd that stopped leaves mounts behind: an nsfs mount of its
// default network namespace under its exec root, and its data root
// bind-mounted on itself. When the agent stops every service (the machine
// stops, is scaled down or removed), it unmounts what a stopped dockerd
// left and removes its exec root, which is outside the machine's data dir
// (cluster.DockerExecRoot), so that the machine leaves nothing behind.
func (a *Agent) cleanDockerLeftovers() {
	var specs []supervise.Spec
	if rel := a.runningRelease(); rel != nil {
		for _, d := range rel.Services {
			specs = append(specs, d.Spec)
		}
	}
	specs = append(specs, a.currentConfig().Services...)
	for _, s := range specs {
		if filepath.Base(s.Command) != "dockerd" {
			continue
		}
		execRoot, dataRoot := dockerRoots(s.Args)
		var errs []error
		for _, dir := range []string{execRoot, dataRoot} {
			if dir == "" {
				continue
			}
			if _, err := unmountBelow(dir); err != nil {
				errs = append(errs, err)
			}
		}
		if execRoot != "" {
			if err := os.RemoveAll(execRoot); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", execRoot, err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			a.log.Error("cleaning up after dockerd", "service", s.Name, "err", err)
			continue
		}
		a.log.Info("cleaned up after dockerd: its mounts and exec root are gone", "service", s.Name, "exec_root", execRoot)
	}
}

// dockerRoots are dockerd's --exec-root and --data-root, as
// cluster.dockerdService writes them (--flag=value).
func dockerRoots(args []string) (execRoot, dataRoot string) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--exec-root="); ok && filepath.IsAbs(v) {
			execRoot = v
		}
		if v, ok := strings.CutPrefix(a, "--data-root="); ok && filepath.IsAbs(v) {
			dataRoot = v
		}
	}
	return execRoot, dataRoot
}
