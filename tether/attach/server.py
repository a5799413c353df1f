"""The attach server: every configured transport at once, on the agent's loop.

One `Connection` per client (or per serial/virtio line). Its output goes into a bounded
buffer written when the fd is writable; a client whose backlog passes the bound is dropped
with a logged reason, so a stuck client never holds up a session or another client.
Requests map onto the Session API (docs/architecture.md); the wire format lives in
`protocol.py` and `docs/attach-protocol.md`.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import select
import stat
import tarfile
import tempfile
import time
from collections import deque

from tether.attach import protocol as p
from tether.attach import transports
from tether.rootfs import resolve_in_root
from tether.sessions import Phase

log = logging.getLogger("tether.attach")

READ_SIZE = 256 << 10
HOLD_AT = 4 << 20             # a client this far behind pauses the session's output...
HOLD_SECONDS = 3.0            # ...for at most this long; not drained by then: dropped
OUTPUT_LIMIT = 16 << 20       # a client this far behind is dropped at once
LOW_WATER = 1 << 20           # drained below this: output resumes, copy-from reads on
LINE_RETRY = 0.5              # seconds before re-polling a serial line that hung up
TAR_SPOOL = 8 << 20
AUTH_TIMEOUT = 30.0           # seconds a socket client has to answer the hello
CLOSE_GRACE = 2.0             # seconds for queued output to leave when the agent stops
WRITE_BATCH = 256             # pieces per gathering write (IOV_MAX is 1024)


def start_attach_server(agent, endpoints: list[str]) -> "AttachServer":
    """Listen on every endpoint; one that cannot be opened is logged and skipped."""
    return AttachServer(agent, endpoints)


class AttachServer:
    def __init__(self, agent, endpoints: list[str]):
        self.agent = agent
        self.loop = agent.loop
        self.listeners: list[transports.Listener] = []
        self.connections: set[Connection] = set()
        self.failed: dict[str, str] = {}
        self._holds: dict = {}      # session -> connections holding its output
        for endpoint in endpoints:
            try:
                opened = transports.listen(endpoint)
            except (OSError, transports.EndpointError) as err:
                self.failed[endpoint] = str(err)
                log.error("attach endpoint %s not available: %s", endpoint, err)
                continue
            if isinstance(opened, transports.Listener):
                self.listeners.append(opened)
                self.loop.add_reader(opened.fileno(), lambda lst=opened: self._accept(lst))
            else:
                self._add(opened)
        if endpoints and not self.listeners and not self.connections:
            raise RuntimeError("no attach endpoint could be opened: " + "; ".join(
                f"{e}: {m}" for e, m in self.failed.items()))

    def _accept(self, listener: transports.Listener) -> None:
        for _ in range(16):
            try:
                conn = listener.accept()
            except OSError as err:   # EMFILE and friends: log, keep serving the others
                log.warning("attach: accept on %s failed: %s", listener.name, err)
                return
            if conn is None:
                return
            self._add(conn)

    # Pausing a session's output: the Session API has no pause, so take its output fds
    # off the loop (and put them back) -- see docs/attach-protocol.md, flow control.
    def pause(self, session, by: "Connection") -> None:
        holders = self._holds.setdefault(session, set())
        if not holders:
            session.pause_output()
        holders.add(by)

    def resume(self, session, by: "Connection") -> None:
        holders = self._holds.get(session)
        if holders is None:
            return
        holders.discard(by)
        if holders:
            return
        del self._holds[session]
        session.resume_output()

    def _add(self, conn: transports.Conn) -> "Connection":
        connection = Connection(self, conn)
        self.connections.add(connection)
        return connection

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop listening; give queued output (a session's last words, its exit status)
        up to `grace` seconds to reach the clients, then close them. The agent calls this
        after its loop has stopped, so it waits with its own select."""
        for listener in self.listeners:
            self.loop.remove_reader(listener.fileno())
            listener.close()
        self.listeners.clear()
        deadline = time.monotonic() + grace
        pending = [c for c in self.connections if c.backlog and not c.closed]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                _, writable, _ = select.select([], [c.fd for c in pending], [], left)
            except (OSError, ValueError):
                break
            for connection in pending:
                if connection.fd in writable:
                    connection._flush()
            pending = [c for c in pending if c.backlog and not c.closed]
        for connection in list(self.connections):
            connection.close("the attach server is shutting down")


class Connection:
    """One client's conversation: handshake, channels, bounded output."""

    def __init__(self, server: AttachServer, conn: transports.Conn):
        self.server = server
        self.agent = server.agent
        self.loop = server.loop
        self.conn = conn
        self.fd = conn.fileno()
        # Sockets are reliable: data frames skip the CRC there (lines keep it).
        self.checked = conn.persistent
        self.decoder = p.FrameDecoder(accept_unchecked=not conn.persistent)
        self.handshake = self._new_handshake()
        self.channels: dict[int, object] = {}
        self._out: deque[bytes] = deque()
        self._out_size = 0
        self._writing = False
        self._retry = None
        self._held: set = set()           # sessions whose output waits for us to drain
        self._hold_timer = None
        self.closed = False
        self.loop.add_reader(self.fd, self._on_readable)
        # A socket that does not authenticate in time is closed (lines wait for ever).
        self._auth_timer = None if conn.persistent else self.loop.call_later(
            AUTH_TIMEOUT, self._auth_expired)

    def _new_handshake(self) -> p.ServerHandshake:
        return p.ServerHandshake(self.agent.key, allow_unchecked=not self.conn.persistent)

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if not self.handshake.authenticated:
            self.close(f"no authentication within {AUTH_TIMEOUT:g}s")

    # -- input --------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self.conn.read(READ_SIZE)
        except OSError as err:
            self.close(f"read failed: {err}")
            return
        if data is None:
            return
        if not data:
            self._hung_up()
            return
        try:
            messages = self.decoder.feed(data)
        except Exception as err:   # the decoder never should; never let it reach PID 1
            log.exception("attach: decoder failed on %s", self.conn.name)
            self._reset(f"decoder failed: {err}")
            return
        for message in messages:
            if self.closed:
                return
            try:
                self._handle(message)
            except p.ProtocolError as err:
                self._refuse(str(err), message.get("ch"))
            except Exception as err:   # a bug must cost one request, never the agent
                log.exception("attach: %s: %r failed", self.conn.name, message.get("t"))
                channel = message.get("ch")
                if isinstance(channel, int) and self.handshake.authenticated:
                    self.channels.pop(channel, None)
                    self.send({"t": p.ERROR, "ch": channel,
                               "msg": f"internal error: {type(err).__name__}: {err}"})

    def _hung_up(self) -> None:
        if not self.conn.persistent:
            self.close("the client disconnected")
            return
        # A serial/virtio line: the host went away; start over when it comes back.
        self._reset("the host hung up the line")
        self.loop.remove_reader(self.fd)
        self._retry = self.loop.call_later(LINE_RETRY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)

    def _refuse(self, reason: str, channel) -> None:
        log.warning("attach: %s: %s", self.conn.name, reason)
        authenticated = self.handshake.authenticated
        self.send({"t": p.ERROR, "ch": channel if authenticated else None, "msg": reason})
        if not authenticated:
            if self.conn.persistent:
                self._reset(reason)
            else:
                self._close_after_flush = True
                self._flush()

    _close_after_flush = False

    def _handle(self, message: dict) -> None:
        kind = message["t"]
        if kind == p.CONNECT:
            if self.handshake.authenticated or self.channels:
                self._reset("the client started a new conversation")
            self.send(self.handshake.start())
            return
        if not self.handshake.authenticated:
            for reply in self.handshake.receive(message):
                self.send(reply)
            if self.handshake.authenticated:
                log.info("attach: %s authenticated", self.conn.name)
            return
        channel = message.get("ch")
        if not isinstance(channel, int) or isinstance(channel, bool):
            raise p.ProtocolError(f"{kind}: field 'ch' must be int")
        if kind in p.REQUESTS:
            if channel in self.channels:
                raise p.ProtocolError(f"channel {channel} is already open")
            try:
                handler = getattr(self, "_req_" + kind.replace("-", "_"))
                handler(channel, message)
            except p.ProtocolError:
                raise
            except (KeyError, ValueError, OSError, TypeError, tarfile.TarError) as err:
                self.channels.pop(channel, None)
                self.send({"t": p.ERROR, "ch": channel, "msg": _describe(err)})
            return
        target = self.channels.get(channel)
        if target is None:
            if kind in (p.DATA, p.EOF, p.CLOSE):
                return   # late traffic for a channel that just ended
            raise p.ProtocolError(f"unknown message type {kind!r}")
        if kind == p.DATA:
            target.on_data(p.require(message, "d", bytes))
        elif kind == p.EOF:
            target.on_eof()
        elif kind == p.CLOSE:
            self.channels.pop(channel, None)
            target.on_detach()
        else:
            raise p.ProtocolError(f"unknown message type {kind!r}")

    # -- output -------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        self.send_bytes(p.encode(message))

    def send_bytes(self, frame: bytes) -> bool:
        """Queue a frame; False when the client was dropped for falling behind."""
        return self.send_parts((frame,), len(frame))

    def send_parts(self, parts, size: int) -> bool:
        """Queue frames given as pieces (written with one gathering write, uncopied)."""
        if self.closed:
            return False
        self._out.extend(parts)
        self._out_size += size
        if self._out_size > OUTPUT_LIMIT:
            self._drop_slow()
            return False
        if not self._writing:
            self._flush()
        return not self.closed

    @property
    def backlog(self) -> int:
        return self._out_size

    def _flush(self) -> None:
        out = self._out
        while out:
            batch = list(itertools.islice(out, WRITE_BATCH))
            try:
                n = self.conn.writev(batch)
            except OSError as err:
                self._hung_up() if self.conn.persistent else self.close(f"write failed: {err}")
                return
            if n == 0:
                break
            self._out_size -= n
            for piece in batch:
                if n >= len(piece):
                    n -= len(piece)
                    out.popleft()
                else:
                    out[0] = memoryview(piece)[n:]
                    n = -1
                    break
            if n < 0:
                break   # a short write: the fd is full
        if self._out:
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.fd, self._flush)
            return
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
        if self._close_after_flush:
            self.close("authentication failed")
            return
        if self._held and self._out_size < LOW_WATER:
            self._release()
        for channel in list(self.channels.values()):
            pump = getattr(channel, "pump", None)
            if pump is not None and self._out_size < LOW_WATER:
                pump()

    # -- flow control: a client that keeps up may pause a session for a moment ---------
    def hold(self, session) -> None:
        """Our backlog is over HOLD_AT: pause `session`'s output until we drain below
        LOW_WATER, but for at most HOLD_SECONDS, then drop this client instead."""
        if session in self._held or self.closed:
            return
        self._held.add(session)
        self.server.pause(session, self)
        if self._hold_timer is None:
            self._hold_timer = self.loop.call_later(HOLD_SECONDS, self._hold_expired)

    def _release(self) -> None:
        held, self._held = self._held, set()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        for session in held:
            self.server.resume(session, self)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        if self._held and self._out_size >= LOW_WATER:
            self._drop_slow(f"did not drain its backlog within {HOLD_SECONDS:g}s")

    def _drop_slow(self, why: str = "") -> None:
        reason = (f"dropped: {self._out_size} bytes of output queued "
                  f"({why or f'over the {OUTPUT_LIMIT}-byte limit'}; the client is too "
                  "slow or stopped reading)")
        self._out.clear()
        self._out_size = 0
        if self.conn.persistent:
            self._reset(reason)
        else:
            self.close(reason)

    # -- ending ---------------------------------------------------------------------------
    def _reset(self, reason: str) -> None:
        """End every channel (processes keep running); the line stays for a new hello."""
        if self.channels:
            log.info("attach: %s: %s; detaching %d channel(s)", self.conn.name, reason,
                     len(self.channels))
        channels, self.channels = self.channels, {}
        for channel in channels.values():
            channel.on_detach()
        self._release()
        self.handshake = self._new_handshake()
        self._out.clear()
        self._out_size = 0
        self._close_after_flush = False

    def close(self, reason: str) -> None:
        if self.closed:
            return
        log.info("attach: %s closed: %s", self.conn.name, reason)
        self._reset(reason)
        self.closed = True
        for timer in (self._retry, self._auth_timer):
            if timer is not None:
                timer.cancel()
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
        self.conn.close()
        self.server.connections.discard(self)

    def finish(self, channel: int) -> None:
        self.channels.pop(channel, None)
        self.send({"t": p.CLOSE, "ch": channel})

    # -- requests -------------------------------------------------------------------------
    def _session(self, message: dict):
        sid = p.require(message, "session", str)
        session = self.agent.sessions.get(sid)
        if session is None:
            raise KeyError(f"session {sid} is invalid: no such session")
        return session

    def _ok(self, channel: int, **fields) -> None:
        self.send({"t": p.OK, "ch": channel, **fields})

    def _req_ping(self, channel: int, message: dict) -> None:
        self._ok(channel, data=message.get("data"), time=time.time())

    def _req_list(self, channel: int, message: dict) -> None:
        sessions = []
        for _, session in sorted(self.agent.sessions.items()):
            state = p.plain(session.state())
            state["run_state"] = process_run_state(session)
            sessions.append(state)
        self._ok(channel, sessions=sessions)

    def _req_resize(self, channel: int, message: dict) -> None:
        session = self._session(message)
        rows, cols = p.require(message, "rows", int), p.require(message, "cols", int)
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise ValueError(f"window size {rows}x{cols} is out of range")
        if not session.config.tty:
            raise ValueError(f"session {session.id} has no tty to resize")
        session.resize(rows, cols)
        self._ok(channel)

    def _req_signal(self, channel: int, message: dict) -> None:
        from tether.sessions import parse_signal
        session = self._session(message)
        spec = message.get("signal")
        if isinstance(spec, int) and not isinstance(spec, bool):
            signum = parse_signal(str(spec))
        elif isinstance(spec, str):
            signum = parse_signal(spec)
        else:
            raise ValueError("signal: give a signal name or number")
        if not session.running:
            raise ValueError(f"session {session.id} is not running")
        session.signal(signum)
        self._ok(channel, signal=signum)

    def _req_close_stdin(self, channel: int, message: dict) -> None:
        self._session(message).close_stdin()
        self._ok(channel)

    def _req_unblock(self, channel: int, message: dict) -> None:
        session = self._session(message)
        session.unblock()
        if session.phase is Phase.FAILED:
            raise ValueError(f"launch failed with: {session.config.started}")
        self._ok(channel)

    def _req_attach(self, channel: int, message: dict) -> None:
        session = self._session(message)
        if session.phase is Phase.FAILED:
            raise ValueError(f"session {session.id}: launch failed with: "
                             f"{session.config.started}")
        self._open_attach(channel, session, stdin=message.get("stdin", True) is not False,
                          replay=bool(message.get("replay")))

    def _open_attach(self, channel: int, session, **options) -> None:
        attachment = AttachChannel(self, channel, session)
        self.channels[channel] = attachment
        attachment.start(**options)

    def _req_exec(self, channel: int, message: dict) -> None:
        cfg = _exec_config(message)
        if cfg.common.id in self.agent.sessions:
            raise ValueError(f"session {cfg.common.id} already exists")
        session = self.agent.exec_session(cfg)
        if session.phase is not Phase.RUNNING:
            raise ValueError(f"exec {cfg.cmd.path}: "
                             f"{cfg.started if session.phase is Phase.FAILED else 'did not start'}")
        if message.get("attach", True) is False:
            self._ok(channel, id=session.id, pid=session.pid, tty=cfg.tty)
            self.finish(channel)
            return
        self._open_attach(channel, session, stdin=True, replay=True,
                          extra={"id": session.id, "pid": session.pid})

    def _req_copy_to(self, channel: int, message: dict) -> None:
        path = p.require(message, "path", str)
        self.channels[channel] = CopyToChannel(self, channel, self.agent.root, path,
                                               mode=message.get("mode"),
                                               as_tar=bool(message.get("tar")))

    def _req_copy_from(self, channel: int, message: dict) -> None:
        path = p.require(message, "path", str)
        self.channels[channel] = CopyFromChannel(self, channel, self.agent.root, path,
                                                 as_tar=message.get("tar"))

    def _req_stats(self, channel: int, message: dict) -> None:
        self._ok(channel, **collect_stats(self.agent.sessions))


GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def _rfc3339(seconds: int) -> str:
    if not seconds:
        return GO_ZERO_TIME
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# The port layer's ProcessRunState statuses; a finishing process has no exit recorded yet.
RUN_STATUS = {Phase.CREATED: "created", Phase.BLOCKED: "blocked", Phase.RUNNING: "running",
              Phase.FINISHING: "running", Phase.EXITED: "exited", Phase.FAILED: "failed"}


def process_run_state(session) -> dict:
    """The port layer's ProcessRunState for a session, with its Go field names
    (`vmware/vic lib/portlayer/exec2/container.go`; docs/attach-protocol.md)."""
    cfg = session.config
    status = RUN_STATUS[session.phase]
    logs = cfg.diagnostics.exit_logs or []
    message = logs[-1].message if logs and status == "exited" else ""
    if status == "failed":
        message = cfg.started
    return {"ProcessID": session.id, "Status": status, "GuestPid": session.pid or 0,
            "ExitCode": cfg.exit_status, "ExitMsg": message,
            "StartedAt": _rfc3339(cfg.detail.start_time),
            "FinishedAt": _rfc3339(cfg.detail.stop_time)}


def _describe(err: Exception) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _exec_config(message: dict):
    import secrets
    from tether.config import Cmd, Common, SessionConfig
    args = p.require(message, "args", list)
    if not args or not all(isinstance(a, str) for a in args):
        raise ValueError("exec: args must be a non-empty list of strings")
    env = message.get("env")
    if env is None:
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise ValueError("exec: env must be a list of NAME=VALUE strings")
    sid = message.get("id") or secrets.token_hex(16)
    if not isinstance(sid, str):
        raise ValueError("exec: id must be a string")
    tty = bool(message.get("tty"))
    return SessionConfig(
        common=Common(id=sid, name=str(message.get("name") or sid)),
        cmd=Cmd(path=args[0], args=args, env=env, dir=str(message.get("dir") or "")),
        tty=tty, attach=True, open_stdin=message.get("stdin", True) is not False,
        user=str(message.get("user") or ""), group=str(message.get("group") or ""))


# -- channels ---------------------------------------------------------------------------------
class AttachChannel:
    """A client on a session: output listener, stdin source."""

    def __init__(self, connection: Connection, channel: int, session):
        self.connection = connection
        self.channel = channel
        self.session = session
        self.stdin = True
        self.attached = False

    def start(self, *, stdin: bool, replay: bool, extra: dict | None = None) -> None:
        connection, channel, session = self.connection, self.channel, self.session
        self.stdin = stdin
        connection.send({"t": p.OK, "ch": channel, "tty": bool(session.config.tty),
                         "running": bool(session.running), **(extra or {})})
        if replay:
            for stream, data in session.output.replay():
                if not self._forward(stream, data):
                    return
        if session.phase is Phase.EXITED:
            self.on_close()   # it has already ended: replay was all there is
            return
        session.output.subscribe(self)
        self.attached = True

    def _forward(self, stream: str, data: bytes) -> bool:
        connection = self.connection
        if not connection.send_parts(*p.data_parts(self.channel, data, stream,
                                                   connection.checked)):
            return False
        if connection.backlog > HOLD_AT and self.attached:
            connection.hold(self.session)
        return True

    # listener interface (OutputFanout)
    def on_output(self, stream: str, data: bytes) -> None:
        self._forward(stream, data)

    def on_close(self) -> None:
        self.attached = False
        session = self.session
        if self.connection.channels.get(self.channel) is not self:
            return
        self.connection.send({"t": p.EXIT, "ch": self.channel,
                              "status": session.config.exit_status,
                              "code": session.exit_code(),
                              "signal": getattr(session, "exit_signal", 0)})
        self.connection.finish(self.channel)

    # from the client
    def on_data(self, data: bytes) -> None:
        if self.stdin:
            self.session.write_stdin(data)

    def on_eof(self) -> None:
        pass   # the client has no more input; the process's stdin stays open (detach rule)

    def on_detach(self) -> None:
        if self.attached:
            self.session.output.unsubscribe(self)
            self.attached = False


class CopyToChannel:
    """Data in, a file (written to a temporary name, renamed at the end) or a tar stream
    extracted under a directory."""

    def __init__(self, connection: Connection, channel: int, root: str, path: str, *,
                 mode, as_tar: bool):
        self.connection = connection
        self.channel = channel
        self.as_tar = as_tar
        self.digest = hashlib.sha256()
        self.size = 0
        self.target = resolve_in_root(root, path, follow_last=not as_tar)
        if as_tar:
            if not os.path.isdir(self.target):
                raise NotADirectoryError(20, "not a directory", path)
            self.file = tempfile.SpooledTemporaryFile(TAR_SPOOL)
        else:
            if os.path.isdir(self.target):
                raise IsADirectoryError(21, "is a directory (copy a tar stream into it)", path)
            directory = os.path.dirname(self.target)
            fd, self.temp = tempfile.mkstemp(prefix=".tether-copy-", dir=directory)
            self.file = os.fdopen(fd, "wb")
            self.mode = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0o644
        connection.send({"t": p.OK, "ch": channel})

    def on_data(self, data: bytes) -> None:
        if self.file is None:
            return
        try:
            self.file.write(data)
        except OSError as err:
            self._fail(f"writing {self.target}: {err.strerror}")
            return
        self.digest.update(data)
        self.size += len(data)

    def on_eof(self) -> None:
        if self.file is None:
            return
        try:
            if self.as_tar:
                self.file.seek(0)
                with tarfile.open(fileobj=self.file, mode="r|*") as archive:
                    archive.extractall(self.target, filter="data")
                self.file.close()
            else:
                self.file.flush()
                os.fchmod(self.file.fileno(), self.mode & 0o7777)
                self.file.close()
                os.rename(self.temp, self.target)
        except (OSError, tarfile.TarError) as err:
            self._fail(f"copy to {self.target}: {_describe(err) if isinstance(err, OSError) else err}")
            return
        self.file = None
        self.connection._ok(self.channel, size=self.size, sha256=self.digest.hexdigest())
        self.connection.finish(self.channel)

    def _fail(self, reason: str) -> None:
        self._discard()
        self.connection.send({"t": p.ERROR, "ch": self.channel, "msg": reason})
        self.connection.channels.pop(self.channel, None)

    def _discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            if not self.as_tar:
                try:
                    os.unlink(self.temp)
                except FileNotFoundError:
                    pass

    def on_detach(self) -> None:
        self._discard()


class CopyFromChannel:
    """A file, or a directory as a tar stream, out to the client as the client keeps up."""

    def __init__(self, connection: Connection, channel: int, root: str, path: str, *, as_tar):
        self.connection = connection
        self.channel = channel
        target = resolve_in_root(root, path)
        info = os.stat(target)
        as_tar = stat.S_ISDIR(info.st_mode) if as_tar is None else bool(as_tar)
        if as_tar:
            self.file = tempfile.SpooledTemporaryFile(TAR_SPOOL)
            with tarfile.open(fileobj=self.file, mode="w") as archive:
                archive.add(target, arcname=os.path.basename(target.rstrip("/")) or ".")
            size = self.file.tell()
            self.file.seek(0)
        else:
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path} is not a regular file or directory")
            self.file = open(target, "rb")
            size = info.st_size
        connection._ok(channel, kind="tar" if as_tar else "file", size=size,
                       mode=stat.S_IMODE(info.st_mode))
        connection.loop.call_soon(self.pump)

    def pump(self) -> None:
        connection = self.connection
        while self.file is not None and connection.backlog < LOW_WATER:
            if connection.channels.get(self.channel) is not self:
                return self.on_detach()
            chunk = self.file.read(p.DATA_CHUNK)
            if not chunk:
                self.on_detach()
                connection.send({"t": p.EOF, "ch": self.channel})
                connection.finish(self.channel)
                return
            frames = p.encode_data(self.channel, chunk, "stdout", connection.checked)
            if not connection.send_bytes(frames[0]):
                return

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_detach(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# -- stats -----------------------------------------------------------------------------------
def collect_stats(sessions: dict) -> dict:
    import psutil   # only when someone asks
    memory = psutil.virtual_memory()
    result = {"time": time.time(), "cpus": psutil.cpu_count(),
              "load": list(os.getloadavg()),
              "memory": {"total": memory.total, "available": memory.available},
              "sessions": {}}
    for sid, session in sessions.items():
        entry = {"pid": session.pid, "running": bool(session.running), "cpu_seconds": 0.0,
                 "rss": 0, "pids": 0}
        if session.running and session.pid:
            try:
                top = psutil.Process(session.pid)
                procs = [top] + top.children(recursive=True)
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        entry["cpu_seconds"] += cpu.user + cpu.system
                        entry["rss"] += proc.memory_info().rss
                        entry["pids"] += 1
                except psutil.Error:
                    continue
        result["sessions"][sid] = entry
    return result
