"""Guestinfo over a virtio-serial port (QEMU), carrying the VMware backdoor's RPC text.

Under QEMU there is no VMware backdoor, so the host-side launcher (`tether vm`) plays the
VMX on a virtio-serial port named `org.tether.guestinfo`. The requests and replies are
the RPCI text a VMX sees, unchanged:

    guest -> host   "info-get KEY"            host -> guest   "1 VALUE"   (key present)
                                                              "0 No value found"
    guest -> host   "info-set KEY VALUE"      host -> guest   "1 "        (stored)
                                                              "0 REASON"  (refused: not
                                                              guestinfo.*, or the store full)
    guest -> host   "info-dump PREFIX"        host -> guest   "1 " + VMX lines
                                                              "0 REASON"  (cannot)

`info-dump` is ours, not the VMX's: every key under PREFIX (a `guestinfo.` prefix) with
its stored value, as the lines of a VMX file (`key = "value"`, extraconfig.transport's
escapes), in one reply. The agent reads its whole config with it: one round trip instead
of one a key, and a consistent snapshot. A host that does not know it, or whose keys
would not fit one message, answers `0 REASON`, and the guest reads key by key.

A value runs to the end of the message (it may hold spaces and newlines); a key holds no
space. Framing, both ways: a 4-byte big-endian length, then that many bytes of UTF-8
text. The guest sends one request and reads its reply before the next (no pipelining),
so replies need no ids. Messages over 1 MiB are refused as a framing error.

The framing helpers are sans-IO; `VirtioSerialTransport` adds the guest's port I/O, and
`answer()` is the host's side of one request against a store.
"""
from __future__ import annotations

import errno
import os
import select
import struct
import time
from _collections_abc import Callable, Iterable   # collections.abc's, already loaded by os

PORT_NAME = "org.tether.guestinfo"
MAX_MESSAGE = 1 << 20
NOT_FOUND = "No value found"
_length = struct.Struct(">I")


class FramingError(ValueError):
    """The peer sent something that is not a length-prefixed message."""


class GuestinfoError(OSError):
    """The guestinfo port failed: no host, no reply in time, or a malformed reply."""


class Refused(Exception):
    """The host's store will not take an `info-set` (it is full): the guest gets
    "0 REASON", REASON being the exception's text."""


def frame(text: str) -> bytes:
    """One message on the port: length, then the UTF-8 text."""
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > MAX_MESSAGE:
        raise FramingError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return _length.pack(len(data)) + data


class Deframer:
    """Reassembles messages from the byte stream, however the reads cut it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _length.size:
            (size,) = _length.unpack_from(self._buffer)
            if size > MAX_MESSAGE:
                raise FramingError(f"peer announced a {size}-byte message (limit {MAX_MESSAGE})")
            end = _length.size + size
            if len(self._buffer) < end:
                break
            messages.append(bytes(self._buffer[_length.size:end]).decode("utf-8", "surrogateescape"))
            del self._buffer[:end]
        return messages

    @property
    def pending(self) -> int:
        return len(self._buffer)


def info_get_request(key: str) -> str:
    _check_key(key)
    return f"info-get {key}"


def info_set_request(key: str, value: str) -> str:
    _check_key(key)
    return f"info-set {key} {value}"


def _check_key(key: str) -> None:
    if not key or any(c in key for c in " \t\n"):
        raise ValueError(f"guestinfo key {key!r} is empty or holds whitespace")


def info_dump_request(prefix: str) -> str:
    _check_key(prefix)
    return f"info-dump {prefix}"


def parse_request(text: str) -> tuple[str, str, str | None]:
    """("info-get", key, None), ("info-set", key, value) or ("info-dump", prefix, None);
    ValueError otherwise."""
    verb, _, rest = text.partition(" ")
    if verb in ("info-get", "info-dump"):
        key = rest.strip()
        if key and " " not in key:
            return verb, key, None
    elif verb == "info-set":
        key, sep, value = rest.partition(" ")
        if key and sep:
            return verb, key, value
    raise ValueError(f"not an info-get/info-set/info-dump request: {text[:80]!r}")


def parse_reply(text: str) -> tuple[bool, str]:
    """RPCI reply -> (success, rest): "1 value" is (True, "value")."""
    if text[:2] == "1 " or text == "1":
        return True, text[2:]
    if text[:2] == "0 " or text == "0":
        return False, text[2:]
    raise GuestinfoError(errno.EPROTO, f"malformed guestinfo reply {text[:80]!r}")


def answer(request: str, get: Callable[[str], str | None],
           set_: Callable[[str, str], None],
           items: Callable[[], Iterable[tuple[str, str]]] | None = None) -> str:
    """The host's reply to one request, VMX style: only `guestinfo.` keys exist for the
    guest. `items` lists the stored keys and values for `info-dump`; a host without it
    answers that request as the VMX would, "0 Unknown command"."""
    try:
        verb, key, value = parse_request(request)
    except ValueError:
        return "0 Unknown command"
    if verb == "info-dump" and items is None:
        return "0 Unknown command"
    if not key.startswith("guestinfo."):
        return f"0 {NOT_FOUND}" if verb == "info-get" else "0 Permission denied"
    if verb == "info-dump":
        return _dump(key, items)
    if verb == "info-get":
        stored = get(key)
        return f"0 {NOT_FOUND}" if stored is None else f"1 {stored}"
    try:
        set_(key, value)
    except Refused as err:
        return f"0 {err}"
    return "1 "


def _dump(prefix: str, items) -> str:
    from .transport import format_vmx
    text = "1 " + format_vmx({k: v for k, v in items() if k.startswith(prefix)})
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > MAX_MESSAGE:
        return f"0 Too large: {size} bytes is over the {MAX_MESSAGE}-byte message limit"
    return text


def find_port(name: str = PORT_NAME, sys_root: str = "/sys", dev_root: str = "/dev") -> str | None:
    """The /dev node of the named virtio-serial port. No udev in the guest, so no
    /dev/virtio-ports/NAME link: map the name through /sys/class/virtio-ports/*/name."""
    base = os.path.join(sys_root, "class", "virtio-ports")
    try:
        ports = sorted(os.listdir(base))
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(base, port, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join(dev_root, port)
        except OSError:
            continue
    return None


VIRTIO_ID_CONSOLE = 0x0003


def has_console_device(sys_root: str = "/sys") -> bool:
    """Whether a virtio console (virtio-serial) device is on the bus. Its ports are
    announced by the host after the device probes, so they may still be on their way."""
    base = os.path.join(sys_root, "bus", "virtio", "devices")
    try:
        devices = os.listdir(base)
    except OSError:
        return False
    for device in devices:
        try:
            with open(os.path.join(base, device, "device")) as f:
                if int(f.read().strip(), 16) == VIRTIO_ID_CONSOLE:
                    return True
        except (OSError, ValueError):
            continue
    return False


OWN_TIMEOUT = object()   # a request's timeout: the transport's own


class VirtioSerialTransport:
    """info_get/info_set over a connected byte stream (the port's fd, or a socket in tests).

    Every call waits at most `timeout` seconds for the host, then raises GuestinfoError;
    a port with no host connected reads as hung up, and is waited on the same way. An
    `info_get` (or `request`) may give its own timeout, None for no limit at all: a host
    may hold a reply back on purpose.
    """

    def __init__(self, fd: int, timeout: float = 30.0, path: str = "") -> None:
        self.fd = fd
        self.timeout = timeout
        self.path = path or f"fd {fd}"
        self._deframer = Deframer()
        os.set_blocking(fd, False)

    @classmethod
    def open(cls, path: str, timeout: float = 30.0) -> "VirtioSerialTransport":
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        return cls(fd, timeout, path)

    def info_get(self, key: str, timeout=OWN_TIMEOUT) -> str | None:
        """The key's value, None when the host has none. `timeout`: seconds, None to
        wait for ever; the transport's own when not given."""
        ok, value = parse_reply(self.request(info_get_request(key), timeout))
        return value if ok else None

    def info_dump(self, prefix: str) -> dict[str, str] | None:
        """Every key under `prefix` with its value, in one request; None when the host
        cannot give them so (it does not know `info-dump`, they would not fit, or it
        answers it with something that is no reply: its keys one by one may still be)."""
        try:
            ok, text = parse_reply(self.request(info_dump_request(prefix)))
        except GuestinfoError as err:
            if err.errno != errno.EPROTO:
                raise   # no answer at all (a timeout): key by key would fare no better
            return None
        if not ok:
            return None
        from .transport import parse_vmx
        try:
            return parse_vmx(text)
        except ValueError:   # the host's fault: its keys one by one are still good
            return None

    def info_set(self, key: str, value: str) -> None:
        ok, reason = parse_reply(self.request(info_set_request(key, value)))
        if not ok:
            raise GuestinfoError(errno.EPERM, f"host refused info-set {key}: {reason}")

    def request(self, text: str, timeout=OWN_TIMEOUT) -> str:
        """Send one request and return the host's reply text, within `timeout` seconds
        (the transport's own when not given; None: no limit)."""
        if timeout is OWN_TIMEOUT:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._discard_stale_input()
        data = memoryview(frame(text))
        while data:
            self._wait(select.POLLOUT, deadline, text, timeout)
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                continue
            data = data[written:]
        while True:
            self._wait(select.POLLIN, deadline, text, timeout)
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:   # host not connected (virtio-serial reads 0): wait for it
                time.sleep(0.01)
                continue
            messages = self._deframer.feed(chunk)
            if messages:
                return messages[0]

    def _wait(self, event: int, deadline: float | None, text: str, timeout: float) -> None:
        poller = select.poll()
        poller.register(self.fd, event)
        while True:
            left = 0.5 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                verb = text.partition(" ")[0]
                raise GuestinfoError(errno.ETIMEDOUT,
                                     f"no guestinfo reply on {self.path} within {timeout:g} s "
                                     f"({verb}): is the host side (tether vm) connected to the port?")
            ready = poller.poll(min(left, 0.5) * 1000)
            if any(mask & event for _, mask in ready):
                return
            if ready:   # POLLHUP alone: no host on the other end yet
                time.sleep(0.01)

    def _discard_stale_input(self) -> None:
        # A reply that came after an earlier timeout must not answer the next request.
        self._deframer = Deframer()
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "VirtioSerialTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_transport(log: Callable[[str], None] | object = None, name: str = PORT_NAME,
                   wait: float = 1.0, timeout: float = 30.0,
                   sys_root: str = "/sys", dev_root: str = "/dev") -> VirtioSerialTransport | None:
    """The guestinfo transport on the named port, or None when this VM has no such port.

    `log` is a callable taking a message, or a logging.Logger. Waits up to `wait` seconds
    for the port to show up when virtio-serial is present (devices probe asynchronously).
    """
    say = _logger(log)
    deadline = time.monotonic() + wait
    path = find_port(name, sys_root, dev_root)
    while path is None and time.monotonic() < deadline:
        if not has_console_device(sys_root):
            break   # no virtio-serial device at all: no port will appear
        time.sleep(0.05)
        path = find_port(name, sys_root, dev_root)
    if path is None:
        return None
    try:
        transport = VirtioSerialTransport.open(path, timeout)
    except OSError as error:
        say(f"guestinfo: cannot open virtio-serial port {name} at {path}: {error}")
        return None
    say(f"guestinfo: virtio-serial port {name} at {path}")
    return transport


def _logger(log) -> Callable[[str], None]:
    if log is None:
        return lambda message: None
    if callable(log):
        return log
    return getattr(log, "info")

