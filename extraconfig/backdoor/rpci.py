"""Guestinfo over RPCI: `info-get KEY` / `info-set KEY VALUE` requests.

Two transports with the same `info_get`/`info_set` interface as the others in
`extraconfig`: `RpciTransport` speaks the backdoor message protocol itself (through any
`Ports`, real or simulated); `RpcToolTransport` runs open-vm-tools' `vmware-rpctool`.
A reply starts with "1 " (success, the rest is the value) or "0 " (failure, the rest is
the reason: for info-get a missing key).
"""

from __future__ import annotations

from _thread import allocate_lock   # threading's Lock, without threading (boot)

from .message import BackdoorError, MessageChannel
from .protocol import PROTO_RPCI, Ports

ENCODING = "utf-8"
ERRORS = "surrogateescape"   # values are bytes to the VMX; keep any byte round-trippable


class RpcReply:
    __slots__ = ("ok", "text")

    def __init__(self, ok: bool, text: str):
        self.ok = ok
        self.text = text

    def __repr__(self) -> str:
        return f"RpcReply(ok={self.ok}, text={self.text!r})"


def parse_reply(raw: bytes) -> RpcReply:
    text = raw.decode(ENCODING, ERRORS)
    if text.startswith("1"):
        return RpcReply(True, text[2:])
    return RpcReply(False, text[2:] if text[:1] == "0" else text)


class RpciTransport:
    """Guestinfo through an RPCI channel, kept open between requests.

    A request that fails on the channel is retried once on a fresh channel (the host
    drops channels on vMotion or checkpoint); a second failure raises BackdoorError.
    Thread-safe: requests are serialised.
    """

    name = "vmware-backdoor"

    def __init__(self, ports: Ports, *, use_high_bandwidth: bool = True):
        self.ports = ports
        self.use_high_bandwidth = use_high_bandwidth
        self._channel: MessageChannel | None = None
        self._lock = allocate_lock()

    def channel_factory(self, proto: int) -> MessageChannel:
        """A new channel on the same ports (the toolbox opens its own TCLO and RPCI)."""
        return MessageChannel(self.ports, proto, use_high_bandwidth=self.use_high_bandwidth)

    def request(self, command: str | bytes) -> RpcReply:
        raw = command.encode(ENCODING, ERRORS) if isinstance(command, str) else command
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._channel is None:
                        self._channel = self.channel_factory(PROTO_RPCI)
                    self._channel.send(raw)
                    reply = self._channel.receive()
                    if reply is None:
                        raise BackdoorError("the host sent no reply to an RPCI request")
                    return parse_reply(reply)
                except BackdoorError:
                    self._drop_channel()
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except BackdoorError:
                pass   # the host already forgot it

    def info_get(self, key: str) -> str | None:
        reply = self.request(f"info-get {key}")
        return reply.text if reply.ok else None

    def info_set(self, key: str, value: str) -> None:
        # Like the reference, the reply status is not an error: only transport errors are.
        self.request(f"info-set {key} {value}")

    def close(self) -> None:
        with self._lock:
            self._drop_channel()


class RpcToolTransport:
    """Guestinfo through open-vm-tools' `vmware-rpctool` (one process per request)."""

    name = "vmware-rpctool"

    def __init__(self, path: str, *, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    def request(self, command: str) -> RpcReply:
        import subprocess   # here, not at import: PID 1 imports this module on every boot
        try:
            done = subprocess.run([self.path, command], capture_output=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise BackdoorError(f"{self.path} failed to run: {err}") from err
        out = done.stdout.decode(ENCODING, ERRORS)
        if out.endswith("\n"):
            out = out[:-1]   # the tool ends its output with a newline of its own
        if done.returncode == 0:
            return RpcReply(True, out)
        return RpcReply(False, done.stderr.decode(ENCODING, ERRORS).strip() or out)

    def info_get(self, key: str) -> str | None:
        reply = self.request(f"info-get {key}")
        if reply.ok:
            return reply.text
        if "No value found" in reply.text:
            return None
        raise BackdoorError(f"{self.path} info-get {key}: {reply.text or 'failed'}")

    def info_set(self, key: str, value: str) -> None:
        reply = self.request(f"info-set {key} {value}")
        if not reply.ok:
            raise BackdoorError(f"{self.path} info-set {key}: {reply.text or 'failed'}")

    def close(self) -> None:
        pass
