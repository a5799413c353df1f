"""The copy channels' loop side (tether/attach/channels.py) against a stand-in connection
on a real Loop: bounded queues between the loop and the worker thread, and a loop that
never waits for the worker."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from tether.attach import channels, copyfiles
from tether.attach import protocol as p
from tether.attach.channels import CopyFromChannel, CopyToChannel
from tether.loop import Loop


class Connection:
    """What a channel uses of tether.attach.server.Connection, recorded."""

    def __init__(self, loop: Loop, room: bool = True):
        self.loop = loop
        self.channels: dict = {}
        self.checked = False
        self.room = room
        self.sent: list[dict] = []
        self.data = bytearray()
        self.paused: set = set()
        self.pauses = 0
        self.wrote_at = time.monotonic()    # when the client last took bytes (idle watch)

    def send(self, message: dict) -> None:
        self.sent.append(message)

    def ok(self, channel: int, **fields) -> None:
        self.send({"t": p.OK, "ch": channel, **fields})

    def finish(self, channel: int) -> None:
        self.channels.pop(channel, None)
        self.send({"t": p.CLOSE, "ch": channel})

    def send_parts(self, parts, size: int) -> bool:
        self.wrote_at = time.monotonic()
        for message in p.FrameDecoder(accept_unchecked=True).feed(b"".join(parts)):
            self.data += message["d"]
        return True

    def has_room(self) -> bool:
        return self.room

    def pause_reading(self, holder) -> None:
        self.paused.add(holder)
        self.pauses += 1

    def resume_reading(self, holder) -> None:
        self.paused.discard(holder)

    def reading_paused(self) -> bool:
        return bool(self.paused)

    def kinds(self) -> list[str]:
        return [m["t"] for m in self.sent]


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def test_copy_to_stops_reading_the_client_while_the_worker_lags(loop, tmp_path, monkeypatch):
    gate = threading.Event()
    write = copyfiles.FileTarget.write

    def slow_write(self, data):
        gate.wait(30)            # a disk that does not keep up
        write(self, data)
    monkeypatch.setattr(copyfiles.FileTarget, "write", slow_write)
    connection = Connection(loop)
    channel = CopyToChannel(connection, 1, str(tmp_path), "/file", mode=0o600, as_tar=False)
    connection.channels[1] = channel
    assert loop.run_until(lambda: connection.kinds() == [p.OK], timeout=10)
    payload = bytes(range(256)) * (4 << 12)    # 1 MiB
    for _ in range(16):
        started = time.monotonic()
        channel.on_data(payload)               # never waits for the worker
        assert time.monotonic() - started < 1
    assert connection.paused == {channel} and connection.pauses == 1
    channel.on_eof()
    gate.set()
    assert loop.run_until(lambda: p.CLOSE in connection.kinds(), timeout=30)
    assert not connection.paused
    reply = connection.sent[-2]
    assert reply["size"] == 16 * len(payload)
    assert reply["sha256"] == hashlib.sha256(payload * 16).hexdigest()
    assert (tmp_path / "file").read_bytes() == payload * 16


def test_copy_from_reads_ahead_only_so_far_and_stops_when_detached(loop, tmp_path):
    (tmp_path / "big").write_bytes(bytes(64 << 20))
    connection = Connection(loop, room=False)   # a client that reads nothing
    channel = CopyFromChannel(connection, 1, str(tmp_path), "/big", as_tar=None)
    connection.channels[1] = channel
    assert loop.run_until(lambda: connection.kinds() == [p.OK], timeout=10)
    worker = channel.worker.thread
    time.sleep(0.5)
    assert worker.is_alive()                    # waiting for room, not reading on
    assert channel.outbox._size <= channels.OUTBOX_LIMIT
    connection.channels.pop(1)
    channel.on_detach()
    worker.join(10)
    assert not worker.is_alive()


def test_copy_from_sends_every_byte_in_order(loop, tmp_path):
    payload = bytes(range(251)) * (1 << 16)
    (tmp_path / "f").write_bytes(payload)
    connection = Connection(loop)
    channel = CopyFromChannel(connection, 1, str(tmp_path), "/f", as_tar=None)
    connection.channels[1] = channel
    assert loop.run_until(lambda: p.CLOSE in connection.kinds(), timeout=30)
    assert connection.kinds() == [p.OK, p.EOF, p.CLOSE]
    assert bytes(connection.data) == payload


def test_too_many_copies_at_once_are_refused(loop, tmp_path, monkeypatch):
    gate = threading.Event()

    def held_up(root):           # a copy stuck in a hung filesystem
        gate.wait(30)
        raise copyfiles.CopyError("released")
    monkeypatch.setattr(copyfiles, "Guard", held_up)
    connection = Connection(loop)
    held = [CopyFromChannel(connection, n, str(tmp_path), "/f", as_tar=None)
            for n in range(channels.MAX_COPIES)]
    with pytest.raises(copyfiles.CopyError, match="copies are already running"):
        CopyFromChannel(connection, 99, str(tmp_path), "/f", as_tar=None)
    gate.set()
    for channel in held:
        channel.worker.thread.join(10)
    CopyFromChannel(connection, 100, str(tmp_path), "/f", as_tar=None).worker.thread.join(10)
