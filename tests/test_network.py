"""Networking against the real kernel: network namespaces joined by veth pairs, a real dnsmasq
in the peer namespace, the agent side run by tests/test_network_child.py under `ip netns exec`
(which also gives it its own /sys and a private mount namespace for the /etc bind mounts)."""
from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import require_root, require_tool
from tether.network.nic import classify, find_interface_name, slot_to_pci_path, NicNotFound

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "test_network_child.py"


# -- pure: the reference's PCI slot table ------------------------------------------------------
@pytest.mark.parametrize("slot,numbering,path", [
    (0, "old", "0000:00:00.0"),
    (32, "old", "0000:00:11.0/0000:*:00.0"),
    (33, "old", "0000:00:11.0/0000:*:01.0"),
    (192, "old", "0000:00:16.0/0000:*:00.0"),
    (224, "old", "0000:00:17.0/0000:*:00.0"),
    (256, "old", "0000:00:18.0/0000:*:00.0"),
    (1184, "new", "0000:00:15.1/0000:*:00.0"),
    (1216, "new", "0000:00:16.1/0000:*:00.0"),
    (1248, "new", "0000:00:17.1/0000:*:00.0"),
    (1280, "new", "0000:00:18.1/0000:*:00.0"),
    # fn = 0: both numberings agree
    (192, "new", "0000:00:16.0/0000:*:00.0"),
    # the old numbering keeps the function on the device
    (1184, "old", "0000:00:15.0/0000:*:00.1"),
    # bus 16 -> bridge slot 0x20, itself behind bridge 0x11
    (16 << 5, "old", "0000:00:11.0/0000:*:00.0/0000:*:00.0"),
])
def test_slot_to_pci_path(slot, numbering, path):
    assert slot_to_pci_path(slot, numbering) == path


def test_classify_endpoint_ids():
    assert classify("192") == "slot"
    assert classify("0000:00:05.0") == "pci"
    assert classify("00:05.0") == "pci"
    assert classify("52:54:00:12:34:56") == "mac"
    assert classify("eth0") == "name"


def test_find_interface_by_slot_in_a_fake_sysfs_tree(tmp_path):
    # the sysfs layout of a vNIC behind bridge 0x15 function 1 (new numbering), and virtio
    (tmp_path / "0000:00:15.1" / "0000:0b:00.0" / "net" / "ens224").mkdir(parents=True)
    (tmp_path / "0000:00:05.0" / "virtio2" / "net" / "eth1").mkdir(parents=True)
    assert find_interface_name("1184", [], str(tmp_path)) == "ens224"
    assert find_interface_name("0000:00:05.0", [], str(tmp_path)) == "eth1"
    with pytest.raises(NicNotFound, match="no network interface at PCI slot 1216"):
        find_interface_name("1216", [], str(tmp_path))
    links = [(1, "lo", "00:00:00:00:00:00"), (2, "eth0", "52:54:00:aa:bb:cc")]
    assert find_interface_name("52:54:00:AA:BB:CC", links) == "eth0"
    with pytest.raises(NicNotFound, match="no network interface named 'eth9'"):
        find_interface_name("eth9", links)


def test_client_id_pieces():
    from tether.network.clientid import client_id, siphash24, vmware_serial_to_uuid
    # SipHash-2-4 vectors from the paper's reference implementation
    key = bytes(range(16))
    assert siphash24(key, b"") == 0x726FDB47DD0E0E31
    assert siphash24(key, bytes(range(15))) == 0xA129CA6149BE45E5
    assert siphash24(key, bytes(range(8))) == 0x93F5F5799A932462
    assert vmware_serial_to_uuid(
        "VMware-56 4d 7c 3a 9b 10 4e 2f-8a 11 22 33 44 55 66 77") == \
        "564d7c3a-9b10-4e2f-8a11-223344556677"
    assert vmware_serial_to_uuid("QEMU") is None
    cid = client_id(bytes.fromhex("005056aabbcc"), "564d7c3a-9b10-4e2f-8a11-223344556677")
    assert len(cid) == 4 + 2 + 4 + 8
    assert cid[4:10] == b"\x00\x02\x00\x00\x1a\xdc"     # DUID-EN, PEN 6876
    # stable per MAC and machine, different across MACs
    assert cid == client_id(bytes.fromhex("005056aabbcc"), "564d7c3a-9b10-4e2f-8a11-223344556677")
    assert cid[:4] != client_id(bytes.fromhex("005056aabbcd"), "x")[:4]
    # The reference's derivation: SipHash of the MAC and of the UUID's raw bytes with
    # VIC's key; the IAID folds the 64-bit hash, the DUID carries it big-endian.
    from tether.network.clientid import HASH_KEY
    import struct, uuid
    mac_hash = siphash24(HASH_KEY, bytes.fromhex("005056aabbcc"))
    assert cid[:4] == struct.pack(">I", (mac_hash & 0xFFFFFFFF) ^ (mac_hash >> 32))
    raw = uuid.UUID("564d7c3a-9b10-4e2f-8a11-223344556677").bytes
    assert cid[10:] == struct.pack(">Q", siphash24(HASH_KEY, raw))


# -- namespaces --------------------------------------------------------------------------------
def _need_root_netns():
    require_root("network namespaces")
    require_tool("ip")


def sh(*argv, check=True, timeout=60):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


class NetPair:
    """Two namespaces joined by a veth: `eth0` in the agent one, `peer0` (addresses given)
    in the peer one."""

    def __init__(self, peer_addrs=("10.77.0.1/24",), agent_ifname="eth0"):
        tag = secrets.token_hex(3)
        self.agent, self.peer = f"tna-{tag}", f"tnp-{tag}"
        self.created = []
        sh("ip", "netns", "add", self.agent); self.created.append(self.agent)
        sh("ip", "netns", "add", self.peer); self.created.append(self.peer)
        a, p = f"va{tag}", f"vp{tag}"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", p)
        sh("ip", "link", "set", a, "netns", self.agent)
        sh("ip", "link", "set", p, "netns", self.peer)
        sh("ip", "-n", self.agent, "link", "set", a, "name", agent_ifname)
        sh("ip", "-n", self.peer, "link", "set", p, "name", "peer0")
        for ns in (self.agent, self.peer):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for addr in peer_addrs:
            extra = ["nodad"] if ":" in addr else []
            sh("ip", "-n", self.peer, "addr", "add", addr, "dev", "peer0", *extra)
        sh("ip", "-n", self.peer, "link", "set", "peer0", "up")
        self.agent_ifname = agent_ifname

    def close(self):
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)

    def agent_json(self, *args):
        return json.loads(sh("ip", "-n", self.agent, "-j", *args).stdout or "[]")


@pytest.fixture
def netpair(request):
    _need_root_netns()
    params = getattr(request, "param", {})
    pair = NetPair(**params)
    try:
        yield pair
    finally:
        pair.close()


class JsonLines:
    """A process (`self.proc`, text stdout) that reports one JSON object a line; what
    has come is in `self.events`. `who` names it in failures."""
    who = "the child"

    def next_event(self, timeout=90.0):
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=max(0.0, timeout)):
                raise AssertionError(f"no event from {self.who} in time: {self.events[-5:]}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{self.who} ended: {self.proc.stderr.read()}")
        event = json.loads(line)
        self.events.append(event)
        return event

    def wait_for(self, predicate, timeout=90.0):
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            if predicate(event):
                return event


class Child(JsonLines):
    """The agent side: NetworkManager in the agent namespace; JSON lines out."""

    def __init__(self, pair: NetPair, tmp_path: Path, endpoints, **extra):
        root, state = tmp_path / "root", tmp_path / "state"
        (root / "etc").mkdir(parents=True, exist_ok=True)
        if not (root / "etc" / "hosts").exists():
            (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n10.1.1.1 imagehost\n")
        self.stop_file = tmp_path / "stop"
        spec = {"endpoints": endpoints, "root": str(root), "state": str(state),
                "hostname": "c0ffee123456", "stop_file": str(self.stop_file), **extra}
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.root = root
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", pair.agent, sys.executable, str(CHILD), str(spec_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        self.events = []

    def run_to_end(self, timeout=120.0):
        out, err = self.proc.communicate(timeout=timeout)
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        self.stderr = err
        return self.events

    def stop(self):
        self.stop_file.touch()

    def close(self):
        if self.proc.poll() is None:
            self.stop()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def child_factory(tmp_path):
    children = []

    def make(pair, endpoints, **extra):
        child = Child(pair, tmp_path, endpoints, **extra)
        children.append(child)
        return child
    try:
        yield make
    finally:
        for c in children:
            c.close()


def last_publish(events):
    pubs = [e for e in events if e["event"] == "publish"]
    assert pubs, events
    return pubs[-1]


def addresses(pair, ifname):
    out = []
    for link in pair.agent_json("addr", "show", "dev", ifname):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global":
                out.append(f"{a['local']}/{a['prefixlen']}")
    return sorted(out)


# -- static ------------------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("netpair", [{"peer_addrs": ("10.77.0.1/24", "fd77::1/64")}],
                         indirect=True)
def test_static_v4_and_v6_with_default_route_and_destinations(netpair, child_factory):
    child = child_factory(netpair, [
        {"key": "public", "id": "eth0", "name": "public", "static": True,
         "ip": "10.77.0.2/24", "gateway": "10.77.0.1/24", "default": True,
         "dns": ["10.77.0.53"]},
        {"key": "v6net", "id": "public", "name": "public", "static": True,
         "ip": "fd77::2/64", "gateway": "fd77::1/64",
         "destinations": ["fd88::/64", "10.99.0.0/16"], "network_name": "v6net"},
    ])
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    pub = last_publish(events)
    assert pub["endpoints"]["public"] == {
        "assigned": "10.77.0.2/24", "gateway": "10.77.0.1/24", "dns": ["10.77.0.53"]}
    assert pub["endpoints"]["v6net"] == {
        "assigned": "fd77::2/64", "gateway": "fd77::1/64", "dns": []}

    # eth0 renamed to the endpoint name; both addresses on the one NIC
    assert addresses(netpair, "public") == ["10.77.0.2/24", "fd77::2/64"]
    routes4 = netpair.agent_json("route", "show")
    assert {"dst": "default", "gateway": "10.77.0.1", "dev": "public"}.items() <= \
        next(r for r in routes4 if r["dst"] == "default").items()
    routes6 = netpair.agent_json("-6", "route", "show")
    fd88 = next(r for r in routes6 if r["dst"] == "fd88::/64")
    assert fd88["gateway"] == "fd77::1" and fd88["dev"] == "public"
    # a v4 destination via a v6 gateway is skipped, not mangled
    assert not any(r["dst"] == "10.99.0.0/16" for r in routes4)

    # the /etc files, line by line
    hosts = pub["files"]["hosts"].splitlines()
    assert hosts == [
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "127.0.0.1 localhost",
        "10.1.1.1 imagehost",
        "127.0.1.1\tc0ffee123456",
        "10.77.0.2\tpublic.localhost",
        "fd77::2\tv6net.localhost",
    ]
    assert pub["files"]["resolv.conf"].splitlines() == [
        "nameserver 10.77.0.53",            # static DNS of one network beats the other's gateway
        "options timeout:15", "options attempts:5"]
    assert pub["files"]["hostname"] == "c0ffee123456\n"
    # the peer sees the agent: ping through the configured address
    ping = sh("ip", "netns", "exec", netpair.peer, "busybox", "ping", "-c1", "-W5", "10.77.0.2",
              check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr


@pytest.mark.root
def test_two_endpoints_on_one_nic_alias_and_mtu(netpair, child_factory):
    sh("ip", "-n", netpair.agent, "link", "set", "eth0", "name", "ens9")
    child = child_factory(netpair, [
        {"key": "bridge", "id": "ens9", "name": "bridge", "static": True,
         "ip": "10.77.0.2/24", "gateway": "10.77.0.1/24", "destinations": ["10.80.0.0/16"]},
        {"key": "other", "id": "ens9", "name": "other", "static": True,
         "ip": "10.78.0.2/24", "network_name": "othernet"},
    ], mtus={"bridge": 1400})
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    link = netpair.agent_json("link", "show", "ens9")[0]
    assert link["ifalias"] == "bridge"     # not eth*: alias, not rename; the second is warned
    assert link["mtu"] == 1400
    assert "UP" in link["flags"]
    assert addresses(netpair, "ens9") == ["10.77.0.2/24", "10.78.0.2/24"]
    routes = netpair.agent_json("route", "show")
    assert any(r["dst"] == "10.80.0.0/16" and r.get("gateway") == "10.77.0.1" for r in routes)
    assert not any(r["dst"] == "default" for r in routes)   # not a default network
    pub = last_publish(events)
    assert pub["endpoints"]["other"]["gateway"] == ""
    assert pub["files"]["hosts"].splitlines()[-2:] == [
        "10.77.0.2\tbridge.localhost", "10.78.0.2\tothernet.localhost"]
    # no DNS anywhere: the gateway is the resolver
    assert pub["files"]["resolv.conf"].splitlines()[0] == "nameserver 10.77.0.1"


@pytest.mark.root
@pytest.mark.parametrize("netpair", [{"peer_addrs": ("fd77::1/64",)}], indirect=True)
def test_static_v6_default_route_and_a_changed_address_on_reload(netpair, child_factory):
    child = child_factory(netpair, [
        {"key": "v6", "id": "eth0", "name": "v6", "static": True, "ip": "fd77::2/64",
         "gateway": "fd77::1/64", "default": True, "dns": ["fd77::53"]},
        {"key": "same", "id": "eth0", "name": "v6", "static": True, "ip": "fd77::9/64"}],
        change={"v6": "fd77::3/64"})
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    routes6 = netpair.agent_json("-6", "route", "show")
    default = next(r for r in routes6 if r["dst"] == "default")
    assert default["gateway"] == "fd77::1" and default["dev"] == "v6"
    # the changed endpoint moved from ::2 to ::3; the unchanged one was left alone
    assert addresses(netpair, "v6") == ["fd77::3/64", "fd77::9/64"]
    pubs = [e for e in events if e["event"] == "publish"]
    assert len(pubs) == 2     # the first apply and the reload; the idempotent apply is silent
    assert pubs[-1]["endpoints"]["v6"]["assigned"] == "fd77::3/64"
    assert pubs[-1]["files"]["resolv.conf"].splitlines()[0] == "nameserver fd77::53"
    assert "fd77::3\tv6.localhost" in pubs[-1]["files"]["hosts"].splitlines()


@pytest.mark.root
def test_rename_by_mac_and_externally_managed(netpair, child_factory):
    mac = netpair.agent_json("link", "show", "eth0")[0]["address"]
    child = child_factory(netpair, [
        {"key": "ext", "id": mac, "name": "ext", "static": True, "ip": "0.0.0.0/0"}])
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    link = netpair.agent_json("link", "show", "ext")[0]
    assert link["address"] == mac and "UP" in link["flags"]
    assert addresses(netpair, "ext") == []      # managed externally: no address added


@pytest.mark.root
def test_missing_nic_gives_a_clear_error(netpair, child_factory):
    child = child_factory(netpair, [
        {"key": "a", "id": "1216", "name": "a", "static": True, "ip": "10.77.0.2/24"},
        {"key": "b", "id": "eth0", "name": "b", "static": True, "ip": "10.77.0.3/24"}])
    events = child.run_to_end()
    assert events[-1]["event"] == "error", events
    message = events[-1]["message"]
    assert message.startswith("network a: no network interface at PCI slot 1216")
    assert "check the vNIC is connected" in message
    # the other endpoint is configured all the same
    assert addresses(netpair, "b") == ["10.77.0.3/24"]


@pytest.mark.root
def test_gratuitous_arp_sent_on_apply(netpair, child_factory):
    # listen for ARP on the peer side, inside its namespace, with a raw socket in a thread
    code = ("import socket,sys;s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,"
            "socket.htons(0x0806));s.bind(('peer0',0));s.settimeout(60);print('ready',flush=True)\n"
            "while True:\n"
            " f=s.recv(100)\n"
            " if f[20:22]==b'\\x00\\x01' and f[28:32]==f[38:42]==socket.inet_aton('10.77.0.2'):\n"
            "  print('garp',flush=True);break\n")
    listener = subprocess.Popen(["ip", "netns", "exec", netpair.peer, sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        child = child_factory(netpair, [
            {"key": "n", "id": "eth0", "name": "n", "static": True, "ip": "10.77.0.2/24"}])
        events = child.run_to_end()
        assert events[-1]["event"] == "done", events
        assert listener.stdout.readline().strip() == "garp"
        arp_notify = sh("ip", "netns", "exec", netpair.agent, "cat",
                        "/proc/sys/net/ipv4/conf/n/arp_notify").stdout.strip()
        assert arp_notify == "1"
    finally:
        listener.kill()
        listener.wait()
        listener.stdout.close()


# -- DHCP --------------------------------------------------------------------------------------
class Dnsmasq:
    def __init__(self, pair: NetPair, tmp_path: Path):
        require_tool("dnsmasq")
        self.pair = pair
        self.leases = tmp_path / "dnsmasq.leases"
        self.log = tmp_path / "dnsmasq.log"
        self.proc = None

    def start(self, dns="10.77.0.53", t1=4, extra=()):
        argv = ["ip", "netns", "exec", self.pair.peer, "dnsmasq", "--no-daemon",
                "--conf-file=/dev/null", "--port=0", "--interface=peer0", "--bind-interfaces",
                "--dhcp-authoritative", f"--dhcp-leasefile={self.leases}", "--pid-file",
                "--log-dhcp", "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,120",
                "--dhcp-option=option:router,10.77.0.1",
                f"--dhcp-option=option:dns-server,{dns}",
                f"--dhcp-option=option:T1,{t1}", "--dhcp-option=option:T2,100",
                "--dhcp-option=option:mtu,1420", *extra]
        self.logf = open(self.log, "a")
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "logf", None):
            self.logf.close()
            self.logf = None


@pytest.fixture
def dnsmasq(netpair, tmp_path):
    server = Dnsmasq(netpair, tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.root
def test_dhcp_lease_writeback_renewal_and_server_restart(netpair, dnsmasq, child_factory):
    dnsmasq.start(dns="10.77.0.53")
    child = child_factory(netpair, [
        {"key": "public", "id": "eth0", "name": "public", "default": True}], hold=300)
    first = child.wait_for(lambda e: e["event"] in ("publish", "error"))
    assert first["event"] == "publish", first
    ep = first["endpoints"]["public"]
    assert ep["assigned"].startswith("10.77.0.") and ep["assigned"].endswith("/24")
    assert ep["gateway"] == "10.77.0.1/24"
    assert ep["dns"] == ["10.77.0.53"]
    assert first["files"]["resolv.conf"].splitlines()[0] == "nameserver 10.77.0.53"
    ip = ep["assigned"].split("/")[0]
    assert f"{ip}\tpublic.localhost" in first["files"]["hosts"].splitlines()
    assert child.wait_for(lambda e: e["event"] == "applied")
    assert addresses(netpair, "public") == [ep["assigned"]]
    routes = netpair.agent_json("route", "show")
    assert any(r["dst"] == "default" and r.get("gateway") == "10.77.0.1" for r in routes)
    assert netpair.agent_json("link", "show", "public")[0]["mtu"] == 1420   # option 26

    # the reference's client id (type 255, IAID + DUID-EN with VMware's PEN) and hostname
    deadline = time.monotonic() + 20      # dnsmasq writes its lease file around the ACK
    while not dnsmasq.leases.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    lease_line = dnsmasq.leases.read_text().split()
    assert lease_line[2] == ip and lease_line[3] == "c0ffee123456"
    client_id = bytes.fromhex(lease_line[4].replace(":", ""))
    assert client_id[0] == 255 and client_id[5:7] == b"\x00\x02" and \
        client_id[7:11] == (6876).to_bytes(4, "big") and len(client_id) == 19

    # a short T1: the lease renews, and the write-back is published again
    renewed = child.wait_for(lambda e: e["event"] == "publish", timeout=60)
    assert renewed["endpoints"]["public"]["assigned"] == ep["assigned"]

    # the server goes away past T1, then comes back with another DNS server: the client
    # retries, renews, and the stale DNS server is replaced in write-back and resolv.conf
    dnsmasq.stop()
    stopped_at = time.monotonic()
    time.sleep(8)
    before_restart = len(dnsmasq.log.read_text())
    dnsmasq.start(dns="10.77.0.54")
    after = child.wait_for(
        lambda e: e["event"] == "publish" and e["endpoints"]["public"]["dns"] == ["10.77.0.54"],
        timeout=120)
    assert after["t"] > stopped_at
    assert after["endpoints"]["public"]["assigned"] == ep["assigned"]
    assert after["files"]["resolv.conf"].splitlines() == [
        "nameserver 10.77.0.54", "options timeout:15", "options attempts:5"]
    # what the restarted server saw: the client renewing its lease (a REQUEST for the
    # same address, answered), not starting over with a DISCOVER
    restarted = dnsmasq.log.read_text()[before_restart:]
    assert f"DHCPREQUEST(peer0) {ip} " in restarted, restarted
    assert f"DHCPACK(peer0) {ip} " in restarted, restarted
    assert "DHCPDISCOVER" not in restarted, restarted

    # stop: the lease is released
    child.stop()
    child.wait_for(lambda e: e["event"] == "done", timeout=60)
    deadline = time.monotonic() + 20
    while "DHCPRELEASE" not in dnsmasq.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "DHCPRELEASE(peer0)" in dnsmasq.log.read_text()


@pytest.mark.root
@pytest.mark.slow
def test_dhcp_lease_loss_clears_the_writeback_and_the_next_lease_is_published(
        netpair, dnsmasq, child_factory):
    """SLOW, about 3 minutes: dnsmasq's shortest lease is 2 minutes, and this test lets
    one run out. With the server gone the lease expires: the address goes, `assigned`,
    the assigned gateway and DNS are cleared and published at once, and /etc/hosts and
    resolv.conf lose them. The client keeps asking; when a server answers again the new
    lease is applied and published."""
    dnsmasq.start(dns="10.77.0.53", t1=60)
    child = child_factory(netpair, [
        {"key": "public", "id": "eth0", "name": "public", "default": True}], hold=600)
    first = child.wait_for(lambda e: e["event"] in ("publish", "error"))
    assert first["event"] == "publish", first
    ip = first["endpoints"]["public"]["assigned"].split("/")[0]
    assert ip.startswith("10.77.0."), first
    child.wait_for(lambda e: e["event"] == "applied")
    dnsmasq.stop()

    lost = child.wait_for(lambda e: e["event"] == "publish"
                          and e["endpoints"]["public"]["assigned"] != first["endpoints"][
                              "public"]["assigned"], timeout=240)
    assert lost["endpoints"]["public"] == {"assigned": "", "gateway": "", "dns": []}, lost
    hosts = lost["files"]["hosts"].splitlines()
    assert not any("public.localhost" in line or line.startswith(ip) for line in hosts), hosts
    assert "c0ffee123456" in lost["files"]["hosts"]         # the rest of the file stays
    assert "10.77.0.53" not in lost["files"]["resolv.conf"], lost["files"]["resolv.conf"]
    assert addresses(netpair, "public") == []
    assert not any(r["dst"] == "default" for r in netpair.agent_json("route", "show"))

    dnsmasq.start(dns="10.77.0.54", t1=60)
    again = child.wait_for(lambda e: e["event"] == "publish"
                           and e["endpoints"]["public"]["assigned"] != "", timeout=180)
    ep = again["endpoints"]["public"]
    assert ep["assigned"].startswith("10.77.0.") and ep["gateway"] == "10.77.0.1/24", again
    assert ep["dns"] == ["10.77.0.54"], again
    new_ip = ep["assigned"].split("/")[0]
    assert f"{new_ip}\tpublic.localhost" in again["files"]["hosts"].splitlines()
    assert again["files"]["resolv.conf"].splitlines()[0] == "nameserver 10.77.0.54"
    assert addresses(netpair, "public") == [ep["assigned"]]


@pytest.mark.root
def test_dhcp_renewals_racing_write_backs_never_show_a_half_updated_endpoint(
        netpair, dnsmasq, child_factory):
    """The config belongs to the loop: renewals delivered on DHCP's worker thread are
    applied on the loop, between write-backs, never in the middle of one."""
    dnsmasq.start(t1=60)
    child = child_factory(netpair, [{"key": "n", "id": "eth0", "name": "n"}], race=200)
    events = child.run_to_end(timeout=300)
    assert events[-1]["event"] == "done", (events[-3:], getattr(child, "stderr", ""))
    race = next(e for e in events if e["event"] == "race")
    assert race["writebacks"] >= 50, race          # the write-backs ran during the renewals
    assert race["mixed_count"] == 0, race
    assert race["final"] == race["expected_final"], race   # and every renewal was applied


@pytest.mark.root
def test_dhcp_requests_router_and_dns_only_when_not_configured(netpair, dnsmasq,
                                                               child_factory):
    dnsmasq.start(dns="10.77.0.53", t1=60)
    child = child_factory(netpair, [
        {"key": "n", "id": "eth0", "name": "n", "gateway": "10.77.0.1/24",
         "dns": ["192.0.2.53"]}])
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    pub = last_publish(events)
    assert pub["endpoints"]["n"]["gateway"] == "10.77.0.1/24"
    assert pub["endpoints"]["n"]["dns"] == ["192.0.2.53"]
    assert pub["files"]["resolv.conf"].splitlines()[0] == "nameserver 192.0.2.53"
    log = dnsmasq.log.read_text()
    requested = [line for line in log.splitlines() if "requested options" in line]
    assert requested, log
    joined = " ".join(requested)
    assert "1:netmask" in joined
    assert "3:router" not in joined and "6:dns-server" not in joined


@pytest.mark.root
def test_dhcp_without_server_times_out_clearly(netpair, child_factory):
    child = child_factory(netpair, [{"key": "n", "id": "eth0", "name": "n"}], dhcp_timeout=3)
    events = child.run_to_end()
    assert events[-1]["event"] == "error", events
    assert events[-1]["message"] == (
        "network n: no DHCP lease on n within 3s; is a DHCP server reachable on that network?")


def test_import_does_not_load_pyroute2():
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, tether.network, tether.etcfiles, tether.volumes;"
         "from tether.network import NetworkManager;"
         "from tether.config import ExecutorConfig;"
         "NetworkManager(ExecutorConfig(), None, lambda: None, None, post=None).apply();"
         "print(any(m.startswith('pyroute2') for m in sys.modules))"],
        cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
