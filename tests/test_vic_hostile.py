"""VIC attach against a hostile or broken host: what arrives on COM1 (or a socket that
stands in for it) is bounded, however much of it comes and however it is shaped.

The real VicAttachServer on a real Loop in this process, the test as the host on its
unix socket (as tests/test_vic_link.py); sans-IO parts are fed directly."""
from __future__ import annotations

import socket
import time

import pytest

import vicssh_client as vc
from helpers import session_config, sid, vic_socket_server
from test_vic_attach_sandbox import cat_session, key, vic   # noqa: F401 (fixtures)
from tether.attach.vic import handshake as hs
from tether.attach.vic import server as vic_server
from tether.attach.vic import wire

SYN, ACK, NAK = 0x16, 0x06, 0x15


@pytest.fixture
def line(tmp_path):
    """(loop, link, client socket): a socket client before its handshake."""
    with vic_socket_server(tmp_path, socket.SO_SNDBUF, 4096) as (loop, server, client):
        assert loop.run_until(lambda: bool(server.links), timeout=30)
        (link,) = server.links
        client.setblocking(False)
        yield loop, link, client


def attach_when_free(client, session_id: str, timeout: float = 20.0):
    """Attach once the agent has seen a channel's close through (asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.attach(session_id)
        except vc.Refused as refused:
            if (refused.code != wire.OPEN_RESOURCE_SHORTAGE
                    or time.monotonic() > deadline):
                raise
            time.sleep(0.05)


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


# -- 2. a comma in a session ID ---------------------------------------------------------------
def test_a_name_list_never_carries_a_comma_inside_a_name():
    """Go's ssh.Marshal joins a []string with bare commas and the port layer splits on
    every one: "a,b" would come back as two names."""
    assert wire.decode_name_list(wire.encode_name_list(["a", "b"])) == ["a", "b"]
    with pytest.raises(ValueError, match="comma"):
        wire.encode_name_list(["a,b"])


def test_a_session_id_with_a_comma_is_not_served_and_says_why(vic):
    """container-ids used to list "ID,with,commas" as it is: the port layer read three
    sessions, none of them real. Such a session is left out, its attach refused, and
    the log says why, once."""
    odd = session_config(sid()[:20] + ",two,three", ["/bin/cat"], attach=True,
                         open_stdin=True)
    plain = cat_session()
    box, path = vic(plain, odd)
    client = vc.connect(path)
    try:
        assert client.container_ids() == [plain.id]
        assert client.container_ids() == [plain.id]
        with pytest.raises(vc.Refused) as refused:
            client.attach(odd.id)
        assert refused.value.code == wire.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert refused.value.text == wire.unlistable_session(odd.id)
        with pytest.raises(vc.Refused) as refused:     # a piece of it is no session
            client.attach(odd.id.split(",")[0])
        assert refused.value.text.endswith(" is invalid")
        vc.echoed(client.attach(plain.id), b"the others are served\n")
    finally:
        client.close()
    assert box.log_text().count("use the agent's own attach protocol for it") == 1


# -- 3. channels ---------------------------------------------------------------------------
def test_attach_channels_to_one_session_are_capped_per_connection(vic):
    """Every attach channel holds its own copy of the session's output until its window
    opens: 2000 channels that read nothing made 60 KB of output 118 MB in PID 1. One
    connection gets CHANNELS_PER_SESSION to a session; a closed one frees its place."""
    from tether.attach.vic.sshserver import CHANNELS_PER_SESSION
    primary, other = cat_session(), cat_session()
    box, path = vic(primary, other)
    client = vc.connect(path)
    try:
        chans = [client.attach(primary.id) for _ in range(CHANNELS_PER_SESSION)]
        with pytest.raises(vc.Refused) as refused:
            client.attach(primary.id)
        assert refused.value.code == wire.OPEN_RESOURCE_SHORTAGE
        assert refused.value.text == wire.too_many_channels(primary.id, CHANNELS_PER_SESSION)
        another = client.attach(other.id)
        vc.echoed(another, b"another session is not counted\n")
        closing = chans.pop()
        # paramiko drops the transport on a message for a channel it has not noted as
        # seen (its own opens note them; tests/vicssh_client.py opens by hand)
        client.transport.channels_seen[closing.get_id()] = True
        closing.close()
        chan = attach_when_free(client, primary.id)
        vc.echoed(chan, b"a closed channel left its place\n")
    finally:
        client.close()
    second = vc.connect(path)          # the port layer's next connection starts afresh
    try:
        vc.echoed(second.attach(primary.id), b"a new connection\n")
    finally:
        second.close()


# -- 4. what a host's requests put in the log ------------------------------------------------
def test_a_host_flooding_requests_does_not_flood_the_log(vic):
    """The console keeps the newest output and drops the oldest when it is behind (a
    serial console takes ~130 lines a second): one line per request let a host push
    the agent's own log off it. Each kind a peer can repeat is rate limited."""
    import paramiko
    primary = cat_session()
    box, path = vic(primary)
    client = vc.connect(path)
    floods = 300
    try:
        for i in range(floods):
            ok, _ = client.global_request(f"junk-{i}")
            assert not ok
        for i in range(floods):
            with pytest.raises(vc.Refused):
                client.attach(f"nobody-{i}")
        chan = client.attach(primary.id)
        for _ in range(floods):
            assert client.resize(chan, 80, 24) is False      # not a tty
        vc.echoed(chan, b"still served\n")
    finally:
        client.close()
    for _ in range(60):
        with pytest.raises(paramiko.AuthenticationException):
            vc.connect(path, user="root")
    text = box.log_text()
    for needle, sent in (("global request 'junk-", floods), ("session nobody-", floods),
                         ("window-change request for non-tty", floods),
                         ("refusing user 'root'", 60)):
        assert text.count(needle) <= sent // 4, (needle, text.count(needle))


def test_handshake_answers_wait_for_the_line_before_more_is_read(line):
    """A peer that writes SYNs and reads nothing: each attempt queued three or four
    more bytes of answers behind the ones the line had not taken, for as long as it
    went on (a line has no deadline). The reference's write blocks until the line takes
    it; here the handshake reads nothing more until its answers are out."""
    loop, link, client = line
    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link._write_line(b"\x15" * (1 << 20))     # the line is behind (nobody reads it)
    behind = len(link._out)
    assert behind, "the socket took everything: nothing is left queued"

    def syns() -> bool:
        try:
            client.send(bytes((SYN, 1)))
        except BlockingIOError:
            pass
        return link.handshake.failures >= 10

    loop.run_until(syns, timeout=1.5)         # with the line stuck, nothing should move
    assert len(link._out) == behind, (
        f"{len(link._out) - behind} bytes of answers queued in "
        f"{link.handshake.failures} attempts behind a line that takes nothing")

    def reading_again() -> bool:              # the host reads again: the handshake goes on
        try:
            while client.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
        return syns()

    assert loop.run_until(reading_again, timeout=30)
