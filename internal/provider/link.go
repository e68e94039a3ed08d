package provider

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"
	"syscall"
	"unsafe"

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

// ensureLink makes the dummy interface name, up, with addr as its only
// address. An existing one with that address is left as it is.
func ensureLink(name string, addr netip.Addr) error {
	if ifc, err := net.InterfaceByName(name); err == nil {
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.Equal(addr.AsSlice()) {
				return nil
			}
		}
		if err := deleteLink(name); err != nil {
			return err
		}
	}
	if err := netlinkDo(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL, newLinkMsg(name, peerName(name))); err != nil {
		return fmt.Errorf("create interface %s: %w", name, err)
	}
	for _, n := range []string{peerName(name), name} {
		ifc, err := net.InterfaceByName(n)
		if err != nil {
			return fmt.Errorf("interface %s: %w", n, err)
		}
		// No IPv6 link-local address: the machine's address must be the
		// interface's only one, the one Nomad takes.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+n+"/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			_ = deleteLink(name)
			return fmt.Errorf("interface %s: disable IPv6: %w", n, err)
		}
		if err := netlinkDo(unix.RTM_NEWLINK, 0, ifInfomsg(ifc.Index, unix.IFF_UP)); err != nil {
			_ = deleteLink(name)
			return fmt.Errorf("bring %s up: %w", n, err)
		}
	}
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("interface %s: %w", name, err)
	}
	if err := netlinkDo(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, newAddrMsg(ifc.Index, addr)); err != nil {
		_ = deleteLink(name)
		return fmt.Errorf("address %s on %s: %w", addr, name, err)
	}
	return nil
}

// deleteLink removes interface name (and so its veth peer); a missing one
// is not an error.
func deleteLink(name string) error {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return nil
	}
	msg := ifInfomsg(ifc.Index, 0)
	if err := netlinkDo(unix.RTM_DELLINK, 0, msg); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete interface %s: %w", name, err)
	}
	return nil
}

func ifInfomsg(index int, flags uint32) []byte {
	m := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(index), Flags: flags, Change: flags}
	return (*[unix.SizeofIfInfomsg]byte)(unsafe.Pointer(&m))[:]
}

func newLinkMsg(name, peer string) []byte {
	b := ifInfomsg(0, 0)
	b = append(b, rtattr(unix.IFLA_IFNAME, append([]byte(name), 0))...)
	peerMsg := append(ifInfomsg(0, 0), rtattr(unix.IFLA_IFNAME, append([]byte(peer), 0))...)
	const vethInfoPeer = 1 // VETH_INFO_PEER
	info := append(rtattr(unix.IFLA_INFO_KIND, []byte("veth")), rtattr(unix.IFLA_INFO_DATA, rtattr(vethInfoPeer, peerMsg))...)
	return append(b, rtattr(unix.IFLA_LINKINFO, info)...)
}

func newAddrMsg(index int, addr netip.Addr) []byte {
	m := unix.IfAddrmsg{Family: unix.AF_INET, Prefixlen: 32, Scope: unix.RT_SCOPE_HOST, Index: uint32(index)}
	b := (*[unix.SizeofIfAddrmsg]byte)(unsafe.Pointer(&m))[:]
	ip := addr.AsSlice()
	b = append(b, rtattr(unix.IFA_LOCAL, ip)...)
	return append(b, rtattr(unix.IFA_ADDRESS, ip)...)
}

// rtattr encodes one netlink attribute, padded to 4 bytes.
func rtattr(typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b := make([]byte, (l+unix.RTA_ALIGNTO-1) & ^(unix.RTA_ALIGNTO-1))
	binary.NativeEndian.PutUint16(b[0:2], uint16(l))
	binary.NativeEndian.PutUint16(b[2:4], typ)
	copy(b[unix.SizeofRtAttr:], data)
	return b
}

// netlinkDo sends one rtnetlink request and waits for its acknowledgement.
func netlinkDo(typ uint16, flags uint16, payload []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return os.NewSyscallError("socket", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return os.NewSyscallError("bind", err)
	}
	hdr := unix.NlMsghdr{
		Len:   uint32(unix.SizeofNlMsghdr + len(payload)),
		Type:  typ,
		Flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK | flags,
		Seq:   1,
	}
	msg := append((*[unix.SizeofNlMsghdr]byte)(unsafe.Pointer(&hdr))[:], payload...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return os.NewSyscallError("sendto", err)
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return os.NewSyscallError("recvfrom", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != 1 || m.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(m.Data) < 4 {
				return errors.New("short netlink error message")
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data[:4])); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}
