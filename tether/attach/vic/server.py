"""VIC's attach on the agent's loop: serial lines and sockets, handshake, then SSH.

A line (COM1, `/dev/ttyS0` in a VIC VM) or an accepted socket client is a `Link`. It
runs the sync handshake (handshake.py) on the raw bytes; once in sync, its bytes are
relayed to one end of a socketpair whose other end carries asyncssh's connection
(sshserver.py, stepped on this loop by aiobridge.py). When the SSH connection ends, a
line goes back to the handshake (a new port layer may be there), a socket is closed.

The SSH library is imported at the first completed handshake, not before: serving a
line costs the agent nothing at startup.

`VicService` is the narrow interface the SSH side uses: which sessions exist, the
refusal rules, stdin EOF bookkeeping, flow control and RunBlock release.
"""
from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import stat
import time

from tether.attach.accepting import MAX_CONNECTIONS, Acceptor
from tether.attach.vic import handshake as hs
from tether.attach.vic import wire
from tether.console import RateLimit, clip
from tether.log import DEBUG, INFO, get_logger
from tether.sessions import Phase

log = get_logger("tether.attach.vic")

READ_SIZE = 64 << 10
RELAY_LIMIT = 1 << 20       # bytes queued one way before the relay stops reading that side
LINE_RETRY = 0.5            # seconds before polling a line that hung up again
SOCKET_HANDSHAKE_TIMEOUT = 30.0
CLOSE_GRACE = 2.0           # seconds for last output to leave when the agent stops


class ChannelRefused(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class VicService:
    """What the SSH side may do with the agent: the host interface, narrowed."""

    def __init__(self, host, *, variant: str = hs.HEAD, require_key: bool = False):
        self.host = host
        self.loop = host.loop
        self.variant = hs.parse_variant(variant)
        self.require_key = require_key
        self.bridge = None
        self._host_key = None
        self._inputs: dict[str, dict] = {}    # session id -> {"propagate": bool, "readers": set}
        self._holds: dict = {}                # session -> attachments holding its output
        self._hold_timer = None
        self._unlisted: set[str] = set()      # IDs with a comma, said once each

    # -- lazily: asyncio and asyncssh ---------------------------------------------------
    def ssh(self):
        if self.bridge is None:
            from tether.attach.vic.aiobridge import AsyncioBridge
            self.bridge = AsyncioBridge(self.loop)
        from tether.attach.vic import sshserver
        if self._host_key is None:
            self._host_key = sshserver.load_host_key(self.host.key)
        return sshserver

    @property
    def host_key(self):
        return self._host_key

    # -- the rules ------------------------------------------------------------------------
    def container_ids(self) -> list[str]:
        """HEAD: the sessions that have not stopped (the E-shaped config has no Active).
        An ID with a comma is left out (wire.listable), with a warning once."""
        ids = []
        for sid, session in self.host.sessions.items():
            if session.phase is Phase.EXITED:
                continue
            if self._served(sid):
                ids.append(sid)
        return sorted(ids)

    def _served(self, sid: str) -> bool:
        if wire.listable(sid):
            return True
        if sid not in self._unlisted:
            self._unlisted.add(sid)
            log.warning("VIC attach: %s; use the agent's own attach protocol for it",
                        wire.unlistable_session(clip(sid)))
        return False

    def check_attach(self, extra: bytes):
        from asyncssh.misc import ChannelOpenError
        if not extra:
            raise ChannelOpenError(wire.OPEN_ADMINISTRATIVELY_PROHIBITED, wire.NO_SESSION_ID)
        sid = extra.decode("utf-8", "replace")
        session = self.host.sessions.get(sid)
        if session is None:
            raise ChannelOpenError(wire.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                   wire.invalid_session(sid))
        if not self._served(sid):
            # what container-ids does not list is not served here either: one rule
            raise ChannelOpenError(wire.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                   wire.unlistable_session(sid))
        cfg = session.config
        if session.phase is Phase.FAILED:
            raise ChannelOpenError(wire.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                   wire.launch_failed(cfg.started))
        if session.phase is Phase.EXITED:
            raise ChannelOpenError(wire.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                   wire.process_finished(cfg.exit_status))
        return session

    # -- stdin: HEAD's close-stdin (the reader propagates EOF once all readers reached it)
    def attached(self, attachment) -> None:
        entry = self._inputs.setdefault(attachment.session.id,
                                        {"propagate": False, "readers": set()})
        entry["readers"].add(attachment)

    def detached(self, attachment) -> None:
        entry = self._inputs.get(attachment.session.id)
        if entry is not None:
            entry["readers"].discard(attachment)
        self.release(attachment)

    def session_ended(self, session) -> None:
        """The process ended: a relaunch starts with a fresh stdin (the reference makes a
        new multi-reader per launch), so close-stdin's flag goes too."""
        self._inputs.pop(session.id, None)

    def propagate_eof(self, session) -> None:
        entry = self._inputs.setdefault(session.id, {"propagate": False, "readers": set()})
        entry["propagate"] = True

    def input_eof(self, attachment) -> None:
        entry = self._inputs.get(attachment.session.id)
        if entry is None:
            return
        entry["readers"].discard(attachment)
        if entry["propagate"] and not entry["readers"]:
            log.info("VIC attach: closing stdin of %s", attachment.session.id)
            attachment.session.close_stdin()

    # -- RunBlock ----------------------------------------------------------------------------
    def unblock(self, session) -> None:
        log.info("VIC attach: unblocking %s", session.id)
        session.unblock()     # the agent writes RunBlock back

    # -- flow control: a channel whose window is shut holds its session's output -------
    def hold(self, attachment) -> None:
        holders = self._holds.setdefault(attachment.session, set())
        if not holders:
            attachment.session.pause_output()
        holders.add(attachment)
        if self._hold_timer is None:
            self._hold_timer = self.loop.call_later(HOLD_CHECK, self._check_holds)

    def release(self, attachment) -> None:
        holders = self._holds.get(attachment.session)
        if holders is None or attachment not in holders:
            return
        holders.discard(attachment)
        if not holders:
            del self._holds[attachment.session]
            attachment.session.resume_output()

    def _check_holds(self) -> None:
        from tether.attach.vic.sshserver import HOLD_LIMIT
        self._hold_timer = None
        now = time.monotonic()
        for holders in list(self._holds.values()):
            for attachment in list(holders):
                if attachment.paused_at and now - attachment.paused_at > HOLD_LIMIT:
                    log.warning("VIC attach: a client of %s read nothing for %.0fs; closing "
                                "its channel", attachment.session.id, HOLD_LIMIT)
                    self.release(attachment)
                    attachment.attached = False
                    attachment.session.output.unsubscribe(attachment)
                    self.bridge.call(attachment.chan.close)
        if self._holds:
            self._hold_timer = self.loop.call_later(HOLD_CHECK, self._check_holds)

    def close(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        for session in list(self._holds):
            session.resume_output()
        self._holds.clear()
        if self.bridge is not None:
            self.bridge.close()


HOLD_CHECK = 5.0


_serials = itertools.count()
_preauth_log = RateLimit(burst=10, interval=10.0)


class Link:
    """One byte stream from the host: a serial line (persistent) or a socket client."""

    def __init__(self, server: "VicAttachServer", fd: int, name: str, *, persistent: bool,
                 sock: socket.socket | None = None):
        self.serial = next(_serials)     # order of arrival
        self.reached_ssh = False
        self.server = server
        self.service = server.service
        self.loop = server.loop
        self.fd = fd
        self.name = name
        self.persistent = persistent
        self.sock = sock
        self.closed = False
        self.handshake = hs.ServerHandshake(self.service.variant)
        self._retry_timer = None
        self._line_timer = None
        self._deadline_timer = None
        self._out = bytearray()           # to the line
        self._to_ssh = bytearray()        # to asyncssh's end of the pair
        self._pair: socket.socket | None = None
        self._ssh_end: socket.socket | None = None
        self._conn = None
        self._handed = False
        self._ssh_over = False            # a socket client's SSH ended: read no more
        self._reading_line = False
        self._reading_pair = False
        self.loop.add_reader(fd, self._on_line_readable)
        self._reading_line = True
        if not persistent:
            self._deadline_timer = self.loop.call_later(SOCKET_HANDSHAKE_TIMEOUT,
                                                        self._handshake_expired)

    # -- the line ---------------------------------------------------------------------------
    def _on_line_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno == errno.EIO and self.persistent:
                data = b""
            else:
                self.close(f"read failed: {err}")
                return
        if not data:
            self._hung_up()
            return
        if self._pair is not None:
            self._queue_ssh(data)
            return
        self._write_line(self.handshake.receive(data))
        self._after_handshake_step()

    def _after_handshake_step(self) -> None:
        if self.handshake.established:
            log.info("VIC attach: %s in sync (%s handshake)", self.name,
                     self.handshake.spoken or self.handshake.variant)
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer = None
            leftover = self.handshake.leftover
            self._start_ssh(leftover)
        elif self.handshake.resting and self._retry_timer is None:
            log.debug("VIC attach: %s: handshake: %s", self.name, self.handshake.last_error)
            self._retry_timer = self.loop.call_later(hs.RETRY_INTERVAL, self._retry)
            self._refresh_line_reading()

    def _retry(self) -> None:
        self._retry_timer = None
        if self.closed or self._pair is not None:
            return
        self._write_line(self.handshake.retry())
        self._after_handshake_step()
        self._refresh_line_reading()

    def _handshake_expired(self) -> None:
        self._deadline_timer = None
        if self._pair is None:
            self.close(f"no handshake within {SOCKET_HANDSHAKE_TIMEOUT:g}s")

    def _write_line(self, data: bytes) -> None:
        if data:
            self._out += data
            self._flush_line()

    def _flush_line(self) -> None:
        while self._out:
            try:
                n = os.write(self.fd, self._out)
            except BlockingIOError:
                break
            except OSError as err:
                if self.persistent:
                    self._out.clear()   # nobody on the line: what we said is lost
                    break
                self.close(f"write failed: {err}")
                return
            del self._out[:n]
        if self._out:
            self.loop.add_writer(self.fd, self._flush_line)
        else:
            self.loop.remove_writer(self.fd)
        # back-pressure: stop taking SSH's output while the line is far behind
        self._set_pair_reading(len(self._out) < RELAY_LIMIT)
        self._refresh_line_reading()

    def _hung_up(self) -> None:
        if not self.persistent:
            self.close("the client disconnected")
            return
        # A line whose host side went away: end SSH, listen again in a moment.
        self._end_ssh("the host hung up the line")
        self._line_timer = self.loop.call_later(LINE_RETRY, self._line_back)
        self._refresh_line_reading()

    def _line_back(self) -> None:
        self._line_timer = None
        self._refresh_line_reading()

    def _refresh_line_reading(self) -> None:
        """The one rule for reading the line. In SSH: while the relay keeps up. In the
        handshake: not while it rests between attempts (the reference does not read
        then), nor while its answers wait for the line (the reference's write blocks),
        so a peer that writes without pause, or reads nothing, is held back by the
        kernel: not read as fast as it writes, nor answered into a growing queue."""
        if self.closed or self._ssh_over or self._line_timer is not None:
            on = False
        elif self._pair is not None:
            on = len(self._to_ssh) < RELAY_LIMIT
        else:
            on = not self.handshake.resting and not self._out
        self._set_line_reading(on)

    def _set_line_reading(self, on: bool) -> None:
        if on and not self._reading_line and not self.closed:
            self.loop.add_reader(self.fd, self._on_line_readable)
            self._reading_line = True
        elif not on and self._reading_line:
            self.loop.remove_reader(self.fd)
            self._reading_line = False

    # -- SSH over a socketpair ------------------------------------------------------------
    def _start_ssh(self, leftover: bytes) -> None:
        self.reached_ssh = True
        try:
            self._start_ssh_on_pair(leftover)
        except Exception as err:   # noqa: BLE001 - e.g. a bad Key: say so, keep the agent
            log.error("VIC attach: cannot start SSH on %s: %s", self.name, err,
                      exc_info=log.isEnabledFor(DEBUG))
            self._close_pair()
            if self.persistent:
                self._restart_handshake()
            else:
                self.close(f"cannot start SSH: {err}")

    def _start_ssh_on_pair(self, leftover: bytes) -> None:
        sshserver = self.service.ssh()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        theirs.setblocking(False)
        self._pair, self._ssh_end = ours, theirs
        self._handed = False
        self.loop.add_reader(ours.fileno(), self._on_pair_readable)
        self._reading_pair = True
        if leftover:
            self._queue_ssh(leftover)
        service = self.service
        bridge = service.bridge
        options = sshserver.asyncssh.SSHServerConnectionOptions(
            server_factory=lambda: sshserver.VicSSHServer(self, service.require_key,
                                                          service.host_key),
            server_host_keys=[service.host_key],
            allow_scp=False, agent_forwarding=False, x11_forwarding=False,
            login_timeout=60, keepalive_interval=0)
        sshserver.restrict_host_key_algorithms(options, service.host_key)

        def factory():
            conn = sshserver.VicServerConnection(bridge.aloop, options)
            conn.vic = service
            return conn

        async def connect():
            await bridge.aloop.create_connection(factory, sock=theirs)

        bridge.aloop.create_task(connect())
        self._handed = True         # asyncio owns `theirs` from here, and closes it
        bridge.kick()

    def ssh_connected(self, conn) -> None:
        self._conn = conn
        log.info("VIC attach: SSH connection on %s", self.name)

    def ssh_lost(self, exc) -> None:
        self._conn = None
        if exc is not None:
            log.info("VIC attach: SSH connection on %s ended: %s", self.name, exc)
        else:
            log.info("VIC attach: SSH connection on %s ended", self.name)
        # Let the relay drain what asyncssh wrote last (a disconnect message), then reset.
        self.loop.call_soon(self._after_ssh)

    def _after_ssh(self) -> None:
        if self.closed:
            return
        self._drain_pair()
        self._close_pair()
        if self.persistent:
            self._restart_handshake()
        else:
            # Nothing more is read from a socket client: its last output gets up to
            # CLOSE_GRACE to leave, then the link closes, read or not.
            self._ssh_over = True
            self._refresh_line_reading()
            self._close_after_flush(time.monotonic() + CLOSE_GRACE)

    def _restart_handshake(self) -> None:
        self.handshake = hs.ServerHandshake(self.service.variant)
        self._to_ssh.clear()
        self._refresh_line_reading()

    def _close_after_flush(self, deadline: float) -> None:
        if self.closed:
            return
        if self._out and time.monotonic() < deadline:
            self.loop.call_later(0.05, lambda: self._close_after_flush(deadline))
            return
        self.close("the SSH connection ended" if not self._out else
                   f"the SSH connection ended; {len(self._out)} bytes the client did not "
                   f"read within {CLOSE_GRACE:g}s dropped")

    def _queue_ssh(self, data: bytes) -> None:
        self._to_ssh += data
        self._flush_pair()

    def _flush_pair(self) -> None:
        pair = self._pair
        if pair is None:
            return
        while self._to_ssh:
            try:
                n = pair.send(self._to_ssh)
            except BlockingIOError:
                break
            except OSError:
                self._to_ssh.clear()
                break
            del self._to_ssh[:n]
        if self._to_ssh:
            self.loop.add_writer(pair.fileno(), self._flush_pair)
        else:
            self.loop.remove_writer(pair.fileno())
        self._refresh_line_reading()

    def _on_pair_readable(self) -> None:
        pair = self._pair
        if pair is None:
            return
        try:
            data = pair.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(pair.fileno())
            self._reading_pair = False
            return
        self._write_line(data)

    def _drain_pair(self) -> None:
        pair = self._pair
        if pair is None:
            return
        while True:
            try:
                data = pair.recv(READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self._write_line(data)

    def pump_out(self) -> int:
        """Move what asyncssh wrote to the line now (used at shutdown); bytes moved."""
        if self.closed:
            return 0
        moved = 0
        pair = self._pair
        while pair is not None:
            try:
                data = pair.recv(READ_SIZE)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            moved += len(data)
            self._out += data
        if self._out:
            before = len(self._out)
            try:
                select.select([], [self.fd], [], 0.05)
            except (OSError, ValueError):
                return moved
            self._flush_line()
            moved += before - len(self._out)
        return moved

    def _set_pair_reading(self, on: bool) -> None:
        pair = self._pair
        if pair is None:
            return
        if on and not self._reading_pair:
            self.loop.add_reader(pair.fileno(), self._on_pair_readable)
            self._reading_pair = True
        elif not on and self._reading_pair:
            self.loop.remove_reader(pair.fileno())
            self._reading_pair = False

    def _close_pair(self) -> None:
        pair, self._pair = self._pair, None
        if pair is not None:
            self.loop.remove_reader(pair.fileno())
            self.loop.remove_writer(pair.fileno())
            self._reading_pair = False
            pair.close()
        end, self._ssh_end = self._ssh_end, None
        if end is not None and not self._handed:
            end.close()     # asyncio's transport closes the ones it was given
        self._to_ssh.clear()

    def _end_ssh(self, reason: str) -> None:
        conn = self._conn
        if conn is not None and self.service.bridge is not None:
            log.info("VIC attach: %s: %s; closing the SSH connection", self.name, reason)
            self.service.bridge.call(conn.abort)
        self._close_pair()
        self.handshake = hs.ServerHandshake(self.service.variant)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reached_ssh or self.persistent:
            log.info("VIC attach: %s closed: %s", self.name, reason)
        else:   # a flood of clients that never got in must not flood the log
            _preauth_log.log(log, INFO, "VIC attach: %s closed: %s", self.name, reason)
        for timer in (self._retry_timer, self._line_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._end_ssh(reason)
        self._set_line_reading(False)
        self.loop.remove_writer(self.fd)
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)
        self.server.links.discard(self)


class VicAttachServer:
    """Serve VIC's attach on each endpoint: `unix:PATH` (listen; every client is a fresh
    line, as in the sandbox) or `serial:DEVICE` / a device path (one persistent line)."""

    def __init__(self, host, endpoints: list[str], *, variant: str = hs.HEAD,
                 require_key: bool = False):
        self.loop = host.loop
        self.service = VicService(host, variant=variant, require_key=require_key)
        self.links: set[Link] = set()
        self.listeners: list[socket.socket] = []
        self.acceptors: list[Acceptor] = []
        self.failed: dict[str, str] = {}
        for endpoint in endpoints:
            try:
                self._open(endpoint)
            except OSError as err:
                self.failed[endpoint] = str(err)
                log.error("VIC attach endpoint %s not available: %s", endpoint, err)
        if endpoints and not self.links and not self.listeners:
            raise RuntimeError("no VIC attach endpoint could be opened: " + "; ".join(
                f"{e}: {m}" for e, m in self.failed.items()))

    def _open(self, endpoint: str) -> None:
        kind, _, rest = endpoint.partition(":")
        if kind == "unix" and rest:
            try:
                if stat.S_ISSOCK(os.stat(rest).st_mode):
                    os.unlink(rest)
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            listener.bind(rest)
            os.chmod(rest, 0o600)
            listener.listen(8)
            listener.setblocking(False)
            self.listeners.append(listener)
            self.acceptors.append(Acceptor(
                self.loop, listener.fileno(), endpoint, lambda lst=listener: _accept(lst),
                on_accept=self._add_client, admit=self._admit))
            log.info("VIC attach listening on %s", endpoint)
            return
        device = rest if kind == "serial" else endpoint
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        if os.isatty(fd):
            from tether.system import set_raw_tty
            try:
                set_raw_tty(fd)
            except OSError as err:
                log.warning("VIC attach: %s: %s; leaving the line as it is", device,
                            err.strerror)
        self.links.add(Link(self, fd, device, persistent=True))
        log.info("VIC attach on the line %s (%s handshake)", device, self.service.variant)

    def _admit(self, sock) -> str | None:
        """MAX_CONNECTIONS clients at most; at the cap the oldest still in its handshake
        makes room, so idle connections cannot lock the port layer out."""
        clients = [link for link in self.links if not link.persistent]
        if len(clients) < MAX_CONNECTIONS:
            return None
        waiting = [link for link in clients if link._pair is None]
        if waiting:
            min(waiting, key=lambda link: link.serial).close(
                "a newer client took its place before its handshake")
            return None
        return f"{MAX_CONNECTIONS} connections already"

    def _add_client(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.links.add(Link(self, sock.fileno(), "VIC attach client", persistent=False,
                            sock=sock))

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop serving. The agent calls this after its loop has stopped: the last output
        of a session (and the channel's EOF and close) is still on its way through
        asyncssh and the relay, so pump both here until they go quiet, at most `grace`."""
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
        bridge = self.service.bridge
        if bridge is not None and self.links:
            deadline = time.monotonic() + grace
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                bridge.step()
                if sum(link.pump_out() for link in list(self.links)):
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 0.2:
                    break
                time.sleep(0.01)
        for link in list(self.links):
            link.close("the agent is stopping")
        self.service.close()


def _accept(listener: socket.socket) -> socket.socket | None:
    try:
        return listener.accept()[0]
    except (BlockingIOError, InterruptedError):
        return None
