"""Byte streams the attach protocol runs over: thin, no protocol logic.

Endpoints are strings. Server side (what the agent listens on):
  unix:PATH     a unix stream socket (the sandbox's --attach-socket)
  vsock:PORT    AF_VSOCK (2377 in a VM), clients from the host (CID 2) only;
                vsock:CID:PORT takes clients from that CID, vsock:*:PORT from any
  tcp:HOST:PORT a TCP listener (tests, or a guest network)
  port:NAME     a virtio-serial port found by name under /sys/class/virtio-ports
  serial:DEV    a serial tty (raw mode, 115200 baud)
Client side: unix:PATH, vsock:CID:PORT, tcp:HOST:PORT (e.g. a QEMU chardev socket),
serial:DEVICE.

A server transport is either a listener (`accept()` gives a `Conn` per client) or a line
(`open_line()`: one `Conn` that lives for ever, a host comes and goes on it).
"""
from __future__ import annotations

import errno
import os
import socket
import stat

from tether.console import RateLimit
from tether.log import WARNING, get_logger
from tether.system import set_raw_tty

log = get_logger("tether.attach")

SOCKET_BUFFER = 1 << 20
VSOCK_HOST_CID = 2          # VMADDR_CID_HOST: the hypervisor's side
_peer_log = RateLimit(burst=3, interval=30.0)


class EndpointError(ValueError):
    """An endpoint string is malformed or names something that is not there."""


class Conn:
    """A non-blocking byte stream: a socket, or a tty/virtio port (`persistent`)."""

    def __init__(self, fd: int, name: str, *, sock: socket.socket | None = None,
                 persistent: bool = False):
        self.fd = fd
        self.name = name
        self.sock = sock
        self.persistent = persistent
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def read(self, size: int) -> bytes | None:
        """Bytes; b"" at end of stream; None when nothing is there yet."""
        try:
            if self.sock is not None:
                return self.sock.recv(size)
            return os.read(self.fd, size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            if err.errno in (errno.EIO, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                return b""   # the other end went away (a tty's EIO: hung up)
            raise

    def write(self, data) -> int:
        """Bytes written (0 if it would block); raises BrokenPipeError etc. when gone."""
        try:
            if self.sock is not None:
                return self.sock.send(data, socket.MSG_NOSIGNAL)
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0

    def writev(self, buffers: list) -> int:
        """A gathering write of several buffers; bytes written (0 if it would block)."""
        try:
            if self.sock is not None:
                return self.sock.sendmsg(buffers, (), socket.MSG_NOSIGNAL)
            return os.writev(self.fd, buffers)
        except (BlockingIOError, InterruptedError):
            return 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)


# -- endpoint parsing ---------------------------------------------------------------------
def _split_host_port(rest: str, what: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise EndpointError(f"{what}: expected HOST:PORT, got {rest!r}")
    return host, int(port)


def parse_endpoint(endpoint: str) -> tuple[str, tuple]:
    kind, sep, rest = endpoint.partition(":")
    if not sep or not rest:
        raise EndpointError(f"endpoint {endpoint!r}: expected KIND:ADDRESS "
                            "(unix:PATH, vsock:[CID:]PORT, tcp:HOST:PORT, serial:DEV, port:NAME)")
    if kind in ("unix", "serial", "port"):
        return kind, (rest,)
    if kind == "tcp":
        return kind, _split_host_port(rest, endpoint)
    if kind == "vsock":
        parts = rest.split(":")
        if len(parts) > 2 or not parts[-1].isdigit() or not (
                len(parts) == 1 or parts[0].isdigit() or parts[0] == "*"):
            raise EndpointError(f"endpoint {endpoint!r}: expected vsock:CID:PORT or vsock:PORT")
        return kind, tuple(p if p == "*" else int(p) for p in parts)
    raise EndpointError(f"endpoint {endpoint!r}: unknown kind {kind!r}")


# -- lines ------------------------------------------------------------------------------------
def find_virtio_port(name: str, sys_root: str = "/sys") -> str:
    """The /dev node of the virtio-serial port called `name` (EndpointError saying why not)."""
    from extraconfig.virtio import find_port
    path = find_port(name, sys_root)
    if path is not None:
        return path
    base = os.path.join(sys_root, "class", "virtio-ports")
    if not os.path.isdir(base):
        raise EndpointError(f"virtio-serial port {name!r}: {base} does not exist "
                            "(no virtio-serial device in this machine)")
    raise EndpointError(f"virtio-serial port {name!r} not found under {base}")


def open_line(kind: str, address: str) -> Conn:
    """A serial tty or virtio port, opened non-blocking, as a persistent Conn."""
    path = find_virtio_port(address) if kind == "port" else address
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.isatty(fd):
            set_raw_tty(fd)
    except BaseException:
        os.close(fd)
        raise
    return Conn(fd, f"{kind}:{address}", persistent=True)


def _widen_buffers(sock: socket.socket) -> None:
    """Bigger socket buffers: fewer wake-ups per byte when output streams (best effort)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


# -- server side -----------------------------------------------------------------------------
class Listener:
    """A listening socket; `accept()` gives a non-blocking Conn or None. With `peer`, a
    client whose address `peer(address)` refuses is closed at once (and logged)."""

    def __init__(self, sock: socket.socket, name: str, unlink: str | None = None,
                 peer=None):
        self.sock = sock
        self.name = name
        self._unlink = unlink
        self._peer = peer
        self.refused_peers = 0
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Conn | None:
        for _ in range(16):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            if self._peer is None or self._peer(address):
                break
            sock.close()
            self.refused_peers += 1
            _peer_log.log(log, WARNING, "attach: %s: refused a client from %s",
                          self.name, address)
        else:
            return None
        sock.setblocking(False)
        _widen_buffers(sock)
        return Conn(sock.fileno(), f"{self.name} client", sock=sock)

    def close(self) -> None:
        self.sock.close()
        if self._unlink:
            try:
                os.unlink(self._unlink)
            except FileNotFoundError:
                pass


def listen(endpoint: str) -> Listener | Conn:
    """Open a server endpoint: a Listener for sockets, a persistent Conn for lines."""
    kind, addr = parse_endpoint(endpoint)
    if kind in ("serial", "port"):
        return open_line(kind, addr[0])
    if kind == "unix":
        path = addr[0]
        try:   # a stale socket goes; anything else at PATH stays (bind then fails)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return Listener(sock, endpoint, unlink=path)
    if kind == "vsock":
        port = addr[-1]
        # Only the host may attach unless the endpoint says otherwise: a process in the
        # VM (CID 1, or the VM's own CID) must not reach the agent this way.
        cid = addr[0] if len(addr) == 2 else VSOCK_HOST_CID
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return Listener(sock, endpoint,
                        peer=None if cid == "*" else lambda address: address[0] == cid)
    host, port = addr
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, endpoint)


# -- client side -----------------------------------------------------------------------------
def connect(endpoint: str, timeout: float = 10.0) -> Conn:
    """Connect to an agent; the Conn comes back non-blocking."""
    kind, addr = parse_endpoint(endpoint)
    if kind == "serial":
        return open_line("serial", addr[0])
    if kind == "port":
        return open_line("port", addr[0])
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target = addr[0]
    elif kind == "vsock":
        if len(addr) != 2 or addr[0] == "*":
            raise EndpointError(f"endpoint {endpoint!r}: a client needs vsock:CID:PORT")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target = addr
    else:
        host, port = addr
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return Conn(sock.fileno(), endpoint, sock=sock)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    _widen_buffers(sock)
    return Conn(sock.fileno(), endpoint, sock=sock)
