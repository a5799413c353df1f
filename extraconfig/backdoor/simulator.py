"""A simulated VMware hypervisor: the host side of the backdoor, in process.

`SimulatedHypervisor` is a `Ports` object: it answers the register-level calls the CPU
would send to the VMX on ports 0x5658/0x5659 — GETVERSION, and the message protocol
(open, send size/payload, receive size/payload/status, close; cookies; high-bandwidth
transfers; checkpoint interruptions) — and runs the RPCI and TCLO services behind it:

* RPCI: `info-get`/`info-set` on a guestinfo map, `tools.capability.*`,
  `tools.set.version`, `tools.os.statechange.status`, `log`; replies "1 ..." / "0 ...".
* TCLO: a queue of host commands (`post_tclo`), handed to the guest when it polls; the
  guest's next message on the channel is the reply, recorded in `tclo_replies`.

`inject(step, status)` makes the next call of a step fail with that status, for error and
retry tests. `rpci=False` models QEMU's vmport: GETVERSION answers, messages do not.
`serve_unix(path)` offers the same calls to another process over a unix socket (see
`bridge.py`), so an agent under `tether sandbox` can be driven by a test.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import struct
import threading

from . import bridge
from .protocol import (
    CMD_GETVERSION, CMD_MESSAGE, HB_CMD_MESSAGE, HB_PORT, MAGIC, MASK32, MSG_CLOSE, MSG_OPEN,
    MSG_RECVPAYLOAD, MSG_RECVSIZE, MSG_RECVSTATUS, MSG_SENDPAYLOAD, MSG_SENDSIZE, PORT,
    PROTO_RPCI, PROTO_TCLO, FLAG_COOKIE, STATUS_DORECV, STATUS_HB, STATUS_SUCCESS,
    Regs, high, low, pack,
)

MAX_CHANNELS = 8
VERSION = 6               # what GETVERSION puts in eax (QEMU and ESXi both answer 6)
STEPS = ("open", "sendsize", "sendpayload", "recvsize", "recvpayload", "recvstatus",
         "close", "hb_out", "hb_in")
_STEP_OF = {MSG_OPEN: "open", MSG_SENDSIZE: "sendsize", MSG_SENDPAYLOAD: "sendpayload",
            MSG_RECVSIZE: "recvsize", MSG_RECVPAYLOAD: "recvpayload",
            MSG_RECVSTATUS: "recvstatus", MSG_CLOSE: "close"}


class _Channel:
    def __init__(self, proto: int, cookie: tuple[int, int] | None):
        self.proto = proto
        self.cookie = cookie              # (high, low), or None when opened without
        self.incoming = bytearray()       # message the guest is sending
        self.incoming_size: int | None = None
        self.outgoing: bytes | None = None   # message waiting for the guest
        self.outgoing_pos = 0
        self.tclo_pending: str | None = None  # TCLO command whose reply is due next


class SimulatedHypervisor:
    """The VMX's side of the backdoor. Thread-safe; every call is one atomic step."""

    def __init__(self, guestinfo: dict[str, str] | None = None, *, rpci: bool = True,
                 high_bandwidth: bool = True, cookies: bool = True):
        self.guestinfo: dict[str, str] = dict(guestinfo or {})
        self.rpci = rpci
        self.high_bandwidth = high_bandwidth
        self.cookies = cookies
        self.channels: dict[int, _Channel] = {}
        self.rpci_log: list[str] = []                 # every RPCI request, in order
        self.capabilities: list[str] = []
        self.statechanges: list[str] = []             # "tools.os.statechange.status" args
        self.tools_version: str | None = None
        self.tclo_replies: list[tuple[str, str]] = []  # (command, reply)
        self.counts = collections.Counter()            # calls per step, hb use included
        self._tclo_queue: collections.deque[str] = collections.deque()
        self._faults: dict[str, list[int]] = collections.defaultdict(list)
        self._lock = threading.Condition()
        self._random = random.Random()

    # -- test controls ---------------------------------------------------------------
    def inject(self, step: str, status: int = 0, times: int = 1) -> None:
        """Make the next `times` calls of `step` fail, answering `status`."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; one of {STEPS}")
        with self._lock:
            self._faults[step].extend([status] * times)

    def post_tclo(self, command: str) -> None:
        """Queue a host command (e.g. "ping", "OS_Halt") for the guest's next poll."""
        with self._lock:
            self._tclo_queue.append(command)

    def wait_tclo_reply(self, command: str, timeout: float) -> str | None:
        """The guest's reply to the first unanswered-by-this-call `command`, or None."""
        with self._lock:
            def found():
                return next((r for c, r in self.tclo_replies if c == command), None)
            self._lock.wait_for(lambda: found() is not None, timeout)
            reply = found()
            if reply is not None:
                self.tclo_replies.remove((command, reply))
            return reply

    def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until `predicate(self)` holds (checked after every guest call)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    # -- the Ports interface -------------------------------------------------------------
    def backdoor(self, regs: Regs) -> Regs:
        with self._lock:
            try:
                return self._backdoor(regs)
            finally:
                self._lock.notify_all()

    def hb_out(self, regs: Regs, data: bytes) -> Regs:
        with self._lock:
            try:
                return self._hb_out(regs, bytes(data))
            finally:
                self._lock.notify_all()

    def hb_in(self, regs: Regs, size: int) -> tuple[Regs, bytes]:
        with self._lock:
            try:
                return self._hb_in(regs, size)
            finally:
                self._lock.notify_all()

    # -- low-bandwidth port --------------------------------------------------------------
    def _backdoor(self, r: Regs) -> Regs:
        if r.eax != MAGIC or low(r.edx) != PORT:
            return r._replace(eax=MASK32)   # not a backdoor call: like an unclaimed port
        command = low(r.ecx)
        if command == CMD_GETVERSION:
            self.counts["getversion"] += 1
            return r._replace(eax=VERSION, ebx=MAGIC, ecx=2)
        if command != CMD_MESSAGE or not self.rpci:
            # QEMU's vmport: unknown commands leave eax all ones, ecx without success.
            return r._replace(eax=MASK32)
        subcommand = high(r.ecx)
        step = _STEP_OF.get(subcommand)
        if step is None:
            return self._status(r, 0)
        self.counts[step] += 1
        fault = self._take_fault(step)
        if subcommand == MSG_OPEN:
            return self._open(r, fault)
        channel = self._channel_for(r.edx, (r.esi, r.edi))
        if channel is None:
            return self._status(r, 0)
        if fault is not None:
            self._fail(channel, step, fault)
            return self._status(r, fault)
        if subcommand == MSG_SENDSIZE:
            return self._sendsize(r, channel)
        if subcommand == MSG_SENDPAYLOAD:
            return self._sendpayload(r, channel)
        if subcommand == MSG_RECVSIZE:
            return self._recvsize(r, channel)
        if subcommand == MSG_RECVPAYLOAD:
            return self._recvpayload(r, channel)
        if subcommand == MSG_RECVSTATUS:
            return self._recvstatus(r, channel)
        del self.channels[high(r.edx)]   # MSG_CLOSE
        return self._status(r, STATUS_SUCCESS)

    def _open(self, r: Regs, fault: int | None) -> Regs:
        if fault is not None:
            return self._status(r, fault)
        wants_cookie = bool(r.ebx & FLAG_COOKIE)
        proto = r.ebx & ~FLAG_COOKIE & MASK32
        if proto not in (PROTO_RPCI, PROTO_TCLO) or (wants_cookie and not self.cookies):
            return self._status(r, 0)
        free = [i for i in range(MAX_CHANNELS) if i not in self.channels]
        if not free:
            return self._status(r, 0)
        cookie = None
        if wants_cookie:
            cookie = (self._random.getrandbits(32), self._random.getrandbits(32))
        self.channels[free[0]] = _Channel(proto, cookie)
        out = self._status(r, STATUS_SUCCESS)._replace(edx=pack(free[0], low(r.edx)))
        if cookie:
            out = out._replace(esi=cookie[0], edi=cookie[1])
        return out

    def _sendsize(self, r: Regs, ch: _Channel) -> Regs:
        if ch.proto == PROTO_RPCI and ch.outgoing is not None:
            return self._status(r, 0)   # a reply is still unread: the guest is out of step
        ch.incoming = bytearray()
        ch.incoming_size = r.ebx
        if r.ebx == 0:
            self._deliver(ch, b"")
        return self._status(r, STATUS_SUCCESS | (STATUS_HB if self.high_bandwidth else 0))

    def _sendpayload(self, r: Regs, ch: _Channel) -> Regs:
        if ch.incoming_size is None:
            return self._status(r, 0)
        ch.incoming += struct.pack("<I", r.ebx)
        if len(ch.incoming) >= ch.incoming_size:
            self._deliver(ch, bytes(ch.incoming[:ch.incoming_size]))
        return self._status(r, STATUS_SUCCESS)

    def _recvsize(self, r: Regs, ch: _Channel) -> Regs:
        if ch.outgoing is None and ch.proto == PROTO_TCLO and ch.tclo_pending is None \
                and self._tclo_queue:
            command = self._tclo_queue.popleft()
            ch.tclo_pending = command
            ch.outgoing = command.encode("utf-8", "surrogateescape")
        if ch.outgoing is None:
            return self._status(r, STATUS_SUCCESS)
        ch.outgoing_pos = 0
        status = STATUS_SUCCESS | STATUS_DORECV | (STATUS_HB if self.high_bandwidth else 0)
        return self._status(r, status)._replace(
            ebx=len(ch.outgoing), edx=pack(MSG_SENDSIZE, low(r.edx)))

    def _recvpayload(self, r: Regs, ch: _Channel) -> Regs:
        if ch.outgoing is None or r.ebx != STATUS_SUCCESS:
            return self._status(r, 0)
        chunk = ch.outgoing[ch.outgoing_pos:ch.outgoing_pos + 4].ljust(4, b"\0")
        ch.outgoing_pos += 4
        return self._status(r, STATUS_SUCCESS)._replace(
            ebx=struct.unpack("<I", chunk)[0], edx=pack(MSG_SENDPAYLOAD, low(r.edx)))

    def _recvstatus(self, r: Regs, ch: _Channel) -> Regs:
        if ch.outgoing is None:
            return self._status(r, 0)
        if r.ebx == STATUS_SUCCESS:
            ch.outgoing = None   # delivered
        return self._status(r, STATUS_SUCCESS)

    # -- high-bandwidth port -------------------------------------------------------------
    def _hb_check(self, r: Regs, step: str) -> tuple[_Channel | None, int | None]:
        if r.eax != MAGIC or low(r.edx) != HB_PORT or low(r.ebx) != HB_CMD_MESSAGE \
                or not self.rpci or not self.high_bandwidth:
            return None, None
        self.counts[step] += 1
        cookie = (r.ebp, r.edi) if step == "hb_out" else (r.esi, r.ebp)
        return self._channel_for(r.edx, cookie), self._take_fault(step)

    def _hb_out(self, r: Regs, data: bytes) -> Regs:
        ch, fault = self._hb_check(r, "hb_out")
        if ch is None or ch.incoming_size is None or len(data) != ch.incoming_size:
            return r._replace(ebx=pack(0, low(r.ebx)))
        if fault is not None:
            self._fail(ch, "hb_out", fault)
            return r._replace(ebx=pack(fault, low(r.ebx)))
        self._deliver(ch, data)
        return r._replace(ebx=pack(STATUS_SUCCESS, low(r.ebx)))

    def _hb_in(self, r: Regs, size: int) -> tuple[Regs, bytes]:
        ch, fault = self._hb_check(r, "hb_in")
        if ch is None or ch.outgoing is None or size != len(ch.outgoing):
            return r._replace(ebx=pack(0, low(r.ebx))), bytes(size)
        if fault is not None:
            self._fail(ch, "hb_in", fault)
            return r._replace(ebx=pack(fault, low(r.ebx))), bytes(size)
        return r._replace(ebx=pack(STATUS_SUCCESS, low(r.ebx))), ch.outgoing

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _status(r: Regs, status: int) -> Regs:
        return r._replace(ecx=pack(status, low(r.ecx)))

    def _take_fault(self, step: str) -> int | None:
        faults = self._faults.get(step)
        return faults.pop(0) if faults else None

    def _fail(self, ch: _Channel, step: str, status: int) -> None:
        # A checkpoint (or error) aborts a send in progress; a reply stays queued.
        if step in ("sendsize", "sendpayload", "hb_out"):
            ch.incoming = bytearray()
            ch.incoming_size = None

    def _channel_for(self, edx: int, cookie: tuple[int, int]) -> _Channel | None:
        ch = self.channels.get(high(edx))
        if ch is None or (ch.cookie is not None and ch.cookie != cookie):
            return None
        return ch

    def _deliver(self, ch: _Channel, message: bytes) -> None:
        """A whole message arrived from the guest."""
        ch.incoming = bytearray()
        ch.incoming_size = None
        text = message.decode("utf-8", "surrogateescape")
        if ch.proto == PROTO_RPCI:
            ch.outgoing = self._rpci(text).encode("utf-8", "surrogateescape")
        elif ch.tclo_pending is not None:
            self.tclo_replies.append((ch.tclo_pending, text))
            ch.tclo_pending = None

    def _rpci(self, text: str) -> str:
        self.rpci_log.append(text)
        verb, _, rest = text.partition(" ")
        if verb == "info-get":
            value = self.guestinfo.get(rest)
            return "0 No value found" if value is None else "1 " + value
        if verb == "info-set":
            key, _, value = rest.partition(" ")
            if not key.startswith("guestinfo."):
                return "0 Permission denied"
            self.guestinfo[key] = value
            return "1 "
        if verb.startswith("tools.capability."):
            self.capabilities.append(text)
            return "1 "
        if verb == "tools.set.version":
            self.tools_version = rest
            return "1 "
        if verb == "tools.os.statechange.status":
            self.statechanges.append(rest)
            return "1 "
        if verb == "log":
            return "1 "
        return "0 Unknown command"

    # -- serving another process -----------------------------------------------------------
    def serve_unix(self, path: str) -> "BridgeServer":
        return BridgeServer(self, path)


class BridgeServer:
    """Serves a SimulatedHypervisor's port calls on a unix socket, one thread per client."""

    def __init__(self, hypervisor: SimulatedHypervisor, path: str):
        self.hypervisor = hypervisor
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(8)
        self._clients: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="backdoor-sim", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = bridge.read_request(conn)
                    if request is None:
                        return
                    op, regs, arg = request
                    if op == bridge.OP_BACKDOOR:
                        reply = bridge.encode_reply(self.hypervisor.backdoor(regs), b"")
                    elif op == bridge.OP_HB_OUT:
                        reply = bridge.encode_reply(self.hypervisor.hb_out(regs, arg), b"")
                    else:
                        out, data = self.hypervisor.hb_in(regs, arg)
                        reply = bridge.encode_reply(out, data)
                    conn.sendall(reply)
                except (OSError, bridge.BridgeError):
                    return

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in self._clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "BridgeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
