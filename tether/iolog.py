"""The reference's output-log framing (VIC lib/iolog): entries in, entries out.

Each entry is the 16-character base64 form of a 10-byte header, then the payload:
8 bytes little-endian UnixNano (UTC), then a little-endian 16-bit word
`size << 4 | stream << 3 | flags`. Entries are cut at newlines; a line longer than
4095 bytes is split; a trailing partial line waits for its newline or `close`.

Extension (documented in docs/agent.md): the reference logged one session only. We log
every session on the same port. Entries of the primary session are exactly the
reference's; entries of other sessions set flag bit 0 (`TAGGED`, one of the three bits
the reference reserves) and their payload starts with one byte N and the N-byte session
ID. A reference reader shows those bytes as a prefix; the primary's log stays clean.
"""
from __future__ import annotations

import binascii
import itertools
import struct
import time
from _collections import deque   # collections' deque, without importing collections
from _collections_abc import Callable, Iterator   # collections.abc's, already loaded by os

MAX_ENTRY = 4095
ENCODED_HEADER_LEN = 16
STDOUT, STDERR = 0, 1
TAGGED = 0x1
PRIMARY_LABEL = "primary"   # how readers name the untagged entries (the primary session's)

_header = struct.Struct("<qH")


def encode_entry(payload: bytes, stream: int = STDOUT, when_ns: int | None = None,
                 session: str | None = None) -> bytes:
    """One framed entry. `session` set means a tagged (non-primary) entry."""
    flags = 0
    if session is not None:
        ident = session.encode()[:255]
        payload = bytes([len(ident)]) + ident + payload
        flags = TAGGED
    if len(payload) > MAX_ENTRY:
        raise ValueError(f"entry of {len(payload)} bytes exceeds {MAX_ENTRY}")
    when = time.time_ns() if when_ns is None else when_ns
    header = _header.pack(when, len(payload) << 4 | (stream & 1) << 3 | flags)
    return binascii.b2a_base64(header, newline=False) + payload   # base64.b64encode


class Entry:
    __slots__ = ("when_ns", "stream", "session", "data")

    def __init__(self, when_ns: int, stream: int, session: str | None, data: bytes):
        self.when_ns, self.stream, self.session, self.data = when_ns, stream, session, data

    def __repr__(self) -> str:
        return f"Entry({self.when_ns}, {self.stream}, {self.session!r}, {self.data!r})"


class FramingError(ValueError):
    pass


class EntryReader:
    """Entries from a byte stream as it arrives (sans-IO): an entry may be cut anywhere
    between two reads. `feed` raises FramingError at a header that does not decode."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.offset = 0          # stream offset of the first byte not yet consumed

    @property
    def pending(self) -> int:
        """Bytes of an entry not complete yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[Entry]:
        self._buffer += data
        buffer = self._buffer
        while len(buffer) >= ENCODED_HEADER_LEN:
            try:
                when, word = _header.unpack(
                    binascii.a2b_base64(bytes(buffer[:ENCODED_HEADER_LEN]), strict_mode=True))
            except (ValueError, struct.error) as err:
                raise FramingError(f"bad header at offset {self.offset}: {err}") from None
            size = word >> 4
            end = ENCODED_HEADER_LEN + size
            if len(buffer) < end:
                return
            payload = bytes(buffer[ENCODED_HEADER_LEN:end])
            del buffer[:end]
            self.offset += end
            session = None
            if word & TAGGED:
                n = payload[0] if payload else 0
                session = payload[1:1 + n].decode(errors="replace")
                payload = payload[1 + n:]
            yield Entry(when, (word >> 3) & 1, session, payload)

    def skip(self) -> None:
        """Drop what is buffered (after a FramingError, to read on from new data)."""
        self.offset += len(self._buffer)
        self._buffer.clear()

    def end(self) -> None:
        """The stream is over: raise FramingError if it stopped inside an entry."""
        if not self._buffer:
            return
        if len(self._buffer) < ENCODED_HEADER_LEN:
            raise FramingError(f"truncated header at offset {self.offset}")
        header = binascii.a2b_base64(bytes(self._buffer[:ENCODED_HEADER_LEN]))
        size = _header.unpack(header)[1] >> 4
        raise FramingError(f"truncated entry at offset {self.offset}: "
                           f"{len(self._buffer) - ENCODED_HEADER_LEN} of {size} bytes")


def parse(blob: bytes) -> Iterator[Entry]:
    """Entries of a complete log. A truncated final entry raises FramingError."""
    reader = EntryReader()
    yield from reader.feed(blob)
    reader.end()


class LineFramer:
    """Cuts one stream of one session into entries (sans-IO: bytes in, framed bytes out)."""

    def __init__(self, stream: int, session: str | None,
                 clock: Callable[[], int] = time.time_ns):
        self.stream = stream
        self.session = session
        self.clock = clock
        self._partial = bytearray()
        room = MAX_ENTRY - (0 if session is None else 1 + len(session.encode()[:255]))
        self._room = max(1, room)

    def feed(self, data: bytes) -> bytes:
        self._partial += data
        out = []
        while True:
            nl = self._partial.find(b"\n", 0, self._room)
            if nl >= 0:
                cut = nl + 1
            elif len(self._partial) >= self._room:
                cut = self._room
            else:
                break
            out.append(self._entry(bytes(self._partial[:cut])))
            del self._partial[:cut]
        return b"".join(out)

    def close(self) -> bytes:
        if not self._partial:
            return b""
        entry = self._entry(bytes(self._partial))
        self._partial.clear()
        return entry

    def _entry(self, payload: bytes) -> bytes:
        return encode_entry(payload, self.stream, self.clock(), self.session)


def format_time(when_ns: int) -> str:
    """Go's 2006-01-02T15:04:05.000000000Z07:00, in UTC."""
    secs, nanos = divmod(when_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{nanos:09d}Z"


OUTPUT_LOG_MAX = 64 << 20      # a regular-file output log is rotated past this size


class LogPort:
    """Bytes to the output-log port without blocking the loop when the port is slow.

    A regular file is written directly. A device (serial, virtio-serial) or a pipe is
    made non-blocking and fed from a bounded buffer on the loop; past `limit` bytes the
    oldest pending output is dropped and counted, rather than stalling every session.
    Each `write` is whole entries, and what is dropped is whole writes, never the rest of
    one the port has begun: a cut entry would end the reader's framing there, and from
    then on a session's output would be read as headers (forged entries).

    A regular file given with its `path` is capped: once a write would take it past
    `max_bytes`, it is renamed to PATH.1 (replacing the previous one) and a new PATH is
    started, so the log holds at most about twice `max_bytes`. Writes are whole entries,
    so each file reads on its own (`tether logs`).

    A write error (the host closed the port, a full disk) closes the port for good: the
    fd is taken off the loop and closed, and later output is dropped and counted. The
    error is logged once.
    """

    def __init__(self, fd: int, loop=None, limit: int = 8 << 20, *, path: str | None = None,
                 max_bytes: int = OUTPUT_LOG_MAX):
        import os
        import stat
        self.fd = fd
        self.loop = loop
        self.limit = limit
        self.dropped = 0
        self.closed = False
        self.rotations = 0
        self._pending: deque[bytes] = deque()   # whole writes; the first maybe begun
        self._pending_size = 0
        self._begun = 0              # bytes of the first pending write already written
        self._waiting = False        # a writer callback is registered on the loop
        st = os.fstat(fd)
        self._direct = loop is None or stat.S_ISREG(st.st_mode)
        self._path = path if stat.S_ISREG(st.st_mode) and max_bytes > 0 else None
        self._max = max_bytes
        self._size = st.st_size
        if not self._direct:
            os.set_blocking(fd, False)

    @property
    def pending(self) -> int:
        return self._pending_size - self._begun

    def write(self, data: bytes) -> None:
        import os
        if not data or self.closed:
            if data:
                self.dropped += len(data)
            return
        if self._direct:
            if self._path is not None and self._size and self._size + len(data) > self._max:
                self._rotate()
                if self.closed:
                    self.dropped += len(data)
                    return
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self.fd, view)
                    self._size += n
                    view = view[n:]
            except OSError as err:
                self.dropped += len(view)
                self.close(err)
            return
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size > self.limit:
            self._drop_oldest()
        if not self._waiting:
            self._flush()

    def _drop_oldest(self) -> None:
        """Whole writes, oldest first, down to `limit`; a begun one is finished first."""
        head = self._pending.popleft() if self._begun else None
        while self._pending_size > self.limit and self._pending:
            chunk = self._pending.popleft()
            self._pending_size -= len(chunk)
            self.dropped += len(chunk)
        if head is not None:
            self._pending.appendleft(head)

    def _rotate(self) -> None:
        """PATH -> PATH.1, and a fresh PATH (see the class)."""
        import os
        try:
            os.replace(self._path, self._path + ".1")
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                         | os.O_NOCTTY, 0o644)
        except OSError as err:
            self.close(err)
            return
        os.close(self.fd)
        self.fd = fd
        self._size = 0
        self.rotations += 1

    def _flush(self) -> None:
        import os
        pending = self._pending
        try:
            while pending:
                chunks = [memoryview(pending[0])[self._begun:]]
                chunks += itertools.islice(pending, 1, 64)
                written = os.writev(self.fd, chunks)
                if not written:
                    break
                n = self._begun + written
                while pending and n >= len(pending[0]):
                    n -= len(pending[0])
                    self._pending_size -= len(pending.popleft())
                self._begun = n
        except BlockingIOError:
            pass
        except OSError as err:
            self.close(err)
            return
        if self.loop is None:
            return
        if self._pending and not self._waiting:
            self.loop.add_writer(self.fd, self._flush)
            self._waiting = True
        elif not self._pending and self._waiting:
            self.loop.remove_writer(self.fd)
            self._waiting = False

    def close(self, error: OSError | None = None) -> None:
        """Stop for good: off the loop, fd closed, pending output dropped."""
        import os
        if self.closed:
            return
        self.closed = True
        if self._waiting:
            self.loop.remove_writer(self.fd)
            self._waiting = False
        self.dropped += self.pending
        self._pending.clear()
        self._pending_size = self._begun = 0
        try:
            os.close(self.fd)
        except OSError:
            pass
        if error is not None:
            from tether.log import get_logger
            get_logger("tether.iolog").warning(
                "session output log stopped: %s; its output is dropped from now on",
                error.strerror or error)

    def drain(self, timeout: float = 5.0) -> None:
        """Push out what is pending, blocking up to `timeout` (used at shutdown)."""
        import select
        deadline = time.monotonic() + timeout
        while self._pending and not self.closed and time.monotonic() < deadline:
            select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
            self._flush()
