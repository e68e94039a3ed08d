package provider

import (
	"fmt"
	"strings"
)

// The agent of an ssh host is a service of the host's own init system:
// the init starts it at boot and restarts it when it dies. Each init is
// told, in its own idiom, to signal only the agent's main process when it
// stops or restarts it: the daemons the agent supervises live in cgroups
// of their own below the agent's and must outlive an agent restart (the
// new agent adopts them). They are stopped by the agent itself on SIGTERM,
// or by Destroy.
//
//   - systemd: a unit with Delegate=yes (the agent owns the cgroup subtree
//     below its unit's) and KillMode=process (stop and restart signal the
//     main process only, never the rest of the unit's cgroup).
//   - OpenRC: an openrc-run script with supervisor=supervise-daemon, which
//     respawns the agent; supervise-daemon signals only the pid it
//     started, and no rc_cgroup_cleanup is set, so nothing else is killed.
//   - runit: a service directory with run and log/run (svlogd); runsv
//     signals only the process of ./run.

// Init is an init system the ssh provider can install the agent under.
type Init string

// The init systems the ssh provider knows.
const (
	InitSystemd Init = "systemd"
	InitOpenRC  Init = "openrc"
	InitRunit   Init = "runit"
)

// Paths of steppe on an ssh host. Destroy removes every one of them.
const (
	SSHBinary     = "/usr/local/bin/steppe"
	SSHConfigDir  = "/etc/steppe"
	SSHConfig     = SSHConfigDir + "/agent.hcl"
	SSHKeysDir    = SSHConfigDir + "/keys"
	SSHStateDir   = "/var/lib/steppe"
	SSHSecretsDir = SSHStateDir + "/secrets"
	SSHSocketDir  = "/run/steppe"
	SSHSocket     = SSHSocketDir + "/agent.sock"
	sshService    = "steppe-agent"
	sshLogDir     = "/var/log/steppe-agent"
	systemdUnit   = "/etc/systemd/system/" + sshService + ".service"
	openrcScript  = "/etc/init.d/" + sshService
	runitSvDir    = "/etc/sv/" + sshService
)

// initProbe is the POSIX sh that tells which init system runs the host
// (not which is installed): systemd when /run/systemd/system exists (as
// sd_booted(3) checks), OpenRC when its state directory says it booted a
// runlevel, runit when a runsvdir runs (its service directory is its
// last argument). It also prints the uid and the machine type. Nothing is
// written.
const initProbe = `uid=$(id -u); echo "uid=$uid"; echo "arch=$(uname -m)"
if [ -d /run/systemd/system ]; then echo init=systemd; exit 0; fi
if [ -f /run/openrc/softlevel ] && command -v openrc-run >/dev/null 2>&1; then echo init=openrc; exit 0; fi
for d in /proc/[0-9]*; do
  read -r c <"$d/comm" 2>/dev/null || continue
  if [ "$c" = runsvdir ]; then
    echo init=runit
    echo "runsvdir=$(tr '\0' '\n' <"$d/cmdline" | sed -n '$p')"
    exit 0
  fi
done
echo init=unknown
`

// probeResult is what initProbe printed.
type probeResult struct {
	UID      string
	Arch     string
	Init     Init
	RunsvDir string // runit: the directory runsvdir scans
}

func parseProbe(out string) probeResult {
	var r probeResult
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok {
			continue
		}
		switch k {
		case "uid":
			r.UID = v
		case "arch":
			r.Arch = v
		case "init":
			r.Init = Init(v)
		case "runsvdir":
			r.RunsvDir = v
		}
	}
	return r
}

// serviceFile is one file of a service definition.
type serviceFile struct {
	Path    string
	Mode    uint32
	Content string
}

// serviceDefinition returns the files that make the agent a service of
// init, the commands (sh) that enable and start it, and those that stop
// and disable it.
func serviceDefinition(init Init, runsvDir string) (files []serviceFile, start, stop string, err error) {
	// The init restarts the agent: a self-upgrade that fails leaves the
	// restart to it (the agent's watchdog only puts the binary back).
	cmd := SSHBinary + " agent -config " + SSHConfig + " -restarted-by-init"
	switch init {
	case InitSystemd:
		return []serviceFile{{systemdUnit, 0o644, systemdUnitText(cmd)}},
			"systemctl daemon-reload && systemctl enable --now " + sshService + ".service",
			"systemctl disable --now " + sshService + ".service; rm -f " + systemdUnit + "; systemctl daemon-reload", nil
	case InitOpenRC:
		return []serviceFile{{openrcScript, 0o755, openrcScriptText()}},
			"rc-update add " + sshService + " default >/dev/null && rc-service " + sshService + " start",
			"rc-service " + sshService + " stop; rc-update del " + sshService + " default >/dev/null 2>&1; rm -f " + openrcScript, nil
	case InitRunit:
		if runsvDir == "" {
			runsvDir = "/etc/service"
		}
		link := runsvDir + "/" + sshService
		// runsvdir starts a runsv for the link at its next scan (within
		// 5 s), which starts ./run (no down file): Create then waits for
		// the agent's API. At stop, sv exit ends the runsv (and the log's)
		// after the agent; the link goes first so runsvdir starts no other.
		wait := "i=0; while sv status " + runitSvDir + " >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"
		return []serviceFile{
				{runitSvDir + "/run", 0o755, runitRun(cmd)},
				{runitSvDir + "/log/run", 0o755, runitLogRun()},
			},
			"mkdir -p " + sshLogDir + " && ln -sfn " + runitSvDir + " " + link,
			"rm -f " + link + "; sv -w 120 down " + runitSvDir + " >/dev/null 2>&1; sv exit " + runitSvDir + "/log " + runitSvDir + " >/dev/null 2>&1; " + wait + "; rm -rf " + runitSvDir + " " + sshLogDir, nil
	}
	return nil, "", "", fmt.Errorf("init system %q is not one steppe can install its agent under (systemd, openrc, runit)", init)
}

func systemdUnitText(cmd string) string {
	return `# Written by steppe's ssh provider: the steppe agent of this host.
[Unit]
Description=steppe agent (supervises this machine's Nomad, Consul, Vault and CoreDNS)
Documentation=https://github.com/steppe/steppe
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=` + cmd + `
Restart=always
RestartSec=1
# The agent makes its services' cgroups below its own.
Delegate=yes
# Stop and restart signal the agent only: its daemons outlive an agent
# restart and are adopted by the next agent.
KillMode=process
TimeoutStopSec=120
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
`
}

func openrcScriptText() string {
	return `#!/sbin/openrc-run
# Written by steppe's ssh provider: the steppe agent of this host.
description="steppe agent (supervises this machine's Nomad, Consul, Vault and CoreDNS)"
supervisor=supervise-daemon
command=` + SSHBinary + `
command_args="agent -config ` + SSHConfig + ` -restarted-by-init"
# supervise-daemon restarts the agent whenever it dies, a second apart.
respawn_delay=1
respawn_max=0
output_log=` + sshLogDir + `.log
error_log=` + sshLogDir + `.log
# Only the agent is signalled at stop: its daemons are its to stop.
rc_cgroup_cleanup="no"
retry="TERM/120/KILL/5"

depend() {
	use net
	after firewall
}
`
}

func runitRun(cmd string) string {
	return "#!/bin/sh\n# Written by steppe's ssh provider: the steppe agent of this host.\nexec 2>&1\nexec " + cmd + "\n"
}

func runitLogRun() string {
	return "#!/bin/sh\nexec svlogd -tt " + sshLogDir + "\n"
}
