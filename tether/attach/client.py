"""The attach client library: a blocking, single-threaded client for the attach protocol.

    with Client.connect("unix:/run/tether.sock", key) as client:
        print(client.list())
        stream = client.attach("abc", replay=True)
        stream.write(b"hello\n")
        for kind, value in stream.events(timeout=5): ...

Frames from the agent are sorted by channel into per-channel queues; any call that waits
pumps the connection, so several channels can be open at once. Writes never block
without also reading, so a chatty agent cannot deadlock a client that is sending.

Output arrives without being copied: on a socket, a data event's bytes are a memoryview
slice of what was read (`bytes(value)` makes a copy of one's own), and a big data
frame may come as several events.
"""
from __future__ import annotations

import hashlib
import math
import os
import select
import time
from collections import deque
from collections.abc import Iterator
from typing import BinaryIO

from tether.attach import protocol as p
from tether.attach import transports
from tether.console import escape_unprintable

DEFAULT_TIMEOUT = 30.0
READ_SIZE = 1 << 20
PEER_TEXT_LIMIT = 1000      # characters of the agent's text quoted in an error
REPLIES_KEPT = 8            # messages kept for a channel that carries no data to us
MAX_PAGES = 64              # of a list or stats: ~190,000 sessions at the agent's page size


def peer_text(value, limit: int = PEER_TEXT_LIMIT) -> str:
    """What the agent sent (an error's `msg`, a reply's type, a field of a table) as a
    line of ours may show it: at most `limit` characters, control characters escaped, so
    an agent can neither drive the user's terminal nor forge lines where it is shown."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    elif value is not None and not isinstance(value, (str, int, float)):
        return f"(a {type(value).__name__})"
    text = str(value)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text)} characters in all)"
    return escape_unprintable(text)


class ClientError(Exception):
    """The agent refused a request or the connection failed; the text says why."""


def field(reply: dict, name: str, kinds: type | tuple[type, ...], what: str):
    """`reply[name]` when it is one of `kinds`; a ClientError otherwise: a reply is the
    agent's to shape, and a wrong one must end in a clear error, not a traceback."""
    value = reply.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,)):
        shape = "no" if value is None else f"a {type(value).__name__} as"
        raise ClientError(f"{what}: the agent's reply has {shape} {name!r}, which the "
                          "protocol does not allow (docs/attach-protocol.md)")
    return value


BYTES_LIKE = (bytes, bytearray, memoryview)


def wait_fd(fd: int, timeout: float | None, *, write: bool = False) -> tuple[bool, bool]:
    """(readable, writable) of `fd` within `timeout` seconds (None: no limit), by poll(2):
    select(2) cannot take an fd above 1023, which a program with many files open has.
    A hang-up or an error counts as readable (the read then says what happened)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | (select.POLLOUT if write else 0))
    events = poller.poll(None if timeout is None else math.ceil(max(0.0, timeout) * 1000))
    mask = 0
    for _, event in events:
        mask |= event
    readable = bool(mask & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL))
    return readable, bool(mask & select.POLLOUT)


class Client:
    def __init__(self, conn: transports.Conn, key: bytes | None = b"",
                 timeout: float = DEFAULT_TIMEOUT):
        self.conn = conn
        self.key = key or b""
        self.timeout = timeout
        # Data frames skip the CRC only when both ends are sockets: the server says so in
        # its hello (a tcp endpoint may be a QEMU chardev leading to a guest's line).
        self.checked = True
        self.decoder = p.FrameDecoder(accept_unchecked=not conn.persistent, stream_data=True)
        self._queues: dict[int, deque] = {}
        self._reply_only: set[int] = set()   # channels with no data for us (copy-to)
        self.held: set[int] = set()   # channels whose stdin the agent asked us to hold
        self._next_channel = 1
        self._closed_error: str | None = None
        self.server_version: int | None = None

    @classmethod
    def connect(cls, endpoint: str, key: bytes | None = b"",
                timeout: float = DEFAULT_TIMEOUT) -> "Client":
        conn = transports.connect(endpoint, timeout=timeout)
        client = cls(conn, key, timeout)
        try:
            client.handshake()
        except BaseException:
            conn.close()
            raise
        return client

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        self.conn.close()

    # -- handshake ---------------------------------------------------------------------------
    def handshake(self) -> None:
        shake = p.ClientHandshake(self.key)
        self._send(p.encode(shake.start()))
        deadline = time.monotonic() + self.timeout
        while not shake.done:
            messages = self._read(deadline, "the hello")
            for i, message in enumerate(messages):
                if shake.done:   # what follows the welcome belongs to channels
                    self._dispatch(messages[i:])
                    break
                try:
                    replies = shake.receive(message)
                except p.ProtocolError as err:
                    raise ClientError(str(err)) from None
                for reply in replies:
                    self._send(p.encode(reply))
        self.server_version = shake.server_version
        self.checked = self.conn.persistent or not shake.unchecked_ok

    # -- wire ------------------------------------------------------------------------------
    def _read(self, deadline: float | None, waiting_for: str) -> list[dict]:
        if self._closed_error:
            raise ClientError(self._closed_error)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = wait_fd(self.conn.fd, left)
            if not ready:
                if left is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no answer from the agent for {waiting_for} "
                                       f"in {self.timeout:.0f}s")
                continue
            data = self.conn.read(READ_SIZE)
            if data is None:
                continue
            if not data:
                self._closed_error = "the agent closed the connection"
                raise ClientError(self._closed_error)
            return self.decoder.feed(data)

    def _dispatch(self, messages: list[dict]) -> None:
        for message in messages:
            channel = message.get("ch")
            if type(channel) is not int:   # None: the connection's; other types: nobody's
                if channel is None and message.get("t") == p.ERROR:
                    self._closed_error = f"the agent refused: {peer_text(message.get('msg'))}"
                    raise ClientError(self._closed_error)
                continue
            queue = self._queues.get(channel)
            if queue is None:
                continue
            if message.get("t") == p.HOLD:    # flow control, not for the channel's reader
                self.held.add(channel)
                continue
            if message.get("t") == p.GO:
                self.held.discard(channel)
                continue
            if channel in self._reply_only and (message["t"] == p.DATA
                                                 or len(queue) >= REPLIES_KEPT):
                continue   # nobody reads it while we send: holding it has no bound
            queue.append(message)

    def pump(self, timeout: float | None = 0.0) -> None:
        """Read what is there (waiting up to `timeout`) and sort it into channels."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._dispatch(self._read(deadline, "data"))
        except TimeoutError:
            pass

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        fd = self.conn.fd
        deadline = time.monotonic() + self.timeout
        while view:
            n = self.conn.write(view)
            if n:
                view = view[n:]
                deadline = time.monotonic() + self.timeout
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the agent has not read what we sent for "
                                   f"{self.timeout:.0f}s")
            readable, _ = wait_fd(fd, left, write=True)
            if readable:   # keep reading while we wait, so neither side can deadlock
                data_in = self.conn.read(256 << 10)
                if data_in == b"":
                    raise ClientError("the agent closed the connection")
                if data_in:
                    self._dispatch(self.decoder.feed(data_in))

    def send(self, message: dict) -> None:
        try:
            self._send(p.encode(message))
        except (BrokenPipeError, ConnectionResetError):
            raise ClientError("the agent closed the connection") from None

    # -- channels ---------------------------------------------------------------------------
    def open_channel(self, *, data: bool = True) -> int:
        """A fresh channel; without `data`, one the agent sends only replies on: its data
        is dropped and at most REPLIES_KEPT messages are kept."""
        channel = self._next_channel
        self._next_channel += 1
        self._queues[channel] = deque()
        if not data:
            self._reply_only.add(channel)
        return channel

    def release_channel(self, channel: int) -> None:
        self._queues.pop(channel, None)
        self._reply_only.discard(channel)
        self.held.discard(channel)

    def next_message(self, channel: int, timeout: float | None = None) -> dict | None:
        """The next message on `channel`; None if none came within `timeout`."""
        queue = self._queues[channel]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not queue:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self.pump(left)
        return queue.popleft()

    def request(self, kind: str, **fields) -> dict:
        """Send a one-shot request and return its `ok` reply (raises ClientError)."""
        channel = self.open_channel()
        try:
            self.send({"t": kind, "ch": channel, **fields})
            reply = self._expect_ok(channel, kind)
        finally:
            self.release_channel(channel)
        return reply

    def _expect_ok(self, channel: int, kind: str) -> dict:
        reply = self.next_message(channel, self.timeout)
        if reply is None:
            raise TimeoutError(f"no answer to {kind} in {self.timeout:.0f}s")
        if reply["t"] == p.ERROR:
            raise ClientError(f"{kind}: {peer_text(reply.get('msg'))}")
        if reply["t"] != p.OK:
            raise ClientError(f"{kind}: unexpected {peer_text(reply['t'])!r} reply")
        return reply

    # -- requests ---------------------------------------------------------------------------
    def ping(self, data=None) -> dict:
        return self.request(p.PING, data=data)

    def list(self) -> list[dict]:
        """Every session's state, in ID order, asked for in pages (any number of them)."""
        states = []
        for page in self._pages(p.LIST):
            for state in field(page, "sessions", list, p.LIST):
                if not isinstance(state, dict):
                    raise ClientError(f"list: a session's state is a {type(state).__name__}"
                                      ", not a map")
                states.append(state)
        return states

    def stats(self) -> dict:
        """The agent's figures and every session's, asked for in pages: the machine's
        figures are the first page's."""
        figures: dict | None = None
        for page in self._pages(p.STATS):
            sessions = field(page, "sessions", dict, p.STATS)
            if figures is None:
                figures = {k: v for k, v in page.items() if k not in ("t", "ch", "next")}
            else:
                figures["sessions"].update(sessions)
        return figures

    def _pages(self, kind: str) -> Iterator[dict]:
        """The replies to `kind` asked for page by page: each asks for the sessions after
        the last one of the page before. An agent that does not page (before pages were
        added) answers everything at once, without `next`. At most MAX_PAGES pages: an
        agent can always name a next page, and a client that followed would never end."""
        after = ""
        for _ in range(MAX_PAGES):
            reply = self.request(kind, after=after)
            yield reply
            following = reply.get("next")
            if following is None:
                return
            if not isinstance(following, str) or following <= after:
                raise ClientError(f"{kind}: the agent's next page starts at "
                                  f"{peer_text(following)!r}, not after "
                                  f"{peer_text(after)!r}")
            after = following
        raise ClientError(f"{kind}: the agent's reply goes on past {MAX_PAGES} pages; "
                          "stopped there")

    def resize(self, session: str, rows: int, cols: int) -> None:
        self.request(p.RESIZE, session=session, rows=rows, cols=cols)

    def signal(self, session: str, signal: int | str) -> int:
        return field(self.request(p.SIGNAL, session=session, signal=signal), "signal",
                     int, p.SIGNAL)

    def close_stdin(self, session: str) -> None:
        self.request(p.CLOSE_STDIN, session=session)

    def unblock(self, session: str) -> None:
        self.request(p.UNBLOCK, session=session)

    def attach(self, session: str, *, replay: bool = False, stdin: bool = True,
               unblock: bool = False) -> "Stream":
        """Attach to a session's output (and input). With `unblock`, then release its
        RunBlock, as `docker start -a` does: attached first, so no output is missed
        (a session that is not blocked is left as it is)."""
        channel = self.open_channel()
        self.send({"t": p.ATTACH, "ch": channel, "session": session, "replay": replay,
                   "stdin": stdin})
        try:
            reply = self._expect_ok(channel, "attach")
        except BaseException:
            self.release_channel(channel)
            raise
        stream = Stream(self, channel, session, reply)
        if unblock:
            try:
                self.unblock(session)
            except BaseException:
                stream.detach()
                raise
        return stream

    def exec(self, args: list[str], *, tty: bool = False, env: list[str] | None = None,
             dir: str = "", user: str = "", id: str | None = None,
             attach: bool = True) -> "Stream | dict":
        """Start a process; attached (a Stream) unless attach=False (the ok reply)."""
        channel = self.open_channel()
        message = {"t": p.EXEC, "ch": channel, "args": list(args), "tty": tty,
                   "dir": dir, "user": user, "attach": attach}
        if env is not None:
            message["env"] = env
        if id:
            message["id"] = id
        self.send(message)
        try:
            reply = self._expect_ok(channel, "exec")
        except BaseException:
            self.release_channel(channel)
            raise
        try:
            ident = field(reply, "id", str, p.EXEC)
        except ClientError:
            if attach:
                self.send({"t": p.CLOSE, "ch": channel})
            self.release_channel(channel)
            raise
        if not attach:
            self.release_channel(channel)
            return reply
        return Stream(self, channel, ident, reply)

    def copy_to(self, path: str, source: bytes | BinaryIO, *, mode: int = 0o644,
                tar: bool = False) -> dict:
        """Write `source` to `path` in the container root (tar: extract under `path`).
        Returns the agent's ok: size and sha256 of what it received."""
        channel = self.open_channel(data=False)
        try:
            self.send({"t": p.COPY_TO, "ch": channel, "path": path, "mode": mode, "tar": tar})
            self._expect_ok(channel, "copy-to")
            if isinstance(source, (bytes, bytearray, memoryview)):
                for frame in p.encode_data(channel, bytes(source), "stdin", self.checked):
                    self._send(frame)
                    self._raise_if_refused(channel, "copy-to")
            else:
                size = p.DATA_CHUNK if self.checked else p.UNCHECKED_DATA_CHUNK
                while True:
                    chunk = source.read(size)
                    if not chunk:
                        break
                    self._send(p.encode_data(channel, chunk, "stdin", self.checked)[0])
                    self._raise_if_refused(channel, "copy-to")
            self.send({"t": p.EOF, "ch": channel})
            return self._expect_ok(channel, "copy-to")
        finally:
            self.release_channel(channel)

    def _raise_if_refused(self, channel: int, kind: str) -> None:
        queue = self._queues[channel]
        if queue and queue[0]["t"] == p.ERROR:
            raise ClientError(f"{kind}: {peer_text(queue[0].get('msg'))}")

    def copy_from(self, path: str, sink: BinaryIO, *, tar: bool | None = None) -> dict:
        """Write the file (or a tar of the directory) at `path` to `sink`. Returns the
        agent's description (kind "file" or "tar", size, mode) plus our sha256."""
        channel = self.open_channel()
        try:
            self.send({"t": p.COPY_FROM, "ch": channel, "path": path, "tar": tar})
            info = self._expect_ok(channel, "copy-from")
            if info.get("kind") not in ("file", "tar"):
                raise ClientError(f"copy-from {path}: the agent's kind "
                                  f"{peer_text(info.get('kind'))!r} is neither file nor tar")
            declared = field(info, "size", (int, type(None)), "copy-from")
            mode = field(info, "mode", (int, type(None)), "copy-from")
            digest = hashlib.sha256()
            received = 0
            while True:
                message = self.next_message(channel, self.timeout)
                if message is None:
                    raise TimeoutError(f"copy-from {path}: the agent stopped sending")
                kind = message["t"]
                if kind == p.DATA:
                    field(message, "d", BYTES_LIKE, "copy-from")
                    if declared is not None and received + len(message["d"]) > declared:
                        # an agent that sends on would fill the sink (the user's disk)
                        raise ClientError(f"copy-from {path}: the agent sent more than "
                                          f"the {declared} bytes it announced")
                    sink.write(message["d"])
                    digest.update(message["d"])
                    received += len(message["d"])
                elif kind == p.ERROR:
                    raise ClientError(f"copy-from {path}: {peer_text(message.get('msg'))}")
                elif kind in (p.EOF, p.CLOSE):
                    break
            # A tar stream is made as it is sent: its size is not known up front (nil).
            if declared is not None and received != declared:
                raise ClientError(f"copy-from {path}: got {received} of {declared} bytes")
            return {"kind": info["kind"], "size": received, "mode": mode,
                    "sha256": digest.hexdigest()}
        finally:
            self.release_channel(channel)


class Stream:
    """An attached session (or exec): output events in, stdin out."""

    def __init__(self, client: Client, channel: int, session: str, reply: dict):
        self.client = client
        self.channel = channel
        self.session = session
        self.tty = bool(reply.get("tty"))
        self.pid = reply.get("pid")
        self.running = bool(reply.get("running"))   # when the attach was answered
        self.exit: dict | None = None       # the exit message, once it came
        self.closed = False

    @property
    def held(self) -> bool:
        """The agent asked us to hold stdin: the process is behind reading it. Send
        nothing until it says go (`write` waits; an interactive loop stops reading its
        own input meanwhile, so the input waits where it came from)."""
        return self.channel in self.client.held

    def write(self, data: bytes) -> None:
        """Send stdin; while the agent holds it, wait for its go, reading (and keeping)
        what else comes, as long as it takes: the process reads when it reads."""
        while self.held and not self.closed:
            self.client.pump(None)
        for frame in p.encode_data(self.channel, data, "stdin", self.client.checked):
            self.client._send(frame)

    def close_stdin(self) -> None:
        self.client.close_stdin(self.session)

    def resize(self, rows: int, cols: int) -> None:
        self.client.resize(self.session, rows, cols)

    def signal(self, sig: int | str) -> int:
        return self.client.signal(self.session, sig)

    def detach(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.client.send({"t": p.CLOSE, "ch": self.channel})
            finally:
                self.client.release_channel(self.channel)

    def events(self, timeout: float | None = None) -> Iterator[tuple[str, object]]:
        """("stdout"|"stderr", data) and finally ("exit", code); stops after `timeout`
        seconds without a message, or at the end of the channel. `data` is bytes-like
        (a memoryview of what was read, on a socket)."""
        while not self.closed:
            message = self.client.next_message(self.channel, timeout)
            if message is None:
                return
            event = self._event(message)
            if event is not None:
                yield event

    def pending(self) -> list[tuple[str, object]]:
        """Events already received, without waiting."""
        out = []
        queue = self.client._queues.get(self.channel)
        while queue:
            event = self._event(queue.popleft())
            if event is not None:
                out.append(event)
        return out

    def _event(self, message: dict):
        kind = message["t"]
        if kind == p.DATA:
            stream = message.get("s", "stdout")
            data = field(message, "d", BYTES_LIKE, f"session {peer_text(self.session)}")
            return (stream, data) if stream in ("stdout", "stderr") else None
        if kind == p.EXIT:
            field(message, "code", (int, type(None)), f"session {peer_text(self.session)}")
            self.exit = message
            return "exit", message.get("code")
        if kind == p.CLOSE:
            self.closed = True
            self.client.release_channel(self.channel)
            return None
        if kind == p.ERROR:
            self.closed = True
            self.client.release_channel(self.channel)
            raise ClientError(f"session {peer_text(self.session)}: "
                              f"{peer_text(message.get('msg'))}")
        return None

    def read_until(self, needle: bytes, timeout: float = DEFAULT_TIMEOUT,
                   stream: str | None = None) -> bytes:
        """Collect output until `needle` shows up (TimeoutError otherwise)."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        while needle not in got:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise TimeoutError(f"{needle!r} not seen; got {bytes(got[-400:])!r}")
            for kind, value in self.events(timeout=min(left, 1.0)):
                if kind in ("stdout", "stderr") and (stream is None or kind == stream):
                    got += value
                if needle in got or kind == "exit":
                    break
        return bytes(got)

    def collect(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, bytes]:
        """Everything until the exit: {"stdout", "stderr"} and self.exit set."""
        out = {"stdout": bytearray(), "stderr": bytearray()}
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"session {self.session} did not end in {timeout}s")
            for kind, value in self.events(timeout=left):
                if kind in out:
                    out[kind] += value
        return {k: bytes(v) for k, v in out.items()}


def read_key(key_file: str | None = None, environ=os.environ) -> bytes:
    """The HMAC key: --key-file, else $TETHER_KEY_FILE, else $TETHER_KEY (its UTF-8
    bytes), else empty."""
    path = key_file or environ.get("TETHER_KEY_FILE")
    if path:
        with open(path, "rb") as f:
            return f.read()
    return environ.get("TETHER_KEY", "").encode()
