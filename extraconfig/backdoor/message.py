"""The backdoor message layer: one channel, whole messages each way.

A channel is opened for a protocol (RPCI or TCLO). Sending is SENDSIZE then the payload,
receiving is RECVSIZE, the payload, then RECVSTATUS to acknowledge. The payload goes
through the high-bandwidth port in one call when the host offers it (STATUS_HB), else
4 bytes per call on the low-bandwidth port. A checkpoint (STATUS_CPT) aborts the
operation on the host side, so it is restarted from its first step, a bounded number of
times. Everything here is plain Python over a `Ports` object, so the same code runs on
the CPU's ports and against the simulated hypervisor.
"""

from __future__ import annotations

import struct

from .protocol import (
    CMD_MESSAGE, FLAG_COOKIE, HB_CMD_MESSAGE, HB_PORT, MAGIC, MSG_CLOSE, MSG_OPEN,
    MSG_RECVPAYLOAD, MSG_RECVSIZE, MSG_RECVSTATUS, MSG_SENDPAYLOAD, MSG_SENDSIZE, PORT,
    STATUS_CPT, STATUS_DORECV, STATUS_HB, STATUS_SUCCESS, Ports, Regs, high, pack,
)

# Checkpoints are rare (suspend, vMotion); a few in a row means something else is wrong.
MAX_CHECKPOINT_RETRIES = 8
# The VMX refuses larger messages; a size above this from the host is a protocol error.
MAX_MESSAGE = 64 * 1024 * 1024


class BackdoorError(Exception):
    """The channel failed; the text says which step and what the host answered."""


class MessageChannel:
    """One open backdoor message channel. Not thread-safe: one user at a time."""

    def __init__(self, ports: Ports, proto: int, *, use_high_bandwidth: bool = True):
        self.ports = ports
        self.proto = proto
        self.use_high_bandwidth = use_high_bandwidth
        self.id = 0
        self.cookie_high = 0
        self.cookie_low = 0
        self.open = False
        self.used_high_bandwidth = False   # whether the last payload went through HB_PORT
        self._open()

    # -- one backdoor call -----------------------------------------------------------
    def _call(self, subcommand: int, arg: int = 0) -> Regs:
        regs = Regs(
            eax=MAGIC, ebx=arg & 0xFFFFFFFF, ecx=pack(subcommand, CMD_MESSAGE),
            edx=pack(self.id, PORT), esi=self.cookie_high, edi=self.cookie_low)
        return self.ports.backdoor(regs)

    def _open(self) -> None:
        for flags in (FLAG_COOKIE, 0):
            out = self.ports.backdoor(Regs(
                eax=MAGIC, ebx=self.proto | flags, ecx=pack(MSG_OPEN, CMD_MESSAGE),
                edx=PORT))
            if high(out.ecx) & STATUS_SUCCESS:
                self.id = high(out.edx)
                self.cookie_high, self.cookie_low = out.esi, out.edi
                self.open = True
                return
        raise BackdoorError(
            f"the host refused to open the {_proto_name(self.proto)} channel "
            f"(status {high(out.ecx):#06x}): it does not implement backdoor messages")

    def close(self) -> None:
        if self.open:
            self.open = False
            self._call(MSG_CLOSE)

    def __enter__(self) -> "MessageChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> None:
        if not self.open:
            raise BackdoorError(f"{_proto_name(self.proto)} channel is closed")

    # -- sending -----------------------------------------------------------------------
    def send(self, message: bytes) -> None:
        self._require_open()
        for _ in range(MAX_CHECKPOINT_RETRIES):
            if self._send_once(message):
                return
        raise BackdoorError(f"send interrupted by {MAX_CHECKPOINT_RETRIES} checkpoints in a row")

    def _send_once(self, message: bytes) -> bool:
        """True when sent; False when a checkpoint asks for a restart; raises on failure."""
        out = self._call(MSG_SENDSIZE, len(message))
        status = high(out.ecx)
        if not status & STATUS_SUCCESS:
            raise self._failed("send size", status)
        self.used_high_bandwidth = False
        if not message:
            return True
        if status & STATUS_HB and self.use_high_bandwidth:
            regs = Regs(eax=MAGIC, ebx=pack(STATUS_SUCCESS, HB_CMD_MESSAGE),
                        edx=pack(self.id, HB_PORT), edi=self.cookie_low, ebp=self.cookie_high)
            status = high(self.ports.hb_out(regs, message).ebx)
            if not status & STATUS_SUCCESS:
                if status & STATUS_CPT:
                    return False
                raise self._failed("send payload (high bandwidth)", status)
            self.used_high_bandwidth = True
            return True
        padded = message + b"\0" * (-len(message) % 4)
        for (word,) in struct.iter_unpack("<I", padded):
            status = high(self._call(MSG_SENDPAYLOAD, word).ecx)
            if not status & STATUS_SUCCESS:
                if status & STATUS_CPT:
                    return False
                raise self._failed("send payload", status)
        return True

    # -- receiving ---------------------------------------------------------------------
    def receive(self) -> bytes | None:
        """The host's pending message, or None when it has nothing for us."""
        self._require_open()
        for _ in range(MAX_CHECKPOINT_RETRIES):
            result = self._receive_once()
            if result is not _RETRY:
                return result
        raise BackdoorError(f"receive interrupted by {MAX_CHECKPOINT_RETRIES} checkpoints in a row")

    def _receive_once(self):
        out = self._call(MSG_RECVSIZE)
        status = high(out.ecx)
        if not status & STATUS_SUCCESS:
            raise self._failed("receive size", status)
        if not status & STATUS_DORECV:
            return None
        if high(out.edx) != MSG_SENDSIZE:
            raise BackdoorError(
                f"protocol error on {_proto_name(self.proto)} channel {self.id}: "
                f"expected a size from the host, got message type {high(out.edx)}")
        size = out.ebx
        if size > MAX_MESSAGE:
            self._call(MSG_RECVSTATUS, 0)   # tell the host to drop it
            raise BackdoorError(f"the host offered a {size}-byte message; refusing it")
        self.used_high_bandwidth = False
        if size and status & STATUS_HB and self.use_high_bandwidth:
            regs = Regs(eax=MAGIC, ebx=pack(STATUS_SUCCESS, HB_CMD_MESSAGE),
                        edx=pack(self.id, HB_PORT), esi=self.cookie_high, ebp=self.cookie_low)
            regs, payload = self.ports.hb_in(regs, size)
            hb_status = high(regs.ebx)
            if not hb_status & STATUS_SUCCESS:
                if hb_status & STATUS_CPT:
                    return _RETRY
                self._call(MSG_RECVPAYLOAD, 0)
                raise self._failed("receive payload (high bandwidth)", hb_status)
            self.used_high_bandwidth = True
        else:
            words = []
            for _ in range((size + 3) // 4):
                out = self._call(MSG_RECVPAYLOAD, STATUS_SUCCESS)
                step_status = high(out.ecx)
                if not step_status & STATUS_SUCCESS:
                    if step_status & STATUS_CPT:
                        return _RETRY
                    raise self._failed("receive payload", step_status)
                if high(out.edx) != MSG_SENDPAYLOAD:
                    self._call(MSG_RECVPAYLOAD, 0)
                    raise BackdoorError(
                        f"protocol error on {_proto_name(self.proto)} channel {self.id}: "
                        f"expected payload from the host, got message type {high(out.edx)}")
                words.append(struct.pack("<I", out.ebx))
            payload = b"".join(words)[:size]
        status = high(self._call(MSG_RECVSTATUS, STATUS_SUCCESS).ecx)
        if not status & STATUS_SUCCESS:
            if status & STATUS_CPT:
                return _RETRY
            raise self._failed("receive status", status)
        return payload

    def _failed(self, step: str, status: int) -> BackdoorError:
        return BackdoorError(
            f"{_proto_name(self.proto)} channel {self.id}: {step} failed "
            f"(host status {status:#06x})")


_RETRY = object()


def _proto_name(proto: int) -> str:
    return {0x49435052: "RPCI", 0x4F4C4354: "TCLO"}.get(proto, f"{proto:#x}")
