"""Flow control and channel ends in the attach server (tether/attach/server.py,
channels.py), driven step by step: the real AttachServer and Connection on a real Loop,
the test as the client on the other end of a socketpair, and a stand-in session that
records who pauses its output.

The session is a stand-in so that the test decides exactly how much output is queued
and how much the client has taken; everything between the two is the real code.
"""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from tether.attach import protocol as p
from tether.attach import server as attach_server
from tether.attach import transports
from tether.loop import Loop
from tether.sessions import Phase

KEY = b"flow-key"


class Output:
    """The OutputFanout interface AttachChannel uses."""

    def __init__(self):
        self.listeners: list = []

    def subscribe(self, listener) -> None:
        if listener not in self.listeners:
            self.listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def replay(self):
        return []

    def publish(self, data: bytes) -> None:
        for listener in list(self.listeners):
            listener.on_output("stdout", data)


class Session:
    """A running session as the attach server sees it; records output pauses."""

    def __init__(self, sid: str = "s1"):
        self.id = sid
        self.config = SimpleNamespace(tty=False, exit_status=0, started="")
        self.running = True
        self.phase = Phase.RUNNING
        self.output = Output()
        self.holders: set = set()

    def pause_output(self, holder=None) -> None:
        self.holders.add(holder)

    def resume_output(self, holder=None) -> None:
        self.holders.discard(holder)

    def write_stdin(self, data) -> None:
        pass


class Harness:
    """An attach server with one client connected through a socketpair; the test runs
    the loop in steps and reads or writes its end of the pair."""

    def __init__(self):
        self.loop = Loop()
        self.session = Session()
        self.host = SimpleNamespace(loop=self.loop, key=KEY, root="/",
                                    sessions={self.session.id: self.session},
                                    primary=None, exec_session=None,
                                    request_stop=lambda reason: None)
        self.server = attach_server.AttachServer(self.host, [])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setblocking(False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)   # small, so
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)     # we see queues
        self.sock = ours
        self.sock.settimeout(5)
        self.connection = self.server._add(
            transports.Conn(theirs.fileno(), "test client", sock=theirs))
        self.decoder = p.FrameDecoder(accept_unchecked=True)
        self.messages: list[dict] = []

    def step(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            self.loop.run_until(lambda: False, timeout=0.001)

    def send(self, message: dict) -> None:
        """Send a frame, running the loop while the socket is full (it reads us)."""
        view = memoryview(p.encode(message))
        self.sock.setblocking(False)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self.step(1)
        self.step()

    def receive(self, size: int = 1 << 16) -> bytes:
        data = self.sock.recv(size)
        self.messages += self.decoder.feed(data)
        return data

    def wait_for(self, kind: str) -> dict:
        for _ in range(200):
            for message in self.messages:
                if message["t"] == kind:
                    self.messages.remove(message)
                    return message
            self.step(1)
            self.sock.settimeout(0.05)
            try:
                self.receive()
            except (socket.timeout, BlockingIOError):
                pass
        raise AssertionError(f"no {kind} from the server; got {self.messages}")

    def authenticate(self) -> None:
        handshake = p.ClientHandshake(KEY)
        self.send(handshake.start())
        for reply in handshake.receive(self.wait_for(p.HELLO)):
            self.send(reply)
        self.wait_for(p.WELCOME)
        assert self.connection.handshake.authenticated

    def close(self) -> None:
        self.server.close(grace=0)
        self.sock.close()
        self.loop.close()


@pytest.fixture
def harness():
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def test_a_client_that_drains_below_the_low_water_mark_releases_the_session(
        harness, monkeypatch):
    """docs/attach-protocol.md: a client more than 4 MiB behind pauses the session until
    it drains below 1 MiB (for at most 3 s). The pause used to end only when the queue
    was empty, and the 3 s check dropped only a client still 1 MiB or more behind: a
    client that read its backlog down below 1 MiB, not to nothing, and then stopped
    reading (a hostile one; a `tether attach` stopped with ctrl-z) held the session's
    output, and every other client of it, for ever."""
    monkeypatch.setattr(attach_server, "HOLD_SECONDS", 30.0)   # no drop while we drain
    h = harness
    h.authenticate()
    h.send({"t": p.ATTACH, "ch": 1, "session": h.session.id})
    assert h.wait_for(p.OK)["ch"] == 1
    connection = h.connection
    chunk = bytes(256 << 10)
    while connection.backlog <= attach_server.HOLD_AT:      # the client reads nothing
        h.session.output.publish(chunk)
    assert h.session.holders == {connection}                # held: the session waits
    # The client takes part of its backlog, down below LOW_WATER but not to nothing...
    while connection.backlog >= attach_server.LOW_WATER:
        h.receive(64 << 10)
        h.step(1)
    assert 0 < connection.backlog < attach_server.LOW_WATER and not connection.closed
    # ... and then stops reading.
    h.step(5)
    assert not h.session.holders, (
        f"a client {connection.backlog} bytes behind (under the {attach_server.LOW_WATER}"
        "-byte low-water mark) still holds the session's output")


def test_an_attach_whose_reply_drops_the_client_leaves_no_listener_behind(harness):
    """An attach answered when the client is at its output limit: the `ok` drops the
    client (its channels are detached), and the attach used to go on and subscribe to
    the session anyway: a listener for a connection that is gone, kept as long as the
    session lives (and on a line, the session's output sent on to whoever talks next,
    unauthenticated)."""
    h = harness
    h.authenticate()
    connection = h.connection
    filler = b"\0" * attach_server.OUTPUT_LIMIT           # the client reads none of it
    connection.send_bytes(filler)
    connection.send_bytes(filler[:attach_server.OUTPUT_LIMIT - connection.backlog - 8])
    assert connection.backlog == attach_server.OUTPUT_LIMIT - 8 and not connection.closed
    h.send({"t": p.ATTACH, "ch": 1, "session": h.session.id})
    assert connection.closed                              # the ok went over the limit
    assert h.session.output.listeners == [], "a dropped client is still subscribed"


def test_a_request_whose_ch_is_not_a_channel_gets_an_error_without_it(harness):
    """A request whose `ch` is not an integer is refused; the refusal used to carry that
    `ch` back, so a `ch` of nearly a mebibyte made the reply too big to encode: the
    ProtocolError escaped to the agent's loop (a traceback in the log per frame) and
    the client got no answer."""
    h = harness
    h.authenticate()
    bogus = b"\0" * (p.MAX_PAYLOAD - 32)
    h.send({"t": p.PING, "ch": bogus})
    refusal = h.wait_for(p.ERROR)
    assert refusal["ch"] is None and "'ch' must be int" in refusal["msg"]
    h.send({"t": p.PING, "ch": 7})                        # and the connection goes on
    assert h.wait_for(p.OK)["ch"] == 7


def test_a_unix_endpoint_never_removes_a_file_that_is_not_a_socket(tmp_path):
    """`unix:PATH` removes a stale socket left at PATH before it binds. It used to remove
    whatever was there: `--attach-socket ./config.json` (a slip of the hand) deleted the
    file. Now only a socket goes; anything else stays and the endpoint is not opened
    (as the VIC attach server already did)."""
    precious = tmp_path / "config.json"
    precious.write_text("{}")
    stale = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(stale))
    old.close()                                       # a socket file nobody listens on
    loop = Loop()
    host = SimpleNamespace(loop=loop, key=KEY, root="/", sessions={})
    try:
        server = attach_server.AttachServer(host, [f"unix:{precious}", f"unix:{stale}"])
        try:
            assert precious.read_text() == "{}"
            assert list(server.failed) == [f"unix:{precious}"]
            assert [listener.name for listener in server.listeners] == [f"unix:{stale}"]
        finally:
            server.close(grace=0)
    finally:
        loop.close()
