package provider

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// A local Nomad client gives its tasks the first address of its
// network_interface. On "lo" that is 127.0.0.1 for every client of the
// host, so each local client gets an interface of its own whose only
// address is the machine's: its tasks listen on the machine's address, as
// on a real machine. Traffic to it stays local (127/8 is routed through lo
// whatever interface holds the address). The interface is one end of a veth
// pair: kernels without the dummy driver (these machines) all have veth.

// LinkName is the name of a machine's task interface: a hash of its name,
// within the kernel's 15 characters and stable across runs.
func LinkName(machine string) string {
	h := fnv.New32a()
	h.Write([]byte(machine))
	return fmt.Sprintf("stp-%08x", h.Sum32())
}

// peerName is the other end of a task interface's veth pair.
func peerName(link string) string { return "stq-" + link[len("stp-"):] }

// ensureLink makes the task interface name: a veth pair, both ends up, with
// addr as the only address of this end. One that is already so is left as
// it is; one that is not (another or a second address, an end down, not a
// veth) is made again.
func ensureLink(name string, addr netip.Addr) error {
	addr = addr.Unmap()
	if !addr.Is4() {
		return fmt.Errorf("interface %s: address %s is not IPv4: local machines have 127.0.0.0/8 addresses", name, addr)
	}
	ok, err := linkAsWanted(name, addr)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	if err := deleteLink(name); err != nil {
		return err
	}
	peer := peerName(name)
	attrs := netlink.NewLinkAttrs() // the kernel's defaults (txqueuelen, MTU), as ip link add
	attrs.Name = name
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: peer}); err != nil {
		return fmt.Errorf("create interface %s (veth, peer %s): %w", name, peer, err)
	}
	if err := setUpLink(name, addr); err != nil {
		_ = deleteLink(name)
		return err
	}
	return nil
}

// setUpLink brings a new veth pair up and gives its end name the address.
func setUpLink(name string, addr netip.Addr) error {
	var link netlink.Link
	for _, n := range []string{peerName(name), name} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			return fmt.Errorf("interface %s: %w", n, err)
		}
		// No IPv6 link-local address: the machine's address must be the
		// interface's only one, the one Nomad takes. Before it is up, when
		// the kernel would make one.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+n+"/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("interface %s: disable IPv6: %w", n, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("bring %s up: %w", n, err)
		}
		link = l
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: unix.RT_SCOPE_HOST}
	if err := netlink.AddrAdd(link, a); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, name, err)
	}
	return nil
}

// linkAsWanted says whether interface name exists as ensureLink makes it.
func linkAsWanted(name string, addr netip.Addr) (bool, error) {
	link, err := findLink(name)
	if err != nil || link == nil {
		return false, err
	}
	if link.Type() != "veth" || link.Attrs().Flags&net.FlagUp == 0 {
		return false, nil
	}
	peer, err := findLink(peerName(name))
	if err != nil || peer == nil {
		return false, err
	}
	if peer.Attrs().Flags&net.FlagUp == 0 {
		return false, nil
	}
	addrs, err := listAddrs(link)
	if err != nil {
		return false, fmt.Errorf("addresses of interface %s: %w", name, err)
	}
	if len(addrs) != 1 {
		return false, nil
	}
	ip, _ := netip.AddrFromSlice(addrs[0].IP)
	ones, bits := addrs[0].Mask.Size()
	return ip.Unmap() == addr && ones == 32 && bits == 32, nil
}

// listAddrs lists the addresses of link, all families. A dump that another
// change interrupted may be incomplete, and so is made again.
func listAddrs(link netlink.Link) ([]netlink.Addr, error) {
	for range 5 {
		addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return addrs, err
		}
	}
	return nil, fmt.Errorf("address dump interrupted 5 times in a row: %w", netlink.ErrDumpInterrupted)
}

// findLink returns interface name, or nil if there is none.
func findLink(name string) (netlink.Link, error) {
	link, err := netlink.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find interface %s: %w", name, err)
	}
	return link, nil
}

// deleteLink removes interface name (and so its veth peer); a missing one
// is not an error.
func deleteLink(name string) error {
	link, err := findLink(name)
	if err != nil || link == nil {
		return err
	}
	// ENODEV: removed meanwhile, by its peer's namespace or another run.
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete interface %s: %w", name, err)
	}
	return nil
}
