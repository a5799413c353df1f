"""Networking against hostile or broken input: a DHCP server that sends what it likes
(tests/test_network_hostile_server.py, in the peer namespace of a veth pair), and configs
that carry odd text. The agent side is tests/test_network_child.py, as in test_network.py."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_network import (Child, JsonLines, NetPair, _need_root_netns, addresses, child_factory,  # noqa: F401
                          last_publish, netpair, sh)

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "tests" / "test_network_hostile_server.py"
LEASE_IP = "10.77.0.60"


class HostileDhcp(JsonLines):
    """The scriptable server on `peer0`; `command()` changes what it answers."""
    who = "the DHCP server"

    def __init__(self, pair: NetPair, options: dict, lease_ip: str = LEASE_IP):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", pair.peer, sys.executable, str(SERVER), "peer0",
             "10.77.0.1", lease_ip],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        assert self.next_event()["event"] == "ready"
        self.command(options=options)

    def command(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, kind: str, timeout: float = 60.0) -> dict:
        return super().wait_for(lambda event: event["event"] == kind, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def hostile(netpair):
    servers = []

    def start(lease_ip=LEASE_IP, **options):
        server = HostileDhcp(netpair, {"mask": "255.255.255.0", "lease": 120, **options},
                             lease_ip)
        servers.append(server)
        return server
    try:
        yield start
    finally:
        for server in servers:
            server.close()


def bootp_payload(options: bytes, xid: bytes = b"\x12\x34\x56\x78") -> str:
    """A BOOTREPLY with the given raw option bytes, as hex for the server's `send`."""
    head = bytes([2, 1, 6, 0]) + xid + bytes(8) + bytes(4) + bytes(4) + bytes(4)
    head += bytes(16) + bytes(192)
    return (head + b"c\x82Sc" + options + b"\xff").hex()


def dns_of(event) -> list:
    return event["endpoints"]["n"]["dns"]


DYNAMIC = [{"key": "n", "id": "eth0", "name": "n", "default": True}]


# -- the DHCP client survives packets it cannot parse --------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("junk", [
    b"\x35\x01\x05\x3d\x00",            # a client id option of length 0
    b"\x01\x04\xff\xff\xff\x00",        # no message type at all
    b"\x35\x01\x63",                    # a message type that does not exist
    b"\x35\x01\x05",                    # well formed, someone else's xid: the control
], ids=["empty-client-id", "no-message-type", "unknown-message-type", "stray-ack"])
def test_a_malformed_dhcp_packet_does_not_deafen_the_client(netpair, hostile, child_factory,
                                                            junk):
    """One broadcast packet that pyroute2 cannot parse used to end its receiving task: the
    client kept sending but never heard an answer again, so the lease ran out and no new
    one ever came."""
    server = hostile(routers=["10.77.0.1"], dns=["10.77.0.53"], t1=2, t2=100)
    child = child_factory(netpair, DYNAMIC, hold=300)
    first = child.wait_for(lambda e: e["event"] in ("publish", "error"))
    assert first["event"] == "publish" and dns_of(first) == ["10.77.0.53"], first
    server.command(send=bootp_payload(junk))
    server.wait_for("sent")
    server.command(options={"mask": "255.255.255.0", "lease": 120, "routers": ["10.77.0.1"],
                            "dns": ["10.77.0.54"], "t1": 2, "t2": 100})
    renewed = child.wait_for(lambda e: e["event"] == "publish" and dns_of(e) == ["10.77.0.54"],
                             timeout=60)
    assert renewed["endpoints"]["n"]["assigned"] == f"{LEASE_IP}/24"


@pytest.mark.root
def test_the_client_hears_the_server_again_after_the_link_went_down_and_up(
        netpair, hostile, child_factory):
    """A raw socket on a link that goes down gets ENETDOWN; pyroute2's receiving task then
    returns quietly. The client must be restarted, not left deaf with its lease running
    out."""
    server = hostile(routers=["10.77.0.1"], dns=["10.77.0.53"], t1=2, t2=100)
    child = child_factory(netpair, DYNAMIC, hold=300)
    first = child.wait_for(lambda e: e["event"] in ("publish", "error"))
    assert first["event"] == "publish" and dns_of(first) == ["10.77.0.53"], first
    child.wait_for(lambda e: e["event"] == "applied")
    sh("ip", "-n", netpair.agent, "link", "set", "dev", "n", "down")
    time.sleep(1)
    sh("ip", "-n", netpair.agent, "link", "set", "dev", "n", "up")
    server.command(options={"mask": "255.255.255.0", "lease": 120, "routers": ["10.77.0.1"],
                            "dns": ["10.77.0.54"], "t1": 2, "t2": 100})
    renewed = child.wait_for(lambda e: e["event"] == "publish" and dns_of(e) == ["10.77.0.54"],
                             timeout=60)
    assert renewed["endpoints"]["n"]["assigned"] == f"{LEASE_IP}/24"
    assert addresses(netpair, "n") == [f"{LEASE_IP}/24"]
    # the routes the link lost when it went down are back
    assert any(r["dst"] == "default" and r.get("gateway") == "10.77.0.1"
               for r in netpair.agent_json("route", "show"))


# -- lease values no NIC should get ---------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("lease_ip,mask,problem", [
    ("127.0.0.5", "255.255.255.0", "address 127.0.0.5/24: loopback"),
    ("224.0.0.5", "255.255.255.0", "address 224.0.0.5/24: multicast"),
    ("0.0.0.0", "255.255.255.0", "address 0.0.0.0/24: unspecified"),
    ("10.77.0.255", "255.255.255.0", "address 10.77.0.255/24: the network or broadcast address of 10.77.0.0/24"),
    ("10.77.0.60", "0.0.0.0", "address 10.77.0.60/0: a subnet mask of 0.0.0.0"),
    ("10.77.0.60", "255.0.255.0", "address 10.77.0.60 with the subnet mask 255.0.255.0"),
    ("10.77.0.60", None, "address 10.77.0.60 without a subnet mask"),
])
def test_an_unusable_lease_is_refused_with_a_clear_error(netpair, hostile, child_factory,
                                                         lease_ip, mask, problem):
    """The address was put on the NIC as given (127.0.0.5/24 took over part of loopback's
    range), published, and the boot then failed on the route with 'Network is
    unreachable'; a lease without a mask looked like no server at all."""
    hostile(lease_ip=lease_ip, mask=mask, routers=["10.77.0.1"], dns=["10.77.0.53"])
    child = child_factory(netpair, DYNAMIC, dhcp_timeout=20)
    events = child.run_to_end()
    assert events[-1]["event"] == "error", events
    assert events[-1]["message"] == (
        f"network n: DHCP server 10.77.0.1 gave an unusable lease on n: {problem}")
    assert addresses(netpair, "n") == []
    assert all(e["endpoints"]["n"]["assigned"] == "" for e in events if e["event"] == "publish")


@pytest.mark.root
def test_unusable_routers_dns_servers_and_mtu_of_a_lease_are_left_out(netpair, hostile,
                                                                     child_factory):
    """The first router was taken as it came (0.0.0.0: a default route with no gateway),
    every DNS server went into resolv.conf, and an MTU of 100 was set on the NIC (which
    takes IPv6 off it: below 1280)."""
    hostile(routers=["0.0.0.0", "255.255.255.255", "10.77.0.1"],
            dns=["0.0.0.0", "224.0.0.1", "127.0.0.1", "10.77.0.53"], mtu=100)
    child = child_factory(netpair, DYNAMIC)
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    pub = last_publish(events)
    assert pub["endpoints"]["n"] == {"assigned": f"{LEASE_IP}/24", "gateway": "10.77.0.1/24",
                                     "dns": ["10.77.0.53"]}
    assert pub["files"]["resolv.conf"].splitlines()[0:2] == ["nameserver 10.77.0.53",
                                                             "options timeout:15"]
    assert netpair.agent_json("link", "show", "n")[0]["mtu"] == 1500
    routes = netpair.agent_json("route", "show")
    assert any(r["dst"] == "default" and r.get("gateway") == "10.77.0.1" for r in routes)
    assert "router 0.0.0.0 ignored (unspecified)" in child.stderr
    assert "MTU 100 ignored" in child.stderr


@pytest.mark.root
def test_a_lease_mtu_the_nic_cannot_take_leaves_the_rest_of_the_lease_applied(
        netpair, hostile, child_factory):
    """A macvlan cannot go above its lower link's MTU (as a vmxnet3 cannot above 9000):
    the kernel's EINVAL used to fail the whole endpoint."""
    sh("ip", "-n", netpair.agent, "link", "add", "link", "eth0", "name", "mv0",
       "type", "macvlan", "mode", "bridge")
    sh("ip", "-n", netpair.agent, "link", "set", "dev", "eth0", "up")
    hostile(routers=["10.77.0.1"], dns=["10.77.0.53"], mtu=9000)
    child = child_factory(netpair, [{"key": "n", "id": "mv0", "name": "n", "default": True}])
    events = child.run_to_end()
    assert events[-1]["event"] == "done", (events, child.stderr)
    assert last_publish(events)["endpoints"]["n"]["assigned"] == f"{LEASE_IP}/24"
    assert addresses(netpair, "mv0") == [f"{LEASE_IP}/24"]
    assert netpair.agent_json("link", "show", "mv0")[0]["mtu"] == 1500
    assert "the lease's MTU 9000 on mv0" in child.stderr


# -- a server that refuses every REQUEST ----------------------------------------------------------
@pytest.mark.root
def test_a_server_that_refuses_every_request_is_not_asked_in_a_tight_loop(
        netpair, hostile, child_factory):
    """pyroute2 starts over at once after a NAK; against a server that offers and then
    refuses, the client went round DISCOVER/OFFER/REQUEST/NAK about 800 times a second.
    Now each NAK in a row doubles the wait (the first restarts at once); a lease comes
    again once the server stops refusing."""
    server = hostile(routers=["10.77.0.1"], dns=["10.77.0.53"], t1=2, t2=100)
    child = child_factory(netpair, DYNAMIC, hold=300)
    first = child.wait_for(lambda e: e["event"] in ("publish", "error"))
    assert first["event"] == "publish", first
    server.command(nak=True)
    lost = child.wait_for(lambda e: e["event"] == "publish"
                          and e["endpoints"]["n"]["assigned"] == "", timeout=60)
    assert lost["endpoints"]["n"]["dns"] == []
    naks = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:      # a window to count in, not a timing assertion
        try:
            naks += server.next_event(max(0.1, deadline - time.monotonic()))["event"] == "nak"
        except AssertionError:
            break                           # nothing more in the window
    assert naks < 20, f"{naks} NAKs in 10 s: the client asks in a loop"
    server.command(nak=False)
    again = child.wait_for(lambda e: e["event"] == "publish"
                           and e["endpoints"]["n"]["assigned"] == f"{LEASE_IP}/24", timeout=120)
    assert dns_of(again) == ["10.77.0.53"]


# -- a router outside the lease's subnet ----------------------------------------------------------
@pytest.mark.root
def test_a_router_outside_the_leases_subnet_is_reached_on_the_link(netpair, hostile,
                                                                   child_factory):
    """Clouds hand out /32 leases whose router is outside them: the kernel refuses a
    default route via a gateway it has no route to ('Network is unreachable'), which
    failed the endpoint at boot, and a renewal naming such a router had already deleted
    the default route before the replace failed. A host route to the router on the link
    comes first now, and the old route goes only once the new one is in."""
    server = hostile(mask="255.255.255.255", routers=["10.77.0.1"], dns=["10.77.0.53"],
                     t1=2, t2=100)
    child = child_factory(netpair, DYNAMIC, hold=300)
    first = child.wait_for(lambda e: e["event"] in ("publish", "error"))
    assert first["event"] == "publish", (first, child.stderr)
    child.wait_for(lambda e: e["event"] == "applied")
    assert addresses(netpair, "n") == [f"{LEASE_IP}/32"]
    routes = netpair.agent_json("route", "show")
    assert any(r["dst"] == "default" and r.get("gateway") == "10.77.0.1" for r in routes), routes
    # a renewal that names another router outside the subnet: the route follows it
    server.command(options={"mask": "255.255.255.255", "lease": 120, "routers": ["10.77.0.2"],
                            "dns": ["10.77.0.54"], "t1": 2, "t2": 100})
    child.wait_for(lambda e: e["event"] == "publish" and dns_of(e) == ["10.77.0.54"], timeout=60)
    deadline = time.monotonic() + 30
    while True:
        defaults = [r.get("gateway") for r in netpair.agent_json("route", "show")
                    if r["dst"] == "default"]
        if defaults == ["10.77.0.2"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert defaults == ["10.77.0.2"], (defaults, child.stderr)
