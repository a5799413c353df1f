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

from helpers import require_root
from test_network import (Child, NetPair, _need_root_netns, addresses, child_factory,  # noqa: F401
                          last_publish, netpair, sh)

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "tests" / "test_network_hostile_server.py"
LEASE_IP = "10.77.0.60"


class HostileDhcp:
    """The scriptable server on `peer0`; `command()` changes what it answers."""

    def __init__(self, pair: NetPair, options: dict):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", pair.peer, sys.executable, str(SERVER), "peer0",
             "10.77.0.1", LEASE_IP],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        assert self.next_event()["event"] == "ready"
        self.command(options=options)

    def command(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def next_event(self, timeout: float = 60.0) -> dict:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no event from the DHCP server: {self.events}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"DHCP server ended: {self.proc.stderr.read()}")
        event = json.loads(line)
        self.events.append(event)
        return event

    def wait_for(self, kind: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            if event["event"] == kind:
                return event

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def hostile(netpair):
    servers = []

    def start(**options):
        server = HostileDhcp(netpair, {"mask": "255.255.255.0", "lease": 120, **options})
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
