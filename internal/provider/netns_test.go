package provider

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/steppe/steppe/internal/bundle"
	"github.com/steppe/steppe/internal/cluster"
	"github.com/steppe/steppe/internal/supervise"
	"github.com/steppe/steppe/internal/testenv"
)

// steppeBin builds the real steppe binary once: the netns provider starts
// its agents through it (the trampoline), and they must really run.
var steppeBin = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "steppe-netns-bin-")
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "steppe")
	cmd := exec.Command("go", "build", "-o", p, "../../cmd/steppe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build steppe: %v\n%s", err, out)
	}
	return p, nil
})

func newTestNetns(t *testing.T, dir, subnet string) *Local {
	t.Helper()
	testenv.NeedRoot(t, "network namespaces")
	bin, err := steppeBin()
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewNetns(NetnsOptions{Local: LocalOptions{Dir: dir, Cluster: "nt", Binary: bin, StopTimeout: 20 * time.Second}, Subnet: subnet})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// createReq is a machine whose agent pulls from an empty store: it runs
// and answers, and starts no daemon.
func createReq(t *testing.T, name string, role cluster.Role) CreateRequest {
	t.Helper()
	return createReqIn(t, t.TempDir(), name, role)
}

// createReqIn is createReq with its key and store in dir.
func createReqIn(t *testing.T, dir, name string, role cluster.Role) CreateRequest {
	t.Helper()
	k, err := bundle.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	_, keys, err := bundle.WriteKeyPair(filepath.Join(dir, "bundle-"+name), k)
	if err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(dir, "store")
	if err := os.MkdirAll(store, 0o700); err != nil {
		t.Fatal(err)
	}
	pool := ""
	if role == cluster.RoleClient {
		pool = "default"
	}
	return CreateRequest{
		Machine: cluster.Machine{Name: name, Role: role, Pool: pool},
		Agent:   AgentConfig{Cluster: "nt", Region: "global", Datacenter: "dc1", BundleRole: name, BundleStore: store, BundleKeys: []string{keys}},
		Secrets: func(cluster.Machine, string) (map[string][]byte, error) {
			return map[string][]byte{"token": []byte("t")}, nil
		},
	}
}

// nsenterOut runs a command in namespaces of pid (flags as nsenter's).
func nsenterOut(t *testing.T, pid int, flags string, args ...string) string {
	t.Helper()
	out, err := exec.Command("nsenter", append([]string{"-t", fmt.Sprint(pid), flags, "--"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nsenter %s %v: %v\n%s", flags, args, err, out)
	}
	return string(out)
}

// Two netns machines: each has its own address on the cluster's bridge,
// hostname, resolv.conf and hosts, with the host's cgroup mounts; they
// reach each other and the operator, and nothing outside the subnet; a
// destroy and cleanup leave no namespace, link, mount, cgroup, process or
// file.
func TestNetnsMachines(t *testing.T) {
	dir := t.TempDir()
	l := newTestNetns(t, dir, "10.213.7.0/24")
	ctx := context.Background()
	hostResolv, _ := os.ReadFile("/etc/resolv.conf")
	names := []string{"nt-server-1", "nt-client-1"}
	var ms []Machine
	t.Cleanup(func() {
		for _, n := range names {
			l.Destroy(ctx, n)
		}
		l.Cleanup(ctx)
	})
	for i, n := range names {
		role := cluster.RoleServer
		if i == 1 {
			role = cluster.RoleClient
		}
		m, err := l.Create(ctx, createReq(t, n, role))
		if err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	for i, m := range ms {
		if want := fmt.Sprintf("10.213.7.%d", 2+i); m.Address != want {
			t.Errorf("%s: address %s, want %s", m.Name, m.Address, want)
		}
		if h := strings.TrimSpace(nsenterOut(t, m.PID, "--uts", "cat", "/proc/sys/kernel/hostname")); h != m.Name {
			t.Errorf("%s: hostname %q", m.Name, h)
		}
		if r := nsenterOut(t, m.PID, "--mount", "cat", "/etc/resolv.conf"); !strings.Contains(r, "netns machine "+m.Name) {
			t.Errorf("%s: resolv.conf is not its own:\n%s", m.Name, r)
		}
		if h := nsenterOut(t, m.PID, "--mount", "cat", "/etc/hosts"); !strings.Contains(h, m.Address+"\t"+m.Name) {
			t.Errorf("%s: /etc/hosts does not name it:\n%s", m.Name, h)
		}
		// The agent sees the host's cgroup v2 mount (ip netns exec would
		// have remounted /sys), and no other machine's namespace.
		mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", m.PID))
		if err != nil {
			t.Fatal(err)
		}
		if v2 := supervise.CgroupV2Mount(); v2 != "" && !bytes.Contains(mi, []byte(" "+v2+" ")) {
			t.Errorf("%s: cgroup v2 mount %s not visible to the agent", m.Name, v2)
		}
		if bytes.Contains(mi, []byte(" - nsfs ")) {
			t.Errorf("%s: the agent's mounts hold pinned namespaces:\n%s", m.Name, mi)
		}
		var routes []netlink.Route
		var addrs []netlink.Addr
		err = inNetns(l.NetnsPath(m.Name), func() error {
			eth, err := netlink.LinkByName(netnsIfName)
			if err != nil {
				return err
			}
			if addrs, err = netlink.AddrList(eth, netlink.FAMILY_ALL); err != nil {
				return err
			}
			routes, err = netlink.RouteList(nil, netlink.FAMILY_ALL)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != m.Address+"/24" {
			t.Errorf("%s: eth0 has %v, want only %s/24", m.Name, addrs, m.Address)
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				t.Errorf("%s: default route %v", m.Name, r)
			}
		}
	}
	if after, _ := os.ReadFile("/etc/resolv.conf"); !bytes.Equal(after, hostResolv) {
		t.Error("the host's /etc/resolv.conf changed")
	}

	// TCP: a listener on machine 0 is reached from machine 1 and from the
	// operator (through the bridge).
	ln := listenIn(t, l.NetnsPath(ms[0].Name), ms[0].Address+":0")
	if err := dialIn(l.NetnsPath(ms[1].Name), ln.Addr().String()); err != nil {
		t.Errorf("machine to machine: %v", err)
	}
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second); err != nil {
		t.Errorf("operator to machine: %v", err)
	} else {
		c.Close()
	}

	// Nothing outside the subnet: the host's loopback listener is not the
	// machine's, and another host network is unreachable.
	hostLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hostLn.Close()
	if err := dialIn(l.NetnsPath(ms[1].Name), hostLn.Addr().String()); err == nil {
		t.Error("a machine reached the host's 127.0.0.1 listener")
	}
	outside := outsideNet(t)
	if err := dialIn(l.NetnsPath(ms[1].Name), outside); err == nil || !errors.Is(err, unix.ENETUNREACH) {
		t.Errorf("a machine dialing %s outside the subnet: %v, want network unreachable", outside, err)
	}

	// A process in a machine's namespace outside its cgroups, whose
	// command line names nothing of the machine: destroy kills it too.
	var stray *exec.Cmd
	err = inNetns(l.NetnsPath(ms[1].Name), func() error {
		stray = exec.Command("sleep", "300")
		return stray.Start()
	})
	if err != nil {
		t.Fatal(err)
	}
	strayDone := make(chan struct{})
	go func() { stray.Wait(); close(strayDone) }()
	t.Cleanup(func() { stray.Process.Kill() })
	if a, b := mustInode(t, fmt.Sprintf("/proc/%d/ns/net", stray.Process.Pid)), mustInode(t, l.NetnsPath(ms[1].Name)); a != b {
		t.Fatalf("the stray process is not in the machine's namespace (%d, %d)", a, b)
	}

	// Destroy and cleanup leave nothing.
	pids := []int{ms[0].PID, ms[1].PID}
	for _, n := range names {
		if err := l.Destroy(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	assertNetnsGone(t, l, dir, names, pids)
	select {
	case <-strayDone:
	case <-time.After(5 * time.Second):
		t.Error("a process in a destroyed machine's namespace still runs")
	}
}

func mustInode(t *testing.T, path string) uint64 {
	t.Helper()
	ino, err := nsInode(path)
	if err != nil {
		t.Fatal(err)
	}
	return ino
}

// assertNetnsGone fails on anything of the cluster left: processes,
// interfaces, mounts below dir, cgroups, files.
func assertNetnsGone(t *testing.T, l *Local, dir string, names []string, pids []int) {
	t.Helper()
	for _, pid := range pids {
		// A zombie is gone but for its parent's wait (the killed
		// operator's agents wait for init).
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !bytes.Contains(st, []byte(") Z ")) {
			t.Errorf("agent %d still runs: %s", pid, st)
		}
	}
	for _, n := range append([]string{l.Bridge()}, func() []string {
		var v []string
		for _, n := range names {
			v = append(v, l.VethName(n))
		}
		return v
	}()...) {
		if link, _ := findLink(n); link != nil {
			t.Errorf("interface %s left", n)
		}
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mi, []byte(" "+dir)) {
		t.Errorf("mounts below %s left:\n%s", dir, mi)
	}
	if v2 := supervise.CgroupV2Mount(); v2 != "" {
		if _, err := os.Stat(filepath.Join(v2, l.CgroupParent())); err == nil {
			t.Errorf("cgroup %s left", l.CgroupParent())
		}
	}
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("%s left", dir)
	}
}

// listenIn listens on addr in the network namespace pinned at ns; the
// listener is closed when the test ends.
func listenIn(t *testing.T, ns, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	err := inNetns(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}

// dialIn connects from the network namespace pinned at ns.
func dialIn(ns, addr string) error {
	return inNetns(ns, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// outsideNet is a listening address on a network of the host's that is not
// the cluster's: a veth pair of the test's own with 10.99.7.1/24.
func outsideNet(t *testing.T) string {
	t.Helper()
	const name = "stt-outside"
	_ = deleteLink(name)
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "stt-outside-p"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deleteLink(name) })
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := netlink.ParseAddr("10.99.7.1/24")
	if err := netlink.AddrAdd(link, a); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{name, "stt-outside-p"} {
		l, _ := netlink.LinkByName(n)
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "10.99.7.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}

// A subnet that overlaps a network the host has is refused before any
// machine is made, naming the route; a bad subnet is refused at once.
func TestNetnsRefusesOverlap(t *testing.T) {
	outsideNet(t) // 10.99.7.0/24 on stt-outside
	dir := t.TempDir()
	l := newTestNetns(t, dir, "10.99.0.0/16")
	_, err := l.Create(context.Background(), createReq(t, "nt-server-1", cluster.RoleServer))
	if err == nil || !strings.Contains(err.Error(), "overlaps") || !strings.Contains(err.Error(), "stt-outside") {
		t.Fatalf("Create on an overlapping subnet: %v", err)
	}
	if link, _ := findLink(l.Bridge()); link != nil {
		t.Errorf("bridge %s made despite the overlap", l.Bridge())
	}
	l.Destroy(context.Background(), "nt-server-1")
	for _, s := range []string{"10.213.0.1/24", "8.8.8.0/24", "10.0.0.0/30", "fd00::/64", "x"} {
		if _, err := NewNetns(NetnsOptions{Local: LocalOptions{Dir: dir, Cluster: "nt"}, Subnet: s}); err == nil {
			t.Errorf("subnet %q accepted", s)
		}
	}
	p := netip.MustParsePrefix("10.213.0.0/24")
	if b := broadcast(p); b.String() != "10.213.0.255" {
		t.Errorf("broadcast %s", b)
	}
}

// A `steppe up` killed while it makes a machine leaves nothing that
// Destroy and Cleanup cannot remove.
func TestNetnsKilledCreate(t *testing.T) {
	if d := os.Getenv("STEPPE_NETNS_HELPER_DIR"); d != "" {
		// The operator to kill: it makes two machines. Its files are in
		// the parent test's directory, which that test removes.
		l := newTestNetns(t, d, "10.213.8.0/24")
		for _, n := range []string{"nt-server-1", "nt-server-2"} {
			if _, err := l.Create(context.Background(), createReqIn(t, filepath.Dir(d), n, cluster.RoleServer)); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Minute)
		return
	}
	dir := t.TempDir()
	l := newTestNetns(t, dir, "10.213.8.0/24")
	names := []string{"nt-server-1", "nt-server-2"}
	t.Cleanup(func() {
		for _, n := range names {
			l.Destroy(context.Background(), n)
		}
		l.Cleanup(context.Background())
	})
	cmd := exec.Command(os.Args[0], "-test.run=^TestNetnsKilledCreate$", "-test.v")
	cmd.Env = append(os.Environ(), "STEPPE_NETNS_HELPER_DIR="+dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	// Killed once the second machine's namespace is pinned: the first
	// machine runs, the second is half made.
	deadline := time.Now().Add(60 * time.Second)
	for !isNsfs(l.NetnsPath(names[1])) {
		select {
		case <-exited:
			t.Fatalf("the operator ended before the second machine's namespace was made:\n%s", out.String())
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-exited
			t.Fatalf("the second machine's namespace never appeared:\n%s", out.String())
		}
	}
	cmd.Process.Kill()
	<-exited
	ms, err := l.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, m := range ms {
		if m.PID > 0 {
			pids = append(pids, m.PID)
		}
	}
	if len(pids) == 0 {
		t.Fatalf("the first machine's agent did not run: %+v\n%s", ms, out.String())
	}
	for _, m := range ms {
		if err := l.Destroy(context.Background(), m.Name); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	assertNetnsGone(t, l, dir, names, pids)
}
