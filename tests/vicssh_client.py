"""An independent client for VIC's attach, for the tests: the handshake written out in
bytes here, and SSH from paramiko (the agent's server is asyncssh).

It speaks as the reference's port layer does (vmware/vic
lib/portlayer/attach/communication): user `daemon` with no credentials, global requests
`container-ids` and `version`, channel type `attach` with the session ID as raw extra
data, channel requests with raw payloads. paramiko has no public call for extra data on
a channel open, raw request payloads, or the texts of refusals, so those few messages
are built here and its handler tables are extended per transport (its documented
"per-instance manipulation" hook).
"""
from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time

import paramiko
from paramiko.channel import Channel
from paramiko.common import (MSG_CHANNEL_FAILURE, MSG_CHANNEL_OPEN_FAILURE,
                             MSG_CHANNEL_SUCCESS, MSG_REQUEST_FAILURE, cMSG_CHANNEL_OPEN,
                             cMSG_CHANNEL_REQUEST)
from paramiko.message import Message

SYN, ACK, NAK = 0x16, 0x06, 0x15


class Refused(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(f"{code}: {text}")
        self.code, self.text = code, text


def handshake_head(sock: socket.socket, garbage: bytes = b"", timeout: float = 20.0) -> int:
    """The port layer's HandshakeClient at HEAD, retried every second as it does.
    `garbage` goes out in the same write as the first SYN. Returns the attempts made."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while time.monotonic() < deadline:
        pos = os.urandom(1)[0] % 255
        attempts += 1
        sock.sendall((garbage if attempts == 1 else b"") + bytes((SYN, pos)))
        sock.settimeout(1.0)
        try:
            got = b""
            while len(got) < 3:
                chunk = sock.recv(32768)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                got += chunk
            flag, echo, token = got[-3], got[-2], got[-1]
            if flag != ACK or echo != (pos + 1) & 0xFF:
                continue
            sock.sendall(bytes((ACK, (token + 1) & 0xFF)))
            last = sock.recv(1)          # exactly one: SSH follows
            if last == bytes((ACK,)):
                sock.settimeout(None)
                return attempts
        except socket.timeout:
            continue
    raise TimeoutError("no handshake")


def handshake_v09(sock: socket.socket, timeout: float = 20.0) -> None:
    """The v0.9 port layer's client: (b+1)|0x80 tokens, no final ACK."""
    inc = lambda b: ((b + 1) | 0x80) & 0xFF   # noqa: E731
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pos = inc(os.urandom(1)[0])
        sock.sendall(bytes((SYN, pos)))
        sock.settimeout(1.0)
        try:
            got = b""
            while len(got) < 3:
                chunk = sock.recv(3 - len(got))
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                got += chunk
            if got[0] != ACK or got[1] != inc(pos):
                continue
            sock.sendall(bytes((ACK, inc(got[2]))))
            sock.settimeout(None)
            return 1
        except socket.timeout:
            continue
    raise TimeoutError("no handshake")


class VicClient:
    """One SSH connection over an already synchronised stream."""

    attempts = 0     # handshake attempts it took (set by connect)

    def __init__(self, sock: socket.socket, user: str = "daemon", pkey=None):
        # a 512-bit RSA key (the port layer's) cannot make rsa-sha2-512 signatures
        small = pkey is not None and pkey.get_bits() < 768
        self.transport = t = paramiko.Transport(
            sock, disabled_algorithms={"pubkeys": ["rsa-sha2-512"]} if small else None)
        self.open_failures: dict[int, tuple[int, str]] = {}
        self.global_failure: bytes | None = None
        self._replies: dict[int, queue.Queue] = {}
        # per-instance handler additions: refusal texts and channel request replies
        original_open_failure = t._handler_table[MSG_CHANNEL_OPEN_FAILURE]

        def open_failure(m):
            chanid, code, text = m.get_int(), m.get_int(), m.get_text()
            self.open_failures[chanid] = (code, text)
            m.rewind()
            original_open_failure(m)

        original_global_failure = t._handler_table[MSG_REQUEST_FAILURE]

        def global_failure(m):
            self.global_failure = m.get_remainder()
            original_global_failure(m)

        t._handler_table[MSG_CHANNEL_OPEN_FAILURE] = open_failure
        t._handler_table[MSG_REQUEST_FAILURE] = global_failure
        t._channel_handler_table = dict(type(t)._channel_handler_table)
        t._channel_handler_table[MSG_CHANNEL_SUCCESS] = lambda chan, m: self._reply(chan, True)
        t._channel_handler_table[MSG_CHANNEL_FAILURE] = lambda chan, m: self._reply(chan, False)
        t.start_client(timeout=30)
        if pkey is not None:
            t.auth_publickey(user, pkey)
        else:
            t.auth_none(user)

    def _reply(self, chan, ok: bool) -> None:
        self._replies.setdefault(chan.get_id(), queue.Queue()).put(ok)

    def close(self) -> None:
        self.transport.close()

    # -- global requests
    def global_request(self, kind: str, timeout: float = 10.0):
        """(ok, payload)."""
        self.global_failure = None
        m = self.transport.global_request(kind, wait=True)
        if m is None:
            return False, self.global_failure
        return True, m.get_remainder()

    def container_ids(self) -> list[str]:
        ok, payload = self.global_request("container-ids")
        assert ok, payload
        (size,) = struct.unpack(">I", payload[:4])
        text = payload[4:4 + size].decode()
        return text.split(",") if text else []

    def version(self) -> int:
        ok, payload = self.global_request("version")
        assert ok, payload
        return struct.unpack(">I", payload[:4])[0]

    # -- channels
    def attach(self, session_id: str, timeout: float = 20.0) -> Channel:
        t = self.transport
        with t.lock:
            chanid = t._next_channel()
            chan = Channel(chanid)
            t._channels.put(chanid, chan)
            event = threading.Event()
            t.channel_events[chanid] = event
            chan._set_transport(t)
            chan._set_window(t.default_window_size, t.default_max_packet_size)
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("attach")
        m.add_int(chanid)
        m.add_int(t.default_window_size)
        m.add_int(t.default_max_packet_size)
        m.add_bytes(session_id.encode())      # raw extra data, as Go's OpenChannel sends it
        t._send_user_message(m)
        deadline = time.monotonic() + timeout
        while not event.wait(0.1):
            if not t.active or time.monotonic() > deadline:
                raise ConnectionError("no answer to the channel open")
        if chanid in self.open_failures:
            raise Refused(*self.open_failures[chanid])
        return t._channels.get(chanid)

    def request(self, chan: Channel, name: str, payload: bytes = b"",
                timeout: float = 10.0) -> bool:
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string(name)
        m.add_boolean(True)
        m.add_bytes(payload)
        replies = self._replies.setdefault(chan.get_id(), queue.Queue())
        self.transport._send_user_message(m)
        return replies.get(timeout=timeout)

    def resize(self, chan: Channel, cols: int, rows: int) -> bool:
        return self.request(chan, "window-change", struct.pack(">IIII", cols, rows, 0, 0))


def read_until(chan: Channel, predicate, timeout: float = 20.0, stderr: bool = False) -> bytes:
    """Read stdout (or stderr) until predicate(data) holds."""
    data = b""
    deadline = time.monotonic() + timeout
    chan.settimeout(0.2)
    while not predicate(data):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; got {data!r}")
        try:
            chunk = chan.recv_stderr(65536) if stderr else chan.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            if predicate(data):
                break
            raise AssertionError(f"stream ended; got {data!r}")
        data += chunk
    return data


def echoed(chan: Channel, line: bytes, timeout: float = 20.0) -> None:
    """Send `line` on a channel of a `cat` session and read exactly it back."""
    chan.sendall(line)
    read_until(chan, lambda d: d == line, timeout)


def read_all(chan: Channel, timeout: float = 20.0) -> bytes:
    """stdout until EOF."""
    data = b""
    deadline = time.monotonic() + timeout
    chan.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = chan.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"no EOF; got {data!r}")


def connect(path: str, garbage: bytes = b"", variant: str = "head", **kw) -> VicClient:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    attempts = handshake_head(sock, garbage) if variant == "head" else handshake_v09(sock)
    client = VicClient(sock, **kw)
    client.attempts = attempts
    return client
