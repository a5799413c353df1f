"""The TCLO duties on vSphere: the small part of VMware Tools a container VM needs.

The VMX talks to the guest over a TCLO backdoor channel, which the guest polls: it sends
its reply to the previous command (empty at first), then asks for the next command. We
poll at once while commands keep coming and back off to 100 ms when idle (10, 20, 40,
80, 100 ms), like the reference. Commands handled:

* `reset` -> "OK ATR toolbox"; `ping` -> "OK ";
* `Capabilities_Register`: announce the statechange capability and an unmanaged tools
  version (0x7fffffff) over RPCI;
* `Set_Option broadcastIP 1`: `info-set guestinfo.ip <first non-loopback IPv4>`;
* power ops: `OS_Halt` stops the primary session with its StopSignal, SIGKILLs it after
  10 s, then stops the agent (which powers off); `OS_Reboot` is refused (a container VM
  has no reboot: the reference answered failure too); `OS_PowerOn`, `OS_Resume`,
  `OS_Suspend` have nothing to do and succeed. Each answers "OK " at once and reports
  `tools.os.statechange.status <1|0> <state>` over RPCI when done.

Everything runs on the toolbox's own threads and acts on the agent only by posting to
its loop (`host.loop.call_soon_threadsafe`); the host is the narrow interface of
tether/host.py, not the whole agent.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import threading
import time

from tether.console import RateLimit, clip
from tether.log import INFO, get_logger

log = get_logger("tether.toolbox")

PROTO_RPCI = 0x49435052
PROTO_TCLO = 0x4F4C4354
TOOLS_VERSION_UNMANAGED = 0x7FFFFFFF
HALT_GRACE = 10.0
KILL_WAIT = 5.0
HALT_SLACK = 5.0      # beyond grace + kill wait, how long OS_Halt waits for the loop at all
POLL_MIN = 0.01
POLL_MAX = 0.1
REOPEN_DELAY = 1.0
# tools.os.statechange.status states (open-vm-tools GUESTOS_STATECHANGE_*)
STATE_HALT, STATE_REBOOT, STATE_POWERON, STATE_RESUME, STATE_SUSPEND = 1, 2, 3, 4, 5
POWER_OPS = {"OS_Halt": STATE_HALT, "OS_Reboot": STATE_REBOOT, "OS_PowerOn": STATE_POWERON,
             "OS_Resume": STATE_RESUME, "OS_Suspend": STATE_SUSPEND}
SIOCGIFADDR = 0x8915
POWER_OP_BUSY = "State change already in progress"   # open-vm-tools' answer


class PowerOpBusy(Exception):
    """A power op came while another is being carried out."""


def start_toolbox(host, channel_factory, **options) -> "Toolbox":
    """Start answering TCLO for `host`. `channel_factory(proto)` opens a message channel."""
    toolbox = Toolbox(host, channel_factory, **options)
    toolbox.start()
    return toolbox


def start_toolbox_for(host, transport, **options) -> "Toolbox | None":
    """The toolbox when `transport` reaches the VMX's backdoor; None for other transports."""
    factory = getattr(transport, "channel_factory", None)
    if factory is None:
        return None
    return start_toolbox(host, factory, **options)


def first_ipv4() -> str | None:
    """The first non-loopback IPv4 address of an interface that has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue   # no IPv4 address on this interface
            address = socket.inet_ntoa(answer[20:24])
            if not address.startswith("127."):
                return address
    return None


class Toolbox:
    def __init__(self, host, channel_factory, *, halt_grace: float = HALT_GRACE,
                 kill_wait: float = KILL_WAIT, poll_max: float = POLL_MAX,
                 name: str = "toolbox"):
        self.host = host
        self.channel_factory = channel_factory
        self.halt_grace = halt_grace
        self.kill_wait = kill_wait
        self.poll_max = poll_max
        self.name = name
        self._stop = threading.Event()
        self._tclo = None
        self._thread = threading.Thread(target=self._run, name="toolbox-tclo", daemon=True)
        self._workers: list[threading.Thread] = []
        self._rpc_lock = threading.Lock()
        # lines the host's requests and answers cause: as many as the host sends
        self._host_log = RateLimit(burst=10, interval=10.0)
        self.handlers = {
            "reset": self._reset,
            "ping": self._ping,
            "Capabilities_Register": self._capabilities_register,
            "Set_Option": self._set_option,
        }
        for op in POWER_OPS:
            self.handlers[op] = self._power_op

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        log.info("toolbox: answering the VMX's TCLO channel")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; a power op in progress may finish reporting its status first."""
        deadline = time.monotonic() + timeout
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # -- the TCLO poll loop --------------------------------------------------------------------
    def _run(self) -> None:
        from extraconfig.backdoor.message import BackdoorError
        reply = b""
        delay = 0.0
        while not self._stop.is_set():
            try:
                if self._tclo is None:
                    self._tclo = self.channel_factory(PROTO_TCLO)
                    reply = b""
                self._tclo.send(reply)
                reply = b""
                request = self._tclo.receive()
            except BackdoorError as err:
                log.warning("toolbox: TCLO channel failed (%s); reopening in %.0fs",
                            err, REOPEN_DELAY)
                self._close_tclo()
                self._stop.wait(REOPEN_DELAY)
                continue
            except Exception:   # noqa: BLE001 - the toolbox must not take the agent down
                log.exception("toolbox: unexpected error polling TCLO; reopening")
                self._close_tclo()
                self._stop.wait(REOPEN_DELAY)
                continue
            if request:
                reply = self.dispatch(request).encode("utf-8", "replace")
                delay = 0.0
                continue
            delay = min(max(delay * 2, POLL_MIN), self.poll_max)
            self._stop.wait(delay)
        self._close_tclo()

    def _close_tclo(self) -> None:
        channel, self._tclo = self._tclo, None
        if channel is not None:
            try:
                channel.close()
            except Exception:   # noqa: BLE001 - the host may have dropped it already
                pass

    def dispatch(self, request: bytes) -> str:
        """The TCLO reply ("OK ..." or "ERROR ...") to one host command."""
        text = request.rstrip(b"\0").decode("utf-8", "replace")
        command, _, args = text.partition(" ")
        handler = self.handlers.get(command)
        if handler is None:
            self._host_log.log(log, INFO, "toolbox: unknown TCLO command %s", clip(command))
            return "ERROR Unknown Command"
        try:
            return "OK " + handler(command, args)
        except PowerOpBusy as err:
            self._host_log.log(log, INFO, "toolbox: %s refused: %s", command, err)
            return f"ERROR {err}"
        except Exception as err:   # noqa: BLE001 - answer the host, keep polling
            log.warning("toolbox: %s failed: %s", command, err)
            return f"ERROR {err}"

    # -- commands ------------------------------------------------------------------------
    def _reset(self, _command: str, _args: str) -> str:
        self._host_log.log(log, INFO, "toolbox: TCLO reset")
        return f"ATR {self.name}"

    def _ping(self, _command: str, _args: str) -> str:
        return ""

    def _capabilities_register(self, _command: str, _args: str) -> str:
        for request in ("tools.capability.statechange",
                        "tools.capability.softpowerop_retry",
                        f"tools.set.version {TOOLS_VERSION_UNMANAGED}"):
            self.rpc(request)
        return ""

    def _set_option(self, _command: str, args: str) -> str:
        option, _, value = args.partition(" ")
        if option == "broadcastIP" and value.strip() == "1":
            address = first_ipv4()
            if address is None:
                log.info("toolbox: broadcastIP asked, but no interface has an IPv4 address")
            else:
                ok, text = self.rpc(f"info-set guestinfo.ip {address}")
                if not ok:
                    raise RuntimeError(f"info-set guestinfo.ip refused: {text}")
                log.info("toolbox: published guestinfo.ip %s", address)
        return ""

    def _power_op(self, command: str, _args: str) -> str:
        # One at a time, as open-vm-tools (powerOps.c): a host repeating OS_Halt would
        # otherwise get a thread, and a stop sequence handed to the loop, per request.
        self._workers = [w for w in self._workers if w.is_alive()]
        if self._workers:
            raise PowerOpBusy(POWER_OP_BUSY)
        state = POWER_OPS[command]
        action = {STATE_HALT: self._halt, STATE_REBOOT: self._refuse_reboot}.get(
            state, lambda: True)
        worker = threading.Thread(target=self._run_power_op, args=(command, state, action),
                                  name=f"toolbox-{command}", daemon=True)
        self._workers.append(worker)
        worker.start()
        return ""

    def _run_power_op(self, command: str, state: int, action) -> None:
        try:
            ok = bool(action())
        except Exception:   # noqa: BLE001
            log.exception("toolbox: %s failed", command)
            ok = False
        try:
            self.rpc(f"tools.os.statechange.status {1 if ok else 0} {state}")
        except Exception as err:   # noqa: BLE001 - the VMX may be gone (powering off)
            log.warning("toolbox: could not report %s status: %s", command, err)

    def _refuse_reboot(self) -> bool:
        log.warning("toolbox: OS_Reboot refused: a container VM cannot reboot in place; "
                    "power it off and on instead")
        return False

    def _halt(self) -> bool:
        """Stop the primary (StopSignal, SIGKILL after the grace: the agent's one stop
        sequence), then the agent. Runs on a worker thread: it posts to the loop and waits."""
        host = self.host
        finished = threading.Event()
        outcome = {"stopped": False}

        def begin() -> None:                       # on the loop
            primary = host.primary
            if primary is None or not primary.running:
                done(True)
                return
            log.info("toolbox: OS_Halt: stopping primary %s", primary.id)
            host.stop_session(primary, grace=self.halt_grace, kill_wait=self.kill_wait,
                              done=done)

        def done(stopped: bool) -> None:           # on the loop
            if stopped:
                log.info("toolbox: the primary has stopped")
            outcome["stopped"] = stopped
            host.request_stop("vSphere asked the guest to shut down (OS_Halt)")
            finished.set()

        host.loop.call_soon_threadsafe(begin)
        # The loop answers within grace + kill wait; more means the agent is gone already.
        if not finished.wait(self.halt_grace + self.kill_wait + HALT_SLACK):
            log.warning("toolbox: OS_Halt: the agent did not answer")
        return outcome["stopped"]

    # -- RPCI requests of our own -----------------------------------------------------------
    def rpc(self, request: str) -> tuple[bool, str]:
        """Send one RPCI request on a channel of its own; (ok, reply text)."""
        from extraconfig.backdoor.rpci import parse_reply
        with self._rpc_lock:
            channel = self.channel_factory(PROTO_RPCI)
            try:
                channel.send(request.encode("utf-8", "surrogateescape"))
                raw = channel.receive()
            finally:
                channel.close()
        reply = parse_reply(raw or b"")
        if not reply.ok:
            self._host_log.log(log, INFO, "toolbox: RPCI %r answered: %s",
                               request.split(" ")[0], clip(reply.text))
        return reply.ok, reply.text
