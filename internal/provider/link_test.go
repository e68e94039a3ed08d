package provider

import (
	"net"
	"net/netip"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
	"github.com/vishvananda/netlink"
)

// A machine's task interface is created with the machine's address only,
// reached from the host, made again idempotently, and removed.
func TestTaskLink(t *testing.T) {
	testenv.NeedRoot(t, "creating interfaces")
	name := LinkName("steppe-link-test")
	addr := netip.MustParseAddr("127.0.3.7")
	t.Cleanup(func() { deleteLink(name) })
	for range 2 { // the second call finds it as it should be
		if err := ensureLink(name, addr); err != nil {
			t.Fatal(err)
		}
	}
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if ifc.Flags&net.FlagUp == 0 {
		t.Errorf("%s is not up", name)
	}
	addrs, _ := ifc.Addrs()
	if len(addrs) != 1 || addrs[0].String() != "127.0.3.7/32" {
		t.Fatalf("%s has addresses %v, want only 127.0.3.7/32", name, addrs)
	}
	ln, err := net.Listen("tcp", "127.0.3.7:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial the task address: %v", err)
	}
	c.Close()
	if err := deleteLink(name); err != nil {
		t.Fatal(err)
	}
	if _, err := net.InterfaceByName(name); err == nil {
		t.Fatalf("%s still exists", name)
	}
	if err := deleteLink(name); err != nil {
		t.Fatalf("deleting a missing interface: %v", err)
	}
}

// A task interface that is no longer as made (an end down, a second
// address, another machine's address) is made right again: a down end
// leaves the machine's address unreachable (the kernel drops its local
// route), a second address may be the one Nomad takes.
func TestTaskLinkRepaired(t *testing.T) {
	testenv.NeedRoot(t, "creating interfaces")
	name := LinkName("steppe-link-repair-test")
	addr := netip.MustParseAddr("127.0.3.8")
	t.Cleanup(func() { deleteLink(name) })
	spoils := []struct {
		what  string
		spoil func(t *testing.T)
		want  netip.Addr
	}{
		{"host end down", func(t *testing.T) { linkDown(t, name) }, addr},
		{"peer end down", func(t *testing.T) { linkDown(t, peerName(name)) }, addr},
		{"a second address", func(t *testing.T) {
			link, err := netlink.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			extra := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(127, 0, 3, 9), Mask: net.CIDRMask(32, 32)}}
			if err := netlink.AddrAdd(link, extra); err != nil {
				t.Fatal(err)
			}
		}, addr},
		{"another address wanted", func(t *testing.T) {}, netip.MustParseAddr("127.0.3.10")},
	}
	for _, b := range spoils {
		if err := ensureLink(name, addr); err != nil {
			t.Fatal(err)
		}
		b.spoil(t)
		if err := ensureLink(name, b.want); err != nil {
			t.Fatalf("%s: %v", b.what, err)
		}
		for _, n := range []string{name, peerName(name)} {
			ifc, err := net.InterfaceByName(n)
			if err != nil {
				t.Fatalf("%s: %v", b.what, err)
			}
			if ifc.Flags&net.FlagUp == 0 {
				t.Errorf("%s: %s is not up", b.what, n)
			}
		}
		ifc, err := net.InterfaceByName(name)
		if err != nil {
			t.Fatal(err)
		}
		addrs, _ := ifc.Addrs()
		if want := b.want.String() + "/32"; len(addrs) != 1 || addrs[0].String() != want {
			t.Errorf("%s: %s has addresses %v, want only %s", b.what, name, addrs, want)
		}
		ln, err := net.Listen("tcp", netip.AddrPortFrom(b.want, 0).String())
		if err != nil {
			t.Fatalf("%s: %v", b.what, err)
		}
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Errorf("%s: dial the task address: %v", b.what, err)
		} else {
			c.Close()
		}
		ln.Close()
	}
}

func linkDown(t *testing.T, name string) {
	t.Helper()
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetDown(link); err != nil {
		t.Fatal(err)
	}
}
