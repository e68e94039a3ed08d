package cluster

import (
	"fmt"
	"path"
	"slices"
	"syscall"
	"time"

	"github.com/hashicorp/hcl/v2"

	"github.com/steppe/steppe/internal/hcldecode"
)

// Nomad task drivers a pool may ask for (pool "web" { drivers = [...] }).
const (
	DriverRawExec = "raw_exec"
	DriverDocker  = "docker"
)

// Docker on a client (DESIGN decision 16): dockerd, with the containerd it
// starts and supervises itself, is a service of the client's agent, ready
// before Nomad, with everything of its own under the machine's data dir.
// Its binaries are the machine's (Debian's docker.io: /usr/sbin/dockerd
// and the docker CLI for the readiness probe), not artifacts: Docker is
// not built from Go module sources here, and an image carries its own.
const (
	serviceDockerd = "dockerd"
	// DockerdPath and DockerCLIPath are where Debian's docker.io installs them.
	DockerdPath   = "/usr/sbin/dockerd"
	DockerCLIPath = "/usr/bin/docker"
	// The data root and socket are under the machine's data dir. The
	// exec root is not: the containerd dockerd starts puts its sockets
	// below it, and containerd refuses a socket path of more than 104
	// bytes (seen: a test's data dir under /tmp made 112), so it is
	// /run/steppe-docker/<machine name>.
	dockerDataRoot = "docker"
	dockerSocket   = "docker.sock"
	// DockerExecRoot is the parent of every client's exec root.
	DockerExecRoot = "/run/steppe-docker"
)

// DefaultDrivers are the drivers of a pool that names none: raw_exec.
// Docker is asked for (drivers = ["raw_exec", "docker"]) because the
// machine must have dockerd.
func DefaultDrivers() []string { return []string{DriverRawExec} }

// PoolDrivers are the drivers pool's clients run.
func PoolDrivers(pool Pool) []string {
	if pool.Drivers == nil {
		return DefaultDrivers()
	}
	return pool.Drivers
}

// DockerSocketPath is the path of a client's Docker API socket, given its
// data dir: for the agent's image loading and the tests.
func DockerSocketPath(dataDir string) string { return path.Join(dataDir, dockerSocket) }

func decodeDrivers(a *hcl.Attribute, dst *[]string) hcl.Diagnostics {
	var ds []string
	diags := hcldecode.Expr(a.Expr, nil, &ds)
	if diags.HasErrors() {
		return diags
	}
	seen := map[string]bool{}
	for _, d := range ds {
		switch {
		case d != DriverRawExec && d != DriverDocker:
			return errAt(a.Expr.Range(), "Invalid driver", fmt.Sprintf("drivers: %q: want %q or %q", d, DriverRawExec, DriverDocker))
		case seen[d]:
			return errAt(a.Expr.Range(), "Duplicate driver", fmt.Sprintf("drivers: %q is named twice", d))
		}
		seen[d] = true
	}
	*dst = ds
	return nil
}

// dockerdService is dockerd as a client's service. On the local provider
// every machine shares the host's network namespace: no bridge and no
// iptables rules of its own (jobs use host networking). Elsewhere the
// machine has its own namespace, and dockerd its default bridge and
// iptables inside it.
func dockerdService(spec *Spec) ServiceDef {
	sock := path.Join(factDataDir, dockerSocket)
	args := []string{
		"--data-root=" + path.Join(factDataDir, dockerDataRoot),
		"--exec-root=" + path.Join(DockerExecRoot, factName),
		"--host=unix://" + sock,
		"--pidfile=" + path.Join(factDataDir, "docker.pid"),
		// The only cgroup driver here: there is no systemd.
		"--exec-opt=native.cgroupdriver=cgroupfs",
	}
	if spec.Provider.Name == "local" || spec.Provider.Name == "" {
		args = append(args, "--iptables=false", "--ip6tables=false", "--bridge=none")
	}
	return ServiceDef{
		Name:    serviceDockerd,
		Command: DockerdPath,
		Args:    args,
		Env:     []string{daemonPath},
		Dir:     path.Join(factDataDir, dockerDataRoot),
		// dockerd stops its containers on SIGTERM (no live restore):
		// a machine that stops leaves none running.
		StopSignal:  syscall.SIGTERM,
		StopTimeout: defaultStopTimeout,
		StopMode:    StopCgroup,
		Restart:     RestartAlways,
		Ready:       &Readiness{Command: []string{DockerCLIPath, "--host=unix://" + sock, "version"}, Timeout: 2 * time.Minute, Interval: 200 * time.Millisecond},
	}
}

// dockerPlugin is the config of Nomad's docker driver, matched to that
// dockerd: no privileged containers, no host volumes, and no garbage
// collection of images, which were loaded onto the machine (no registry
// to pull them again from).
func dockerPlugin() map[string]any {
	return map[string]any{"config": map[string]any{
		"endpoint":         "unix://" + path.Join(factDataDir, dockerSocket),
		"allow_privileged": false,
		"volumes":          map[string]any{"enabled": false},
		"gc":               map[string]any{"image": false, "container": true},
	}}
}

// dockerPlugins sets a client's Nomad plugins to its pool's drivers:
// raw_exec unless the pool leaves it out, docker when it asks for it.
func dockerPlugins(pool Pool, nomadCfg map[string]any) {
	plugins, _ := nomadCfg["plugin"].(map[string]any)
	if plugins == nil {
		return
	}
	drivers := PoolDrivers(pool)
	if !slices.Contains(drivers, DriverRawExec) {
		delete(plugins, DriverRawExec)
	}
	if slices.Contains(drivers, DriverDocker) {
		plugins[DriverDocker] = dockerPlugin()
	}
}

// dockerServices puts dockerd before Nomad on a client whose pool asks
// for the docker driver.
func dockerServices(spec *Spec, role Role, pool Pool, p *RolePlan) {
	if role != RoleClient || !slices.Contains(PoolDrivers(pool), DriverDocker) {
		return
	}
	for i := range p.Services {
		if p.Services[i].Name == serviceNomad {
			p.Services[i].After = append(p.Services[i].After, serviceDockerd)
		}
	}
	p.Services = append([]ServiceDef{dockerdService(spec)}, p.Services...)
}
