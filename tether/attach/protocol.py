"""The attach protocol, sans-IO: frames, the hello/HMAC handshake and messages.

Nothing here touches a socket. `FrameDecoder.feed(bytes)` yields messages (dicts);
`encode(message)` gives the bytes to send. `ServerHandshake` and `ClientHandshake` are the
two sides' state machines for the hello. `docs/attach-protocol.md` is the specification.

Frame: MAGIC (4) | length u32 BE | ~length u32 BE | crc32(payload) u32 BE | payload.
The payload is one msgpack map. The magic, the length's complement and the CRC let a
reader on a noisy serial line skip garbage and find the next real frame (resync).
On a reliable stream (a socket) a sender may use the UNCHECKED magic and skip the CRC
(it costs more than the rest of the path together); lines always use checked frames.

Data frames are the bulk of the traffic, so they have paths of their own: `data_parts`
writes them as pieces for a gathering write (the data is never copied), `data_header`
is everything before the data (the agent splices the data itself from a session's
pipe), and a decoder made with `stream_data` hands out an unchecked data frame's bytes
as memoryview slices of what was read, piece by piece as they arrive, never copied.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import zlib
from collections.abc import Iterator

import msgpack

from tether.console import clip

VERSION = 1
MAGIC = b"\xd7TtR"                 # checked: the CRC field is the payload's CRC32
MAGIC_UNCHECKED = b"\xd7TtU"       # the CRC field is 0 and not checked (sockets only)
_MAGIC_PREFIX = MAGIC[:3]
HEADER = struct.Struct(">4sIII")
HEADER_SIZE = HEADER.size          # 16
MAX_PAYLOAD = 1 << 20              # a frame body above this is garbage
PREAUTH_MAX_PAYLOAD = 1 << 10      # ... and above this before the peer authenticated
DATA_CHUNK = 64 << 10              # checked data frames (lines) carry at most this much
UNCHECKED_DATA_CHUNK = MAX_PAYLOAD - (1 << 10)   # unchecked ones (sockets): fewer frames
CHALLENGE_SIZE = 32
HMAC_CONTEXT = b"tether-attach-v1\0"

# Message types (the "t" field).
CONNECT = "connect"      # client -> server: start (or restart) a conversation
HELLO = "hello"          # server -> client: version and challenge
AUTH = "auth"            # client -> server: the HMAC answer
WELCOME = "welcome"      # server -> client: authenticated
# requests, client -> server, each on a fresh channel
LIST, ATTACH, RESIZE, SIGNAL, CLOSE_STDIN, UNBLOCK = (
    "list", "attach", "resize", "signal", "close-stdin", "unblock")
EXEC, COPY_TO, COPY_FROM, STATS, PING = "exec", "copy-to", "copy-from", "stats", "ping"
REQUESTS = frozenset({LIST, ATTACH, RESIZE, SIGNAL, CLOSE_STDIN, UNBLOCK, EXEC, COPY_TO,
                      COPY_FROM, STATS, PING})
# on an open channel, either way
DATA = "data"            # {"ch", "d": bytes, "s": "stdin"|"stdout"|"stderr"}
EOF = "eof"              # the sender's data on this channel is complete
CLOSE = "close"          # the channel is finished (client: detach)
# replies, server -> client
OK = "ok"
ERROR = "error"          # {"ch", "msg"}; ch absent/None: a connection-level error
EXIT = "exit"            # {"ch", "status", "code", "signal"}: the attached process ended
HOLD = "hold"            # {"ch"}: the session holds a backlog of stdin: send no more on it
GO = "go"                # {"ch"}: ... until this (the backlog is down again)


class ProtocolError(Exception):
    """A peer broke the protocol; the message says how."""


def encode(message: dict, checked: bool = True) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"message of {len(payload)} bytes is over the {MAX_PAYLOAD} limit")
    if checked:
        return HEADER.pack(MAGIC, len(payload), len(payload) ^ 0xFFFFFFFF,
                           zlib.crc32(payload)) + payload
    return HEADER.pack(MAGIC_UNCHECKED, len(payload), len(payload) ^ 0xFFFFFFFF, 0) + payload


_pack = msgpack.Packer(use_bin_type=True).pack


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


@functools.lru_cache(maxsize=256)
def _data_fields(channel: int, stream: str) -> bytes:
    """The msgpack of a data message up to the data's bin header."""
    return (b"\x84" + _pack("t") + _pack(DATA) + _pack("ch") + _pack(channel)
            + _pack("s") + _pack(stream) + _pack("d"))


def data_header(channel: int, size: int, stream: str = "stdout") -> bytes:
    """The bytes of an unchecked data frame of `size` data bytes up to the data itself:
    sent first, then the data (spliced from a pipe by the agent)."""
    head = _data_fields(channel, stream) + _bin_header(size)
    length = len(head) + size
    return HEADER.pack(MAGIC_UNCHECKED, length, length ^ 0xFFFFFFFF, 0) + head


def data_parts(channel: int, data: bytes, stream: str = "stdout",
               checked: bool = True) -> tuple[list, int]:
    """Data frames for `data` (split into DATA_CHUNK pieces when checked, else into
    UNCHECKED_DATA_CHUNK ones) as a flat list of byte pieces for a gathering write, and
    their total size. The bytes are exactly encode({"t": "data", "ch", "s", "d"}) per
    chunk; the data itself is not copied."""
    view = memoryview(data)
    fields = _data_fields(channel, stream)
    parts: list = []
    total = 0
    step = DATA_CHUNK if checked else UNCHECKED_DATA_CHUNK
    for i in range(0, len(data), step):
        chunk = view[i:i + step]
        head = fields + _bin_header(len(chunk))
        length = len(head) + len(chunk)
        if checked:
            header = HEADER.pack(MAGIC, length, length ^ 0xFFFFFFFF,
                                 zlib.crc32(chunk, zlib.crc32(head)))
        else:
            header = HEADER.pack(MAGIC_UNCHECKED, length, length ^ 0xFFFFFFFF, 0)
        parts += (header, head, chunk)
        total += HEADER_SIZE + length
    return parts, total


def encode_data(channel: int, data: bytes, stream: str = "stdout",
                checked: bool = True) -> list[bytes]:
    """Data frames for `data`, one bytes object per frame."""
    parts, _ = data_parts(channel, data, stream, checked)
    return [b"".join(parts[i:i + 3]) for i in range(0, len(parts), 3)]


_DATA_KEYS = b"\x84\xa1t\xa4data\xa2ch"     # the msgpack of a data message, as we write it,
_INCOMPLETE = object()                     # ... up to the channel number


def _data_prefix(buf, at: int, end: int):
    """(channel, stream, offset of the data, its size) of the data message whose payload
    starts at `at`, written as `data_parts` writes it ({t, ch, s, d}, d last); None when it
    is not one (the payload is then decoded whole); _INCOMPLETE when `buf` ends (at `end`)
    before that can be told."""
    keys = len(_DATA_KEYS)
    if end - at < keys + 1:
        return _INCOMPLETE if bytes(buf[at:end]) == _DATA_KEYS[:end - at] else None
    if bytes(buf[at:at + keys]) != _DATA_KEYS:
        return None
    pos = at + keys
    tag = buf[pos]
    if tag < 0x80:
        channel, pos = tag, pos + 1
    elif 0xCC <= tag <= 0xCF:                      # uint 8/16/32/64
        width = 1 << (tag - 0xCC)
        if end < pos + 1 + width:
            return _INCOMPLETE
        channel, pos = int.from_bytes(buf[pos + 1:pos + 1 + width], "big"), pos + 1 + width
    else:
        return None
    if end < pos + 3:
        return _INCOMPLETE
    if buf[pos] != 0xA1 or buf[pos + 1] != 0x73 or not 0xA0 <= buf[pos + 2] <= 0xBF:   # "s"
        return None
    size = buf[pos + 2] - 0xA0
    if end < pos + 3 + size + 3:
        return _INCOMPLETE
    try:
        stream = bytes(buf[pos + 3:pos + 3 + size]).decode()
    except UnicodeDecodeError:
        return None
    pos += 3 + size
    if buf[pos] != 0xA1 or buf[pos + 1] != 0x64 or not 0xC4 <= buf[pos + 2] <= 0xC6:  # "d"
        return None
    width = 1 << (buf[pos + 2] - 0xC4)
    pos += 3
    if end < pos + width:
        return _INCOMPLETE
    return channel, stream, pos + width, int.from_bytes(buf[pos:pos + width], "big")


class FrameDecoder:
    """Bytes in, messages out. Garbage between frames is skipped and counted.

    `max_payload` may change between messages (a server lowers it until its peer has
    authenticated): a candidate header claiming more is dropped at once, before its body
    is waited for or checked, so what a peer can make the decoder hold or checksum is
    bounded by it.

    With `stream_data` (a client reading a socket), an unchecked data frame comes out as
    it arrives, as one or more data messages whose `d` is a memoryview slice of the bytes
    fed (never copied; feed it `bytes`, which cannot change under the views): the frame's
    header and the message's fields are checked first, and the rest of the frame is its
    data, so nothing is delivered that a whole-frame decode would have refused."""

    def __init__(self, max_payload: int = MAX_PAYLOAD, accept_unchecked: bool = False,
                 stream_data: bool = False):
        self._buf = bytearray()
        self.max_payload = max_payload
        self._accept_unchecked = accept_unchecked
        self._stream_data = stream_data and accept_unchecked
        self._body: tuple | None = None   # streaming: (channel, stream, bytes still due)
        self.garbage_bytes = 0
        self.bad_frames = 0
        self._generation = 0          # bumped by reset: a parse in progress keeps nothing

    def feed(self, data: bytes) -> list[dict]:
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[dict]:
        """Like `feed`, lazily: each message is parsed only when asked for, so a change
        of `max_payload` made while handling one applies to the next."""
        if self._stream_data:
            if not isinstance(data, bytes):
                data = bytes(data)    # the views must not see it change
            if self._buf:             # a frame's start was cut: join it on
                self._buf += data
                if self._frame_incomplete():
                    return iter(())   # only appended: joined once, when it is all here
                data = bytes(self._buf)
                self._buf = bytearray()
            return self._frames(data)
        if self._buf:
            self._buf += data
            return self._frames(self._buf)
        # Nothing pending: parse `data` where it is and keep only its unparsed tail.
        return self._frames(data)

    def _frame_incomplete(self) -> bool:
        """(streaming) The bytes kept are the start of one frame, not all here, that is
        not a data frame (those stream as they come). Parsing them anew on every read
        joined the whole start each time: a peer trickling a 1 MiB frame a few bytes a
        read cost the reader quadratic copying."""
        buf = self._buf
        if len(buf) < HEADER_SIZE or buf[:len(_MAGIC_PREFIX)] != _MAGIC_PREFIX:
            return False
        magic, length, check, _ = HEADER.unpack_from(buf, 0)
        end = HEADER_SIZE + length
        if length ^ check != 0xFFFFFFFF or length > self.max_payload or len(buf) >= end:
            return False
        if magic != MAGIC:            # unchecked: a data frame's bytes stream out
            found = _data_prefix(buf, HEADER_SIZE, len(buf))
            if found is _INCOMPLETE or found is not None and found[2] + found[3] == end:
                return False
        return True

    def reset(self) -> None:
        """Forget any partial frame (a line starts over), also what a parse still in
        progress (an unfinished `iter_feed`) has not consumed."""
        self._buf = bytearray()
        self._body = None
        self._generation += 1

    def _frames(self, buf) -> Iterator[dict]:
        pos = 0
        generation = self._generation
        try:
            while True:
                if self._body is not None:    # streaming an unchecked data frame's bytes
                    channel, stream, due = self._body
                    take = min(due, len(buf) - pos)
                    if not take:
                        return
                    self._body = (channel, stream, due - take) if due > take else None
                    pos += take
                    yield {"t": DATA, "ch": channel, "s": stream,
                           "d": memoryview(buf)[pos - take:pos]}
                    continue
                start = buf.find(_MAGIC_PREFIX, pos)
                if start < 0:
                    # Keep a tail that could be the start of a magic.
                    keep = max(pos, len(buf) - (len(_MAGIC_PREFIX) - 1))
                    self.garbage_bytes += keep - pos
                    pos = keep
                    return
                self.garbage_bytes += start - pos
                pos = start
                if len(buf) - pos < HEADER_SIZE:
                    return
                magic, length, check, crc = HEADER.unpack_from(buf, pos)
                checked = magic == MAGIC
                if length ^ check != 0xFFFFFFFF or length > self.max_payload or not (
                        checked or magic == MAGIC_UNCHECKED and self._accept_unchecked):
                    self.bad_frames += 1
                    pos += 1
                    continue
                end = pos + HEADER_SIZE + length
                if self._stream_data and not checked:
                    found = _data_prefix(buf, pos + HEADER_SIZE, min(end, len(buf)))
                    if found is _INCOMPLETE:
                        return
                    if found is not None and found[2] + found[3] == end:
                        channel, stream, body, size = found
                        pos = body
                        if size:
                            self._body = (channel, stream, size)
                        else:
                            yield {"t": DATA, "ch": channel, "s": stream, "d": b""}
                        continue
                if len(buf) < end:
                    return
                with memoryview(buf) as view:
                    payload = view[pos + HEADER_SIZE:end]
                    if checked and zlib.crc32(payload) != crc:
                        payload.release()
                        self.bad_frames += 1
                        pos += 1          # rescan: a real frame may hide inside
                        continue
                    try:
                        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
                    except Exception:
                        message = None
                    payload.release()
                if not isinstance(message, dict) or not isinstance(message.get("t"), str):
                    self.bad_frames += 1
                    pos += 1
                    continue
                pos = end
                yield message
        finally:
            if generation != self._generation:
                pass                      # reset meanwhile: the rest is forgotten
            elif buf is self._buf:
                del buf[:pos]
            elif pos < len(buf):
                self._buf = bytearray(buf[pos:])

    @property
    def buffered(self) -> int:
        return len(self._buf)


def answer(key: bytes, challenge: bytes) -> bytes:
    """The client's proof: HMAC-SHA256 keyed by the executor Key (empty key allowed)."""
    return hmac.new(key or b"", HMAC_CONTEXT + challenge, hashlib.sha256).digest()


class ServerHandshake:
    """Server side of the hello. `receive(message)` -> (reply messages, authenticated)."""

    def __init__(self, key: bytes | None, random=os.urandom, allow_unchecked: bool = False):
        self._key = key or b""
        self._random = random
        self.allow_unchecked = allow_unchecked   # we are on a socket, not a line
        self.challenge: bytes | None = None
        self.authenticated = False

    def start(self) -> dict:
        self.challenge = self._random(CHALLENGE_SIZE)
        self.authenticated = False
        return {"t": HELLO, "v": VERSION, "challenge": self.challenge, "server": "tether",
                "unchecked": self.allow_unchecked}

    def receive(self, message: dict) -> list[dict]:
        """Handle a handshake message; raises ProtocolError on a wrong answer."""
        kind = message.get("t")
        if kind == CONNECT:
            return [self.start()]
        if kind == AUTH:
            if self.challenge is None:
                raise ProtocolError("auth before hello: send connect first")
            mac = message.get("mac")
            expected = answer(self._key, self.challenge)
            self.challenge = None          # one answer per challenge
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, expected):
                raise ProtocolError("authentication failed: wrong HMAC for the challenge")
            self.authenticated = True
            return [{"t": WELCOME, "v": VERSION}]
        raise ProtocolError(f"{clip(kind)} before authentication")


class ClientHandshake:
    """Client side: connect, answer the hello, wait for welcome."""

    def __init__(self, key: bytes | None):
        self._key = key or b""
        self.done = False
        self.server_version: int | None = None
        self.unchecked_ok = False   # the server reads unchecked data frames

    @staticmethod
    def start() -> dict:
        return {"t": CONNECT, "v": VERSION}

    def receive(self, message: dict) -> list[dict]:
        kind = message.get("t")
        if kind == HELLO:
            challenge = message.get("challenge")
            if not isinstance(challenge, bytes):
                raise ProtocolError("hello without a challenge")
            self.server_version = message.get("v")
            self.unchecked_ok = message.get("unchecked") is True
            return [{"t": AUTH, "v": VERSION, "mac": answer(self._key, challenge)}]
        if kind == WELCOME:
            self.done = True
            return []
        if kind == ERROR:
            raise ProtocolError(f"server refused: {message.get('msg')}")
        return []   # stale traffic from an earlier conversation on this line


# -- message checks (server side) --------------------------------------------------------------
def require(message: dict, field: str, kind: type | tuple[type, ...]):
    value = message.get(field)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"{clip(message.get('t'))}: field {field!r} must be "
                            f"{getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def plain(value):
    """A value msgpack can carry (session state may hold other types)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)
