"""The port-I/O calls carried over a unix socket, so a simulated hypervisor in one
process can stand in for the CPU's ports in another (the agent under `tether sandbox
--backdoor-sim SOCKET`).

Request: op (1 byte), length (u32), the 7 registers (u32 each, little-endian), then for
hb_out `length` bytes of data (for hb_in, length is the byte count wanted).
Reply: the 7 registers, a length, then that many bytes (hb_in's data).
"""

from __future__ import annotations

import socket
import struct
import threading

from .message import BackdoorError
from .protocol import Regs

OP_BACKDOOR = 1
OP_HB_OUT = 2
OP_HB_IN = 3
_REQUEST = struct.Struct("<BI7I")
_REPLY = struct.Struct("<7II")
MAX_DATA = 64 * 1024 * 1024


class BridgeError(BackdoorError):
    """The socket to the simulated hypervisor failed."""


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def encode_request(op: int, regs: Regs, data: bytes = b"", size: int = 0) -> bytes:
    length = len(data) if op == OP_HB_OUT else size
    return _REQUEST.pack(op, length, *regs) + data


def read_request(sock: socket.socket):
    """(op, regs, data-or-size), or None at end of stream."""
    head = _read_exact(sock, _REQUEST.size)
    if head is None:
        return None
    op, length, *regs = _REQUEST.unpack(head)
    if op not in (OP_BACKDOOR, OP_HB_OUT, OP_HB_IN) or length > MAX_DATA:
        raise BridgeError(f"bad request: op {op}, length {length}")
    if op == OP_HB_OUT:
        data = _read_exact(sock, length)
        if data is None:
            return None
        return op, Regs(*regs), data
    return op, Regs(*regs), length


def encode_reply(regs: Regs, data: bytes) -> bytes:
    return _REPLY.pack(*regs, len(data)) + data


class SocketPorts:
    """A `Ports` whose calls go to a simulated hypervisor over a unix socket."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._lock = threading.Lock()

    def _call(self, request: bytes) -> tuple[Regs, bytes]:
        with self._lock:
            try:
                self._sock.sendall(request)
                head = _read_exact(self._sock, _REPLY.size)
                if head is None:
                    raise BridgeError(f"the simulated hypervisor at {self.path} hung up")
                *regs, length = _REPLY.unpack(head)
                data = _read_exact(self._sock, length) if length else b""
                if data is None:
                    raise BridgeError(f"the simulated hypervisor at {self.path} hung up")
            except OSError as err:
                raise BridgeError(f"simulated hypervisor at {self.path}: {err}") from err
        return Regs(*regs), data

    def backdoor(self, regs: Regs) -> Regs:
        return self._call(encode_request(OP_BACKDOOR, regs))[0]

    def hb_out(self, regs: Regs, data: bytes) -> Regs:
        return self._call(encode_request(OP_HB_OUT, regs, data))[0]

    def hb_in(self, regs: Regs, size: int) -> tuple[Regs, bytes]:
        return self._call(encode_request(OP_HB_IN, regs, size=size))

    def close(self) -> None:
        self._sock.close()
