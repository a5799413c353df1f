"""The serial sync handshake that puts a line in a known state before SSH starts, sans-IO.

Two versions exist and they are not wire compatible (docs/attach-protocol.md):

* ``head`` (vmware/vic pkg/serial since 4b73b657d, port layers v1.2.0 and later):
  client ``SYN t``; server ``ACK t+1 s``; client ``ACK s+1``; server ``ACK``. Reads are
  garbage tolerant: of everything a read returned, only the last bytes count.
* ``v0.9`` (port layers up to v1.1.x): every token goes through ``(b+1) | 0x80``, the
  server ends without a final ``ACK``, and the client may send a debug ``ACK`` (0x07)
  and then a 23-byte probe the server echoes before the client's last ``ACK``.
* ``auto`` (ours) answers both: it picks its token so that the client's answer tells the
  two apart, and sends the final ``ACK`` only to a ``head`` client.

A failed attempt answers ``NAK`` (where the reference does) and rests for
`RETRY_INTERVAL`. The next attempt reads its ``SYN`` from the last two bytes that came,
so of the bytes that arrive meanwhile only those two are kept: a peer that writes
without pause costs two bytes here, however long the rest (the reference holds at most
one 32 KiB read; the caller should not read the line while resting, as the reference
does not).
"""
from __future__ import annotations

import os

SYN = 0x16
ACK = 0x06
DEBUG_ACK = 0x07
NAK = 0x15

HEAD = "head"
V09 = "v0.9"
AUTO = "auto"
VARIANTS = (HEAD, V09, AUTO)

RETRY_INTERVAL = 0.010          # seconds between attempts, as the reference's ticker
CLIENT_TIMEOUT = 1.0            # the port layer's deadline for one client attempt
PROBE = b"\x1b[32mhello world\x1b[39m!\n"   # v0.9's lossiness probe (23 bytes)
SYN_SIZE = 2                    # SYN and the client's token


def inc_v09(value: int) -> int:
    """v0.9's token increment."""
    return ((value + 1) | 0x80) & 0xFF


def inc_head(value: int) -> int:
    return (value + 1) & 0xFF


def _random_byte() -> int:
    return os.urandom(1)[0]


def parse_variant(text: str) -> str:
    value = (text or "").strip().lower()
    if value in ("0.9", "v09", "old"):
        value = V09
    if value not in VARIANTS:
        raise ValueError(f"unknown VIC handshake {text!r}: use head, v0.9 or auto")
    return value


class HandshakeError(Exception):
    """The peer broke the handshake; the attempt failed."""


class ServerHandshake:
    """The agent's side. Feed it what the line delivers; write what it returns.

    ``established`` turns true once the client is in sync; ``leftover`` then holds the
    bytes after the handshake (the start of SSH). ``resting`` asks the caller to call
    `retry()` after `RETRY_INTERVAL`.
    """

    def __init__(self, variant: str = HEAD, random_byte=_random_byte):
        self.variant = parse_variant(variant)
        self.spoken = self.variant if self.variant != AUTO else ""   # decided by the client
        self._random_byte = random_byte
        self._buf = bytearray()
        self._token = 0
        self._debug = False
        self.state = "syn"
        self.established = False
        self.leftover = b""
        self.failures = 0
        self.last_error = ""

    @property
    def resting(self) -> bool:
        return self.state == "resting"

    @property
    def buffered(self) -> int:
        """Bytes held for the next step."""
        return len(self._buf)

    def retry(self) -> bytes:
        """Start the next attempt (after a failure); returns bytes to write."""
        if self.state != "resting":
            return b""
        self.state = "syn"
        return self._run()

    def receive(self, data: bytes) -> bytes:
        if self.established:
            self.leftover += data
            return b""
        self._buf += data
        if self.state == "resting":
            del self._buf[:-SYN_SIZE]      # the next attempt reads only these
            return b""
        return self._run()

    # -- the steps ----------------------------------------------------------------------
    def _run(self) -> bytes:
        out = bytearray()
        while not self.established and self.state != "resting":
            step = getattr(self, "_" + self.state.replace("-", "_"))
            progressed = step(out)
            if not progressed:
                break
        if self.established:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return bytes(out)

    def _fail(self, out: bytearray, message: str, nak: bool = True) -> bool:
        if nak:
            out.append(NAK)
        self.failures += 1
        self.last_error = message
        self.state = "resting"
        self._debug = False
        if self.variant == AUTO:
            self.spoken = ""
        return True

    def _syn(self, out: bytearray) -> bool:
        # Both versions read "at least two bytes" and keep the last two (garbage tolerance).
        if len(self._buf) < SYN_SIZE:
            return False
        flag, token = self._buf[-2], self._buf[-1]
        self._buf.clear()
        if flag != SYN:
            return self._fail(out, f"unexpected syn packet: {flag:#04x}")
        if self.variant == HEAD:
            echo, self._token = inc_head(token), self._random_byte() % 255
        elif self.variant == V09:
            echo, self._token = inc_v09(token), inc_v09(self._random_byte())
        else:
            # A head client's token is below 0xff; a v0.9 client's has the high bit set.
            # Below 0x7f only head is possible, from 0x7f on both forms agree except at
            # 0xff. Our token keeps s+1 below 0x80 so the answer shows the version.
            echo = inc_v09(token) if token == 0xFF else inc_head(token)
            self._token = self._random_byte() % 0x7F
        out += bytes((ACK, echo, self._token))
        self.state = "ack" if self.variant == HEAD else "ack-flag"
        return True

    def _ack(self, out: bytearray) -> bool:
        """head: ACK s+1, the last two bytes of what arrived."""
        if len(self._buf) < 2:
            return False
        flag, token = self._buf[-2], self._buf[-1]
        self._buf.clear()
        if flag != ACK:
            return self._fail(out, f"unexpected ack packet: {flag:#04x}")
        if token != inc_head(self._token):
            return self._fail(out, f"unexpected position {token:#04x}, expected "
                                   f"{inc_head(self._token):#04x}")
        out.append(ACK)
        self.established = True
        return True

    def _ack_flag(self, out: bytearray) -> bool:
        """v0.9 and auto: one byte, ACK or the debug ACK."""
        if not self._buf:
            return False
        flag = self._buf.pop(0)
        if flag == DEBUG_ACK and self.variant == AUTO:
            self.spoken = V09
        if flag not in (ACK, DEBUG_ACK) or (flag == DEBUG_ACK and self.spoken == HEAD):
            return self._fail(out, f"not an ack packet: {flag:#04x}")
        self._debug = flag == DEBUG_ACK
        self.state = "ack-token"
        return True

    def _ack_token(self, out: bytearray) -> bool:
        if not self._buf:
            return False
        token = self._buf.pop(0)
        if self.variant == AUTO and not self.spoken:
            if token == inc_head(self._token):
                self.spoken = HEAD
            elif token == inc_v09(self._token):
                self.spoken = V09
        expected = inc_head(self._token) if self.spoken == HEAD else inc_v09(self._token)
        if token != expected:
            return self._fail(out, f"unexpected position {token:#04x}, expected {expected:#04x}")
        if self.spoken == HEAD:
            out.append(ACK)
            self._buf.clear()      # head reads everything that is there: nothing follows
            self.established = True
        elif self._debug:
            self.state = "probe"
        else:
            self.established = True
        return True

    def _probe(self, out: bytearray) -> bool:
        if len(self._buf) < len(PROBE):
            return False
        out += self._buf[:len(PROBE)]
        del self._buf[:len(PROBE)]
        self.state = "probe-ack"
        return True

    def _probe_ack(self, out: bytearray) -> bool:
        if not self._buf:
            return False
        flag = self._buf.pop(0)
        if flag != ACK:
            return self._fail(out, "lossiness check failed", nak=False)
        self.established = True
        return True


class ClientHandshake:
    """The port layer's side, for `tether attach --vic` and tests of our own client.

    `start()` gives the first packet; feed replies to `receive()`; ``established`` or a
    HandshakeError ends the attempt. ``need`` says how many bytes the next read may take
    (so the SSH banner after the server's final ACK stays unread).
    """

    def __init__(self, variant: str = HEAD, random_byte=_random_byte, debug: bool = False):
        variant = parse_variant(variant)
        if variant == AUTO:
            raise ValueError("a client speaks head or v0.9")
        self.variant = variant
        self.debug = debug and variant == V09
        self._random_byte = random_byte
        self._buf = bytearray()
        self.established = False
        self.state = "new"
        self._pos = 0

    @property
    def need(self) -> int:
        return 1 if self.state in ("final-ack",) else 1 << 15

    def start(self) -> bytes:
        self._buf.clear()
        self.established = False
        if self.variant == HEAD:
            self._pos = self._random_byte() % 255
        else:
            self._pos = inc_v09(self._random_byte())
        self.state = "syn-ack"
        return bytes((SYN, self._pos))

    def receive(self, data: bytes) -> bytes:
        self._buf += data
        if self.state == "syn-ack":
            if self.variant == V09:
                return self._syn_ack_v09()
            if len(self._buf) < 3:
                return b""
            flag, echo, token = self._buf[-3], self._buf[-2], self._buf[-1]
            self._buf.clear()
            self._check_flag(flag)
            if echo != inc_head(self._pos):
                raise HandshakeError(f"unexpected ack position {echo}, expected "
                                     f"{inc_head(self._pos)}")
            self.state = "final-ack"
            return bytes((ACK, inc_head(token)))
        if self.state == "final-ack":
            if not self._buf:
                return b""
            flag = self._buf.pop(0)
            if flag != ACK:
                raise HandshakeError(f"unexpected server response: {flag:#04x}")
            self.established = True
            self.state = "done"
            return b""
        if self.state == "probe":
            if len(self._buf) < len(PROBE):
                return b""
            echoed = bytes(self._buf[:len(PROBE)])
            del self._buf[:len(PROBE)]
            if echoed != PROBE:
                raise HandshakeError("lossiness check failed")
            self.established = True
            self.state = "done"
            return bytes((ACK,))
        return b""

    def _check_flag(self, flag: int) -> None:
        if flag == NAK:
            raise HandshakeError("the server declined the handshake")
        if flag != ACK:
            raise HandshakeError(f"unexpected server response: {flag:#04x}")

    def _syn_ack_v09(self) -> bytes:
        if len(self._buf) < 3:
            if self._buf and self._buf[0] != ACK:
                self._check_flag(self._buf[0])
            return b""
        flag, echo, token = self._buf[0], self._buf[1], self._buf[2]
        del self._buf[:3]
        self._check_flag(flag)
        if echo != inc_v09(self._pos):
            raise HandshakeError(f"unexpected sync position {echo}")
        if self.debug:
            self.state = "probe"
            return bytes((DEBUG_ACK, inc_v09(token))) + PROBE
        self.established = True
        self.state = "done"
        return bytes((ACK, inc_v09(token)))
