package provider

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/atomicfile"
	"github.com/steppe/steppe/internal/hcllit"
	"github.com/steppe/steppe/internal/supervise"
)

// The netns provider is the local provider with a network per machine
// (DESIGN: decision 14): each machine's agent runs in a network namespace
// of its own whose only interface besides lo is one end of a veth pair,
// the other end on the cluster's bridge in the operator's namespace. The
// bridge holds the subnet's first address, so the operator reaches every
// machine; no namespace has a default route and the bridge forwards
// nothing, so the machines reach each other and the operator only.
//
// Everything of a machine stays in its directory: the namespace is
// pinned by a bind mount of its nsfs file at <dir>/netns, and the files
// the machine sees as /etc/resolv.conf and /etc/hosts are <dir>/etc/*.
// Two state directories never share a bridge or an interface name: both
// are named by a hash of the machines' directory.
//
// The agent is started through steppe itself (NetnsExecArg): the
// operator's fork gives the child a private mount namespace and a UTS
// namespace of its own before exec (SysProcAttr.Unshareflags, done by Go
// between fork and exec, where the child is one thread); the trampoline
// then joins the network namespace on its locked thread, bind-mounts the
// machine's resolv.conf and hosts, sets the hostname and execs the agent
// from that same thread. A Go process cannot join a mount namespace
// (setns needs one thread) and `ip netns exec` remounts /sys, hiding the
// cgroup mounts; this way /sys and every cgroup mount stay as the host has
// them, and no util-linux program is needed. The mount and UTS namespaces
// live as long as a process of the machine does: an agent started again
// gets new ones, made the same way.

// DefaultSubnet is the cluster's subnet on the netns provider when the
// spec names none.
const DefaultSubnet = "10.213.0.0/24"

// NetnsExecArg is the hidden first argument that makes steppe the netns
// trampoline: main calls NetnsExecMain(os.Args[2:]) when os.Args[1] is it.
const NetnsExecArg = "__steppe-netns"

// netnsIfName is the machine's end of its veth pair, inside its namespace.
const netnsIfName = "eth0"

// Files of a netns machine's directory besides the local provider's.
const (
	netnsFile   = "netns"
	etcDir      = "etc"
	resolvFile  = "resolv.conf"
	hostsFile   = "hosts"
	nsfsMagic   = 0x6e736673 // NSFS_MAGIC: a pinned namespace file
	netnsLinkNS = "stb-"     // bridge name prefix
)

// NetnsOptions configure the netns provider.
type NetnsOptions struct {
	// Local are the options it shares with the local provider;
	// FirstAddress is not used (addresses come from Subnet).
	Local LocalOptions
	// Subnet is the cluster's IPv4 subnet; "" means DefaultSubnet. The
	// host takes its first address, the machines the next ones.
	Subnet string
}

// netnsNet is what the netns provider adds to the local one.
type netnsNet struct {
	subnet netip.Prefix
	bridge string
	dir    string     // the machines' directory, for interface names
	mu     sync.Mutex // orders the bridge's creation
}

// NewNetns returns the netns provider: a Local whose machines each have
// their own network namespace on the cluster's bridge. It needs root.
func NewNetns(opts NetnsOptions) (*Local, error) {
	s := opts.Subnet
	if s == "" {
		s = DefaultSubnet
	}
	subnet, err := parseSubnet(s)
	if err != nil {
		return nil, fmt.Errorf("netns provider: subnet %q: %w", s, err)
	}
	lo := opts.Local
	lo.FirstAddress = "127.0.0.1" // checked by NewLocal, replaced below
	l, err := NewLocal(lo)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(l.opts.Dir))
	l.netns = &netnsNet{subnet: subnet, bridge: netnsLinkNS + hex.EncodeToString(sum[:4]), dir: l.opts.Dir}
	l.opts.FirstAddress = subnet.Addr().Next().Next().String()
	return l, nil
}

// parseSubnet accepts a private IPv4 prefix with room for a host and a few
// machines, written as its network address.
func parseSubnet(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("not a prefix such as %s: %w", DefaultSubnet, err)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("want an IPv4 prefix such as %s", DefaultSubnet)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("has host bits set: write its network address, %s", p.Masked())
	}
	if p.Bits() < 8 || p.Bits() > 28 {
		return netip.Prefix{}, fmt.Errorf("want a prefix length from /8 to /28, such as %s", DefaultSubnet)
	}
	if !p.Addr().IsPrivate() {
		return netip.Prefix{}, fmt.Errorf("want a private range (10/8, 172.16/12, 192.168/16), such as %s: machines must not take addresses of the Internet", DefaultSubnet)
	}
	return p, nil
}

// Subnet is the cluster's subnet; invalid for the local provider.
func (l *Local) Subnet() netip.Prefix {
	if l.netns == nil {
		return netip.Prefix{}
	}
	return l.netns.subnet
}

// Bridge is the name of the cluster's bridge; "" for the local provider.
func (l *Local) Bridge() string {
	if l.netns == nil {
		return ""
	}
	return l.netns.bridge
}

// NetnsPath is the pinned network namespace of a machine; "" for the local
// provider.
func (l *Local) NetnsPath(name string) string {
	if l.netns == nil {
		return ""
	}
	return filepath.Join(l.machineDir(name), netnsFile)
}

// VethName is the host's end of a netns machine's veth pair.
func (l *Local) VethName(name string) string {
	if l.netns == nil {
		return ""
	}
	return l.netns.vethName(name)
}

func (n *netnsNet) vethName(machine string) string {
	h := fnv.New32a()
	h.Write([]byte(n.dir + "/" + machine))
	return fmt.Sprintf("stv-%08x", h.Sum32())
}

// hostAddr is the operator's address on the bridge: the subnet's first.
func (n *netnsNet) hostAddr() netip.Addr { return n.subnet.Addr().Next() }

// addressOK says whether ip may be a machine's address: the machine's own
// range on this provider.
func (l *Local) addressOK(ip net.IP) bool {
	if l.netns == nil {
		return ip.IsLoopback()
	}
	a, ok := netip.AddrFromSlice(ip.To4())
	n := l.netns
	return ok && n.subnet.Contains(a) && a != n.subnet.Addr() && a != n.hostAddr() && a != broadcast(n.subnet)
}

func broadcast(p netip.Prefix) netip.Addr {
	b := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// checkFree fails when addr cannot be a new machine's: on the local
// provider when something holds one of its ports; on netns when it is
// outside the subnet (every port is free in a new namespace).
func (l *Local) checkFree(addr string) error {
	if l.netns == nil {
		return portsFree(addr)
	}
	ip := net.ParseIP(addr)
	if ip == nil || !l.addressOK(ip) {
		return fmt.Errorf("address %s is not a machine address of the subnet %s (the first address is the host's)", addr, l.netns.subnet)
	}
	return nil
}

// taskInterface is the interface whose address a client's tasks get.
func (l *Local) taskInterface(m Machine) string {
	if l.netns == nil {
		return LinkName(m.Name)
	}
	return netnsIfName
}

// setup makes the machine's network: the cluster's bridge, the machine's
// namespace, its veth pair with its address, and its /etc files. What is
// already as wanted is left alone.
func (n *netnsNet) setup(m Machine) error {
	addr, err := netip.ParseAddr(m.Address)
	if err != nil || !n.subnet.Contains(addr) {
		return fmt.Errorf("netns machine %s: address %q is not in the subnet %s", m.Name, m.Address, n.subnet)
	}
	br, err := n.ensureBridge()
	if err != nil {
		return err
	}
	ns := filepath.Join(m.Dir, netnsFile)
	if !isNsfs(ns) {
		if err := makeNetns(ns); err != nil {
			return fmt.Errorf("netns machine %s: %w", m.Name, err)
		}
	}
	if err := n.ensureVeth(m.Name, ns, br, addr); err != nil {
		return fmt.Errorf("netns machine %s: %w", m.Name, err)
	}
	if err := writeEtc(m); err != nil {
		return fmt.Errorf("netns machine %s: %w", m.Name, err)
	}
	return nil
}

// writeEtc writes the files the machine sees as /etc/resolv.conf and
// /etc/hosts. They are bind-mounted over /etc's at each start of its agent,
// and written in place (not replaced) so that a running machine sees a
// change.
func writeEtc(m Machine) error {
	dir := filepath.Join(m.Dir, etcDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// The machine reaches nothing beyond its subnet, so no resolver of the
	// host's would answer: none is named (the C library and Go then ask
	// 127.0.0.1, where nothing answers) until the agent switches it to the
	// machine's own resolver (see resolverBlock).
	resolv := fmt.Sprintf("# Written by steppe for netns machine %s: it reaches nothing outside\n"+
		"# its cluster's subnet, so it has no upstream resolver.\n", m.Name)
	hosts := fmt.Sprintf("# Written by steppe for netns machine %s.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", m.Name, m.Address, m.Name)
	for name, content := range map[string]string{resolvFile: resolv, hostsFile: hosts} {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			continue // the machine's own from now on (its resolver switches it)
		}
		if err := atomicfile.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// ResolverFallback is how long a netns machine's local resolver may not
// answer before its agent puts the previous resolv.conf back.
const ResolverFallback = 10 * time.Second

// resolverBlock is the agent config's resolver block: a netns machine's
// resolv.conf is its own (<dir>/etc/resolv.conf, seen at /etc/resolv.conf
// through a bind mount in its mount namespace), so its agent switches it
// to the machine's CoreDNS on the machine's address. The local provider
// writes none: its machines' resolv.conf is the host's, left alone.
func (l *Local) resolverBlock(m Machine) string {
	if l.netns == nil {
		return ""
	}
	return fmt.Sprintf("\nresolver {\n  resolv_conf    = %s\n  mount          = \"/etc/resolv.conf\"\n  address        = %s\n  fallback_after = %s\n}\n",
		hcllit.String(filepath.Join(m.Dir, etcDir, resolvFile)), hcllit.String(m.Address), hcllit.String(ResolverFallback.String()))
}

// ensureBridge makes the cluster's bridge with the host's address, up and
// forwarding nothing. A subnet that overlaps a route or an address the
// host has elsewhere is refused before anything is made.
func (n *netnsNet) ensureBridge() (netlink.Link, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	br, err := findLink(n.bridge)
	if err != nil {
		return nil, err
	}
	if br != nil && br.Type() != "bridge" {
		return nil, fmt.Errorf("netns provider: interface %s exists and is a %s, not the cluster's bridge: remove it", n.bridge, br.Type())
	}
	if err := n.checkOverlap(br); err != nil {
		return nil, err
	}
	if br == nil {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = n.bridge
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("netns provider: create bridge %s: %w", n.bridge, err)
		}
		if br, err = netlink.LinkByName(n.bridge); err != nil {
			return nil, fmt.Errorf("netns provider: bridge %s: %w", n.bridge, err)
		}
	}
	// Packets the machines send to anything but the bridge's own address
	// are not forwarded, whatever the host's ip_forward says.
	for _, s := range []struct{ path, value string }{
		{"/proc/sys/net/ipv6/conf/" + n.bridge + "/disable_ipv6", "1"},
		{"/proc/sys/net/ipv4/conf/" + n.bridge + "/forwarding", "0"},
	} {
		if err := os.WriteFile(s.path, []byte(s.value), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("netns provider: bridge %s: %s: %w", n.bridge, s.path, err)
		}
	}
	want := &netlink.Addr{IPNet: &net.IPNet{IP: n.hostAddr().AsSlice(), Mask: net.CIDRMask(n.subnet.Bits(), 32)}}
	addrs, err := listAddrs(br)
	if err != nil {
		return nil, fmt.Errorf("netns provider: addresses of %s: %w", n.bridge, err)
	}
	has := false
	for _, a := range addrs {
		has = has || a.IPNet.String() == want.IPNet.String()
	}
	if !has {
		if err := netlink.AddrAdd(br, want); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("netns provider: address %s on %s: %w", want.IPNet, n.bridge, err)
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("netns provider: bring %s up: %w", n.bridge, err)
	}
	return br, nil
}

// checkOverlap fails naming the first route or address of the host
// (besides its default routes and the cluster's own bridge) that overlaps
// the subnet: machines there would shadow, or be shadowed by, a network
// the host already reaches.
func (n *netnsNet) checkOverlap(br netlink.Link) error {
	own := 0
	if br != nil {
		own = br.Attrs().Index
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("netns provider: list the host's routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.LinkIndex == own {
			continue
		}
		if ones, _ := r.Dst.Mask.Size(); ones == 0 {
			continue // a default route covers everything; it is not a network of the host's
		}
		if p, ok := prefixOf(r.Dst); ok && p.Overlaps(n.subnet) {
			return fmt.Errorf("netns provider: the subnet %s overlaps the host's route to %s (%s): give the cluster another subnet, e.g. provider \"netns\" { subnet = \"10.214.0.0/24\" }", n.subnet, p, linkNameOf(r.LinkIndex))
		}
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("netns provider: list the host's addresses: %w", err)
	}
	for _, a := range addrs {
		if a.LinkIndex == own {
			continue
		}
		if p, ok := prefixOf(a.IPNet); ok && p.Overlaps(n.subnet) {
			return fmt.Errorf("netns provider: the subnet %s overlaps the host's address %s (%s): give the cluster another subnet, e.g. provider \"netns\" { subnet = \"10.214.0.0/24\" }", n.subnet, a.IPNet, linkNameOf(a.LinkIndex))
		}
	}
	return nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a, ones).Masked(), true
}

func linkNameOf(index int) string {
	if l, err := netlink.LinkByIndex(index); err == nil {
		return "dev " + l.Attrs().Name
	}
	return fmt.Sprintf("interface %d", index)
}

// isNsfs says whether path is a pinned namespace.
func isNsfs(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == nsfsMagic
}

// makeNetns makes a network namespace and pins it at path. The namespace
// is made by a thread of this process that never runs anything else: its
// goroutine ends locked, and the runtime ends the thread with it.
func makeNetns(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o444)
	if err != nil {
		return fmt.Errorf("network namespace: %w", err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("make network namespace: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("pin network namespace at %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	return <-errc
}

// inNetns runs f on a thread in the network namespace pinned at path. The
// thread is discarded afterwards, as in makeNetns.
func inNetns(path string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open network namespace %s: %w", path, err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// ensureVeth gives the namespace at ns its end of a veth pair (eth0, with
// addr in the subnet, up, and lo up) whose other end is on the bridge.
// A pair that is already so is left as it is; one that is not is made
// again.
func (n *netnsNet) ensureVeth(machine, ns string, br netlink.Link, addr netip.Addr) error {
	host := n.vethName(machine)
	want := fmt.Sprintf("%s/%d", addr, n.subnet.Bits())
	if ok, err := n.vethAsWanted(host, ns, br, want); err != nil || ok {
		return err
	}
	if err := deleteLink(host); err != nil {
		return err
	}
	fd, err := unix.Open(ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", ns, err)
	}
	defer unix.Close(fd)
	// An eth0 left in the namespace would block the new peer's name; its
	// own peer is then gone or not this machine's.
	_ = inNetns(ns, func() error { return deleteLink(netnsIfName) })
	attrs := netlink.NewLinkAttrs()
	attrs.Name = host
	attrs.MasterIndex = br.Attrs().Index
	// The peer is made in the namespace itself: no moment where it sits
	// in the host's namespace for a killed run to leave there.
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: netnsIfName, PeerNamespace: netlink.NsFd(fd)}); err != nil {
		return fmt.Errorf("create interface %s (veth, peer %s in %s): %w", host, netnsIfName, ns, err)
	}
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+host+"/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("interface %s: disable IPv6: %w", host, err)
	}
	hl, err := netlink.LinkByName(host)
	if err != nil {
		return fmt.Errorf("interface %s: %w", host, err)
	}
	if err := netlink.LinkSetUp(hl); err != nil {
		return fmt.Errorf("bring %s up: %w", host, err)
	}
	return inNetns(ns, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("lo: %w", err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bring lo up: %w", err)
		}
		// The machine's address is eth0's only one (Nomad gives its tasks
		// the interface's first): no IPv6 link-local address.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+netnsIfName+"/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s: disable IPv6: %w", netnsIfName, err)
		}
		eth, err := netlink.LinkByName(netnsIfName)
		if err != nil {
			return fmt.Errorf("%s: %w", netnsIfName, err)
		}
		a, err := netlink.ParseAddr(want)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, a); err != nil {
			return fmt.Errorf("address %s on %s: %w", want, netnsIfName, err)
		}
		if err := netlink.LinkSetUp(eth); err != nil {
			return fmt.Errorf("bring %s up: %w", netnsIfName, err)
		}
		return nil
	})
}

// vethAsWanted says whether the machine's pair is as ensureVeth makes it.
func (n *netnsNet) vethAsWanted(host, ns string, br netlink.Link, want string) (bool, error) {
	hl, err := findLink(host)
	if err != nil || hl == nil {
		return false, err
	}
	if hl.Type() != "veth" || hl.Attrs().MasterIndex != br.Attrs().Index || hl.Attrs().Flags&net.FlagUp == 0 {
		return false, nil
	}
	ok := false
	err = inNetns(ns, func() error {
		eth, err := findLink(netnsIfName)
		if err != nil || eth == nil || eth.Attrs().Flags&net.FlagUp == 0 {
			return err
		}
		addrs, err := listAddrs(eth)
		if err != nil {
			return err
		}
		ok = len(addrs) == 1 && addrs[0].IPNet.String() == want
		return nil
	})
	return ok, err
}

// enter makes cmd, which runs the machine's agent, start inside the
// machine: through the trampoline, in a new mount and UTS namespace.
func (n *netnsNet) enter(cmd *exec.Cmd, m Machine) error {
	mnt, err := nsInode("/proc/self/ns/mnt")
	if err != nil {
		return err
	}
	etc := filepath.Join(m.Dir, etcDir)
	args := []string{cmd.Path, NetnsExecArg, filepath.Join(m.Dir, netnsFile), m.Name,
		filepath.Join(etc, resolvFile), filepath.Join(etc, hostsFile), strconv.FormatUint(mnt, 10), "--"}
	cmd.Args = append(args, cmd.Args...)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Go unshares these in the child between fork and exec, where it is
	// one thread, and makes / private there.
	cmd.SysProcAttr.Unshareflags |= syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS
	return nil
}

func nsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("namespace %s: %w", path, err)
	}
	return st.Ino, nil
}

// NetnsExecMain is the trampoline into a netns machine. args (after
// NetnsExecArg): the pinned network namespace, the hostname, the files to
// mount over /etc/resolv.conf and /etc/hosts, the inode of the operator's
// mount namespace, "--", then the program and its arguments. It runs in a
// mount and UTS namespace of its own (the operator's exec made them) and
// returns only on failure.
func NetnsExecMain(args []string) error {
	if len(args) < 7 || args[5] != "--" {
		return errors.New("netns trampoline: want NETNS HOSTNAME RESOLV HOSTS MNT_INODE -- PROGRAM [ARG...]")
	}
	ns, hostname, resolv, hosts, parentMnt, argv := args[0], args[1], args[2], args[3], args[4], args[6:]
	// Setns and exec below must happen on one thread.
	runtime.LockOSThread()
	mnt, err := nsInode("/proc/self/ns/mnt")
	if err != nil {
		return err
	}
	if strconv.FormatUint(mnt, 10) == parentMnt {
		// Mounting over /etc here would change the operator's host.
		return errors.New("netns trampoline: not started in a mount namespace of its own; refusing to mount over /etc")
	}
	fd, err := unix.Open(ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("netns trampoline: %w", err)
	}
	if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("netns trampoline: enter %s: %w", ns, err)
	}
	unix.Close(fd)
	// The copy of the host's mounts holds every pinned namespace,
	// other machines' too: let go of them, so that a machine removed is
	// not kept alive by the others.
	if err := unmountNsfs(); err != nil {
		return fmt.Errorf("netns trampoline: %w", err)
	}
	for _, b := range []struct{ src, dst string }{{resolv, "/etc/resolv.conf"}, {hosts, "/etc/hosts"}} {
		if err := unix.Mount(b.src, b.dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("netns trampoline: mount %s over %s: %w", b.src, b.dst, err)
		}
	}
	if err := unix.Sethostname([]byte(hostname)); err != nil {
		return fmt.Errorf("netns trampoline: hostname %s: %w", hostname, err)
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return fmt.Errorf("netns trampoline: %w", err)
	}
	return fmt.Errorf("netns trampoline: exec %s: %w", path, syscall.Exec(path, argv, os.Environ()))
}

// unmountNsfs detaches every pinned namespace in this mount namespace.
func unmountNsfs() error {
	mounts, err := supervise.Mounts()
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mounts {
		if m.FSType != "nsfs" {
			continue
		}
		if err := unix.Unmount(m.Point, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m.Point, err))
		}
	}
	return errors.Join(errs...)
}

// teardown removes the machine's network: every process still in its
// namespace killed, its veth pair deleted, its namespace unpinned.
func (n *netnsNet) teardown(ctx context.Context, m Machine) error {
	ns := filepath.Join(m.Dir, netnsFile)
	var errs []error
	if isNsfs(ns) {
		if err := killNetns(ctx, ns); err != nil {
			errs = append(errs, err)
		}
	}
	if err := deleteLink(n.vethName(m.Name)); err != nil {
		errs = append(errs, err)
	}
	for isNsfs(ns) {
		if err := unix.Unmount(ns, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unpin network namespace %s: %w", ns, err))
			break
		}
	}
	return errors.Join(errs...)
}

// killNetns SIGKILLs every process whose network namespace is the one
// pinned at ns, until none is left: tasks and daemons that left the
// machine's cgroups still cannot outlive it.
func killNetns(ctx context.Context, ns string) error {
	var want unix.Stat_t
	if err := unix.Stat(ns, &want); err != nil {
		return fmt.Errorf("network namespace %s: %w", ns, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		left := netnsPIDs(want)
		if len(left) == 0 {
			return nil
		}
		for _, pid := range left {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("network namespace %s: processes %v left after SIGKILL", ns, left)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// netnsPIDs are the processes (not zombies) in the network namespace of
// inode want.
func netnsPIDs(want unix.Stat_t) []int {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	self := os.Getpid()
	var out []int
	for _, p := range procs {
		var st unix.Stat_t
		if unix.Stat(p+"/ns/net", &st) != nil || st.Ino != want.Ino || st.Dev != want.Dev {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil || pid == self {
			continue
		}
		if stat, err := os.ReadFile(p + "/stat"); err == nil {
			if f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:])); len(f) > 0 && f[0] == "Z" {
				continue
			}
		}
		out = append(out, pid)
	}
	return out
}

// cleanup removes the cluster's bridge and any veth still on it (of a
// machine whose directory a cut-short run left without its record).
func (n *netnsNet) cleanup() error {
	br, err := findLink(n.bridge)
	if err != nil || br == nil {
		return err
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("netns provider: list interfaces: %w", err)
	}
	var errs []error
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			if err := deleteLink(l.Attrs().Name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := deleteLink(n.bridge); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
