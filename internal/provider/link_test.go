package provider

import (
	"net"
	"net/netip"
	"testing"

	"github.com/steppe/steppe/internal/testenv"
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
