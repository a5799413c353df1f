"""VIC attach against a hostile or broken host: what arrives on COM1 (or a socket that
stands in for it) is bounded, however much of it comes and however it is shaped.

The real VicAttachServer on a real Loop in this process, the test as the host on its
unix socket (as tests/test_vic_link.py); sans-IO parts are fed directly."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from tether.attach.vic import handshake as hs
from tether.attach.vic import server as vic_server
from tether.loop import Loop

SYN, ACK, NAK = 0x16, 0x06, 0x15


@pytest.fixture
def line(tmp_path):
    """(loop, link, client socket): a socket client before its handshake."""
    loop = Loop()
    host = SimpleNamespace(loop=loop, key=None, root="/", sessions={}, primary=None)
    path = str(tmp_path / "vic.sock")
    server = vic_server.VicAttachServer(host, [f"unix:{path}"])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.connect(path)
        assert loop.run_until(lambda: bool(server.links), timeout=30)
        (link,) = server.links
        client.setblocking(False)
        yield loop, link, client
    finally:
        client.close()
        server.close(grace=0)
        loop.close()


# -- 1. the handshake's rest between attempts ------------------------------------------------
def test_a_resting_handshake_keeps_only_what_the_next_attempt_reads():
    """Bytes that arrive during the 10 ms rest after a failed attempt used to pile up in
    full (22 MB in one rest from a local writer); the next attempt reads its SYN from
    the last two, so two are kept."""
    server = hs.ServerHandshake("head", random_byte=lambda: 9)
    assert server.receive(b"xy") == bytes((NAK,))
    assert server.resting
    for _ in range(128):
        assert server.receive(b"\x00garbage" * 8192) == b""
    assert server.receive(bytes((SYN, 4))) == b""
    assert server.buffered <= 2, f"{server.buffered} bytes held while resting"
    assert server.retry() == bytes((ACK, 5, 9))
    assert server.receive(bytes((ACK, 10))) == bytes((ACK,))
    assert server.established and server.leftover == b""


def test_a_flooding_peer_is_read_once_per_attempt(line):
    """The line is not read while the handshake rests (the reference's ticker does not
    read either): a peer that writes garbage without pause gets one read per attempt,
    the rest waits in the kernel and holds the writer back. It used to be read as fast
    as it came, all of it kept until the next attempt."""
    loop, link, client = line
    sent = 0
    peak = 0

    def flood() -> bool:
        nonlocal sent, peak
        try:
            sent += client.send(b"x" * (1 << 16))
        except BlockingIOError:
            pass
        peak = max(peak, link.handshake.buffered)
        return link.handshake.failures >= 20

    assert loop.run_until(flood, timeout=60), "the handshake stopped failing"
    reads = link.handshake.failures + 2          # one per attempt, one in flight
    assert peak <= vic_server.READ_SIZE, f"{peak} bytes held by the handshake"
    assert sent <= reads * vic_server.READ_SIZE + (1 << 20), (
        f"{sent} bytes taken in {link.handshake.failures} attempts")
