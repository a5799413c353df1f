"""The attach server: every configured transport at once, on the agent's loop.

One `Connection` per client (or per serial/virtio line): it reads frames, runs the
handshake, dispatches requests onto the Session API and the channel kinds of
`channels.py`, and owns the client's output: a bounded buffer written when the fd is
writable. A client that falls behind pauses the sessions it watches for a moment, then
is dropped with a logged reason, so a stuck client never holds up a session or another
client. The server sees the agent only through the `Host` interface (tether/host.py).
The wire format lives in `protocol.py` and docs/attach-protocol.md.

Before a client has authenticated it gets little: a few KiB in and out, frames of at
most 1 KiB, one hello (on a socket), a few bad frames, and one of a handful of
unauthenticated places per listener (a newer client takes the oldest one's place), so
neither memory nor CPU nor connections can be run up by someone without the Key.
"""
from __future__ import annotations

import itertools
import os
import select
import tarfile
import time
from collections import deque
from typing import TYPE_CHECKING

from tether.attach import protocol as p
from tether.attach import stats, transports
from tether.attach.accepting import MAX_CONNECTIONS, Acceptor
from tether.attach.channels import (AttachChannel, CopyFromChannel, CopyToChannel,
                                    describe_error)
from tether.console import RateLimit, clip, escape_unprintable
from tether.log import INFO, WARNING, get_logger
from tether.sessions import Phase

if TYPE_CHECKING:
    from tether.host import Host

log = get_logger("tether.attach")

READ_SIZE = 256 << 10
HOLD_AT = 4 << 20             # a client this far behind pauses the session's output...
HOLD_SECONDS = 3.0            # ...for at most this long; not drained by then: dropped
OUTPUT_LIMIT = 16 << 20       # a client this far behind is dropped at once
LOW_WATER = 1 << 20           # drained below this: output resumes, copy-from reads on
LINE_RETRY = 0.5              # seconds before re-polling a serial line that hung up
AUTH_TIMEOUT = 30.0           # seconds a socket client has to answer the hello
CLOSE_GRACE = 2.0             # seconds for queued output to leave when the agent stops
WRITE_BATCH = 256             # pieces per gathering write (IOV_MAX is 1024)
# Before authentication (docs/attach-protocol.md, "Limits"):
# MAX_CONNECTIONS (accepting.py): clients per listener
MAX_UNAUTHENTICATED = 8       # of them not authenticated yet; a newer one displaces the oldest
PREAUTH_INPUT = 4 << 10       # bytes a socket client may send before it has authenticated
PREAUTH_OUTPUT = 4 << 10      # bytes queued for a peer that has not authenticated
PREAUTH_READ = 4 << 10        # bytes read at once from a peer that has not authenticated
PREAUTH_BAD_FRAMES = 8        # bad frames before authentication: a socket is dropped, a line reset
MAX_BAD_FRAMES = 64           # bad frames from an authenticated socket client: dropped
REASON_LIMIT = 240            # characters of a refusal's text in the log and the reply
MAX_PENDING_STATS = 4         # `stats` requests of one client being collected at once


def start_attach_server(host: "Host", endpoints: list[str]) -> "AttachServer":
    """Listen on every endpoint; one that cannot be opened is logged and skipped."""
    return AttachServer(host, endpoints)


class AttachServer:
    def __init__(self, host: "Host", endpoints: list[str]):
        self.host = host
        self.loop = host.loop
        self.listeners: list[transports.Listener] = []
        self.acceptors: list[Acceptor] = []
        self.connections: set[Connection] = set()
        self.failed: dict[str, str] = {}
        self.stats_worker = stats.StatsWorker(self.loop)
        # what unauthenticated peers cause in the log is rate limited (a flood of them
        # must not become a flood of log lines)
        self.preauth_log = RateLimit(burst=10, interval=10.0)
        for endpoint in endpoints:
            try:
                opened = transports.listen(endpoint)
            except (OSError, transports.EndpointError) as err:
                self.failed[endpoint] = str(err)
                log.error("attach endpoint %s not available: %s", endpoint, err)
                continue
            if isinstance(opened, transports.Listener):
                self.listeners.append(opened)
                self.acceptors.append(Acceptor(
                    self.loop, opened.fileno(), opened.name, opened.accept,
                    on_accept=lambda conn, lst=opened: self._add(conn, lst),
                    admit=lambda conn, lst=opened: self._admit(lst)))
            else:
                self._add(opened)
        if endpoints and not self.listeners and not self.connections:
            raise RuntimeError("no attach endpoint could be opened: " + "; ".join(
                f"{e}: {m}" for e, m in self.failed.items()))

    def _admit(self, listener: transports.Listener) -> str | None:
        """Room for one more client of `listener`? At MAX_CONNECTIONS, or with
        MAX_UNAUTHENTICATED clients that have not authenticated, the oldest of those makes
        room (so idle connections cannot lock the host out); else the new one is refused."""
        mine = [c for c in self.connections if c.listener is listener]
        waiting = [c for c in mine if not c.handshake.authenticated]
        if len(mine) < MAX_CONNECTIONS and len(waiting) < MAX_UNAUTHENTICATED:
            return None
        if waiting:
            min(waiting, key=lambda c: c.serial).close(
                "a newer client took its place before it authenticated")
            return None
        return f"{MAX_CONNECTIONS} authenticated connections already"

    def _add(self, conn: transports.Conn, listener=None) -> "Connection":
        connection = Connection(self, conn, listener)
        self.connections.add(connection)
        return connection

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop listening; give queued output (a session's last words, its exit status)
        up to `grace` seconds to reach the clients, then close them. The agent calls this
        after its loop has stopped, so it waits with its own select."""
        self.stats_worker.close()
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        for listener in self.listeners:
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


_serials = itertools.count()


class _Splice:
    """A data frame's bytes still in a session's pipe, in a connection's output queue
    after the frame's header: spliced to the client as the socket takes them. While any
    wait (`hold`), the session's output is held (nobody else may read that pipe) and the
    piece has its own dup of the pipe: the session may close its reader meanwhile.
    `on_tail(fd, tail)` runs when the piece's last `tail` bytes are at the front of the
    pipe, before any of them leave: None, they are spliced on; bytes, the session read
    them and they go as bytes."""
    __slots__ = ("fd", "left", "session", "held", "tail", "on_tail", "kept")

    def __init__(self, fd: int, count: int, session):
        self.fd = fd
        self.left = count
        self.session = session
        self.held = False
        self.tail = 0
        self.on_tail = None
        self.kept = False   # on_tail kept the tail: those bytes are the session's ring

    def hold(self) -> None:
        if not self.held:
            self.held = True
            self.fd = os.dup(self.fd)
            self.session.hold_pipes(self)

    def end(self) -> None:
        """Sent, or given up (the client is gone: what is left is read as usual, but for
        a tail the ring already has: that is dropped, so the ring does not get it twice)."""
        if self.left and self.kept and self.fd >= 0:
            try:
                os.read(self.fd, self.left)   # (a tail is at most 64 KiB: one read)
            except OSError:
                pass
        if self.held:
            self.held = False
            os.close(self.fd)
            self.session.release_pipes(self)
        self.fd = -1


class Connection:
    """One client's conversation: handshake, channels, bounded output."""

    def __init__(self, server: AttachServer, conn: transports.Conn,
                 listener: transports.Listener | None = None):
        self.server = server
        self.host = server.host
        self.loop = server.loop
        self.conn = conn
        self.listener = listener          # None for a line
        self.serial = next(_serials)      # order of arrival
        self.fd = conn.fileno()
        # Sockets are reliable: data frames skip the CRC there (lines keep it).
        self.checked = conn.persistent
        self.decoder = p.FrameDecoder(p.PREAUTH_MAX_PAYLOAD, accept_unchecked=not conn.persistent)
        self._preauth_in = 0              # bytes read since the conversation began
        self._bad_base = 0                # decoder.bad_frames when it began
        self._hellos = 0                  # hellos sent in this conversation
        self.handshake = self._new_handshake()
        self.channels: dict[int, object] = {}
        self._out: deque[bytes] = deque()
        self._out_size = 0
        self._writing = False
        self._retry = None
        self._held: set = set()           # sessions whose output waits for us to drain
        self._splice_timer = None         # a spliced frame the client has not taken yet
        self._pumps_due = False
        self._read_pauses: set = set()    # channels that asked us to stop reading for now
        self._hold_timer = None
        self.wrote_at = 0.0               # when the client last took bytes (monotonic)
        self.closed = False
        self.loop.add_reader(self.fd, self._on_readable)
        # A socket that does not authenticate in time is closed (lines wait for ever).
        self._auth_timer = None if conn.persistent else self.loop.call_later(
            AUTH_TIMEOUT, self._auth_expired)

    def _new_handshake(self) -> p.ServerHandshake:
        """A new conversation: not authenticated, so small frames and a small budget."""
        self.decoder.max_payload = p.PREAUTH_MAX_PAYLOAD
        self._preauth_in = 0
        self._bad_base = self.decoder.bad_frames
        self._hellos = 0
        return p.ServerHandshake(self.host.key, allow_unchecked=not self.conn.persistent)

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if not self.handshake.authenticated:
            self.close(f"no authentication within {AUTH_TIMEOUT:g}s")

    # -- input --------------------------------------------------------------------------
    def _on_readable(self) -> None:
        size = READ_SIZE
        if not self.handshake.authenticated:
            # little at a time, and on a socket little in all, until it authenticates
            size = PREAUTH_READ
            if not self.conn.persistent:
                size = max(1, min(size, PREAUTH_INPUT - self._preauth_in))
        try:
            data = self.conn.read(size)
        except OSError as err:
            self.close(f"read failed: {err}")
            return
        if data is None:
            return
        if not data:
            self._hung_up()
            return
        if not self.handshake.authenticated:
            self._preauth_in += len(data)
        messages = self.decoder.iter_feed(data)
        try:
            while not self.closed and not self._close_after_flush:
                try:
                    message = next(messages, None)
                except Exception as err:   # the decoder never should; never reach PID 1
                    log.exception("attach: decoder failed on %s", self.conn.name)
                    self._reset(f"decoder failed: {err}")
                    return
                if message is None:
                    break
                self._dispatch(message)
        finally:
            messages.close()
        if not self.closed:
            self._check_input_limits()

    def _dispatch(self, message: dict) -> None:
        try:
            self._handle(message)
        except p.ProtocolError as err:
            self._refuse(str(err), message.get("ch"))
        except Exception as err:   # a bug must cost one request, never the agent
            log.exception("attach: %s: %s failed", self.conn.name, clip(message.get("t")))
            channel = message.get("ch")
            if isinstance(channel, int) and self.handshake.authenticated:
                self.channels.pop(channel, None)
                self.send({"t": p.ERROR, "ch": channel, "msg": _printable(
                    f"internal error: {type(err).__name__}: {err}")})

    def _check_input_limits(self) -> None:
        """After a read: a peer that has not authenticated and keeps sending bad frames or
        more than its budget loses the conversation (a socket is closed, a line starts
        over with what it buffered forgotten); an authenticated socket client sending bad
        frames (a reliable stream does not corrupt) is dropped."""
        bad = self.decoder.bad_frames - self._bad_base
        if self.handshake.authenticated:
            if bad > MAX_BAD_FRAMES and not self.conn.persistent:
                self.close(f"{bad} bad frames")
            return
        if bad > PREAUTH_BAD_FRAMES:
            reason = f"{bad} bad frames before authenticating"
            if not self.conn.persistent:
                self.close(reason)
                return
            self.server.preauth_log.log(log, WARNING, "attach: %s: %s; starting over",
                                        self.conn.name, reason)
            self.decoder.reset()
            self._reset(reason)
        elif not self.conn.persistent and self._preauth_in >= PREAUTH_INPUT:
            self.close(f"sent {self._preauth_in} bytes without authenticating")

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
        if not self.closed and not self._read_pauses:
            self.loop.add_reader(self.fd, self._on_readable)

    def pause_reading(self, holder) -> None:
        """Stop reading this client until every holder has resumed: a copy-to whose
        writes lag behind what the client sends."""
        if not self._read_pauses and not self.closed and self._retry is None:
            self.loop.remove_reader(self.fd)
        self._read_pauses.add(holder)

    def reading_paused(self) -> bool:
        """Whether a copy-to that lags has us not reading this client for now."""
        return bool(self._read_pauses)

    def resume_reading(self, holder) -> None:
        if holder not in self._read_pauses:
            return
        self._read_pauses.discard(holder)
        if not self._read_pauses and not self.closed and self._retry is None:
            self.loop.add_reader(self.fd, self._on_readable)

    def _refuse(self, reason: str, channel) -> None:
        reason = _printable(reason)
        authenticated = self.handshake.authenticated
        if authenticated:
            log.warning("attach: %s: %s", self.conn.name, reason)
            if not isinstance(channel, int) or isinstance(channel, bool):
                channel = None   # not a channel (and echoed, maybe too big to send)
            self.send({"t": p.ERROR, "ch": channel, "msg": reason})
            return
        self.server.preauth_log.log(log, WARNING, "attach: %s: %s", self.conn.name,
                                    reason)
        self._send_preauth({"t": p.ERROR, "ch": None, "msg": reason})
        if self.closed:
            return
        if self.conn.persistent:
            self._reset(reason)
        else:
            self._close_after_flush = True
            self.loop.remove_reader(self.fd)   # nothing more is read from it
            self._flush()

    _close_after_flush = False

    def _send_preauth(self, message: dict) -> None:
        """Send to a peer that has not authenticated, within PREAUTH_OUTPUT: one that does
        not read what it is sent loses the conversation (a line's queue is dropped)."""
        frame = p.encode(message)
        if self._out_size + len(frame) > PREAUTH_OUTPUT:
            reason = (f"{self._out_size} bytes queued before authentication (the peer "
                      "does not read)")
            if not self.conn.persistent:
                self.close(reason)
                return
            self.server.preauth_log.log(log, WARNING, "attach: %s: %s; dropped",
                                        self.conn.name, reason)
            self._reset(reason)
        self.send_bytes(frame)

    def _handle(self, message: dict) -> None:
        kind = message["t"]
        if kind == p.CONNECT:
            if self.handshake.authenticated or self.channels:
                self._reset("the client started a new conversation")
            elif self._hellos and not self.conn.persistent:
                # A socket has one peer: one hello before it authenticates. (A line may
                # get a new host at any time, which starts with its own connect.)
                raise p.ProtocolError("connect again before authenticating")
            self._hellos += 1
            self._send_preauth(self.handshake.start())
            return
        if not self.handshake.authenticated:
            for reply in self.handshake.receive(message):
                self._send_preauth(reply)
            if self.handshake.authenticated:
                self.decoder.max_payload = p.MAX_PAYLOAD
                self._bad_base = self.decoder.bad_frames
                log.info("attach: %s authenticated", self.conn.name)
            return
        channel = message.get("ch")
        if not isinstance(channel, int) or isinstance(channel, bool):
            raise p.ProtocolError(f"{clip(kind)}: field 'ch' must be int")
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
                self.send({"t": p.ERROR, "ch": channel, "msg": describe_error(err)})
            return
        target = self.channels.get(channel)
        if target is None:
            if kind in (p.DATA, p.EOF, p.CLOSE):
                return   # late traffic for a channel that just ended
            raise p.ProtocolError(f"unknown message type {clip(kind)}")
        if kind == p.DATA:
            target.on_data(p.require(message, "d", bytes))
        elif kind == p.EOF:
            target.on_eof()
        elif kind == p.CLOSE:
            self.channels.pop(channel, None)
            target.on_detach()
        else:
            raise p.ProtocolError(f"unknown message type {clip(kind)}")

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

    def can_splice(self) -> bool:
        """Data frames may be spliced to us: unchecked frames on a socket."""
        return not self.checked and self.conn.sock is not None and not self.closed

    def send_splice(self, channel: int, stream: str, fd: int, count: int, session,
                    tail: int = 0, on_tail=None) -> tuple[int, bool]:
        """Queue data frames of bytes waiting in the pipe `fd`: all `count` of them when
        they fit one frame, else as many whole frames as they fill (the rest waits for
        the next call: no runt frame). They are spliced to the client, never read by us;
        `on_tail` (see _Splice) runs before the last `tail` of them leave the pipe.
        Returns (the bytes taken, whether they have all gone at once); if not, `session`'s
        output is held until they have (HOLD_SECONDS without that: the client is dropped)."""
        chunk = p.UNCHECKED_DATA_CHUNK
        if count > chunk:
            count -= count % chunk
        pieces = []
        for start in range(0, count, chunk):
            size = min(count - start, chunk)
            header = p.data_header(channel, size, stream)
            pieces.append(_Splice(fd, size, session))
            self._out.append(header)
            self._out.append(pieces[-1])
            self._out_size += len(header) + size
        if on_tail is not None and tail:
            pieces[-1].tail = min(tail, pieces[-1].left)
            pieces[-1].on_tail = on_tail
        if not self._writing:
            self._flush()
        if pieces[-1].fd < 0:
            return count, True
        for piece in pieces:
            if piece.fd >= 0:
                piece.hold()
        if self._splice_timer is None and not self.closed:
            self._splice_timer = self.loop.call_later(HOLD_SECONDS, self._splice_stalled)
        return count, False

    def _splice_stalled(self) -> None:
        self._splice_timer = None
        if any(type(piece) is _Splice for piece in self._out):
            self._drop_slow(f"did not take a spliced frame within {HOLD_SECONDS:g}s")

    def _splice(self, piece: _Splice) -> bool:
        """Splice what the socket takes of `piece`; True when all of it has gone, or it
        has become bytes (`on_tail`) that are now first in the queue."""
        while piece.left:
            size = piece.left
            if piece.on_tail is not None:
                if size > piece.tail:
                    size -= piece.tail   # up to the tail
                else:
                    on_tail, piece.on_tail = piece.on_tail, None
                    try:
                        data = on_tail(piece.fd, size)
                    except OSError as err:
                        self.close(f"a spliced frame's bytes could not be kept: {err}")
                        return False
                    if data is not None:
                        self._out[0] = data   # the same bytes, read: written as bytes
                        piece.left = 0
                        piece.end()
                        return True
                    piece.kept = True
            try:
                n = os.splice(piece.fd, self.fd, size,
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as err:
                self.close(f"write failed: {err}")
                return False
            if n == 0:   # cannot be: the bytes were counted in the pipe
                self.close("a spliced frame's bytes went missing from the session's pipe")
                return False
            piece.left -= n
            self._out_size -= n
            self.wrote_at = time.monotonic()
        self._out.popleft()
        piece.end()
        if self._splice_timer is not None and not any(
                type(other) is _Splice for other in self._out):
            self._splice_timer.cancel()
            self._splice_timer = None
        return True

    @property
    def backlog(self) -> int:
        return self._out_size

    def _flush(self) -> None:
        out = self._out
        while out:
            if type(out[0]) is _Splice:
                if not self._splice(out[0]):
                    break
                continue
            batch = []
            for piece in itertools.islice(out, WRITE_BATCH):
                if type(piece) is _Splice:
                    break
                batch.append(piece)
            try:
                n = self.conn.writev(batch)
            except OSError as err:
                self._hung_up() if self.conn.persistent else self.close(f"write failed: {err}")
                return
            if n == 0:
                break
            self.wrote_at = time.monotonic()
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
        if self.closed:
            return
        # Below the low-water mark the sessions we hold go on, drained or not: a client
        # that stops reading from here holds nothing (it is dropped at OUTPUT_LIMIT).
        if self._held and self._out_size < LOW_WATER:
            self._release()
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
        self._schedule_pumps()

    def _schedule_pumps(self) -> None:
        """Producers (copy-from) refill on the loop's next round, never from inside a
        flush: called from here they recursed, pump -> send -> flush -> pump, once per
        frame, until RecursionError."""
        if self._pumps_due or not self.has_room():
            return
        if any(hasattr(channel, "pump") for channel in self.channels.values()):
            self._pumps_due = True
            self.loop.call_soon(self._run_pumps)

    def _run_pumps(self) -> None:
        self._pumps_due = False
        for channel in list(self.channels.values()):
            pump = getattr(channel, "pump", None)
            if pump is not None and self.has_room() and not self.closed:
                pump()

    # -- flow control: a client that keeps up may pause a session for a moment ---------
    def has_room(self) -> bool:
        """A producer (copy-from) may queue more: the backlog is below LOW_WATER."""
        return self._out_size < LOW_WATER

    def hold_if_behind(self, session) -> None:
        """Our backlog is over HOLD_AT: pause `session`'s output until we drain below
        LOW_WATER, but for at most HOLD_SECONDS, then drop this client instead."""
        if self._out_size <= HOLD_AT or session in self._held or self.closed:
            return
        self._held.add(session)
        session.pause_output(self)
        if self._hold_timer is None:
            self._hold_timer = self.loop.call_later(HOLD_SECONDS, self._hold_expired)

    def _release(self) -> None:
        held, self._held = self._held, set()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        for session in held:
            session.resume_output(self)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        if self._held and self._out_size >= LOW_WATER:
            self._drop_slow(f"did not drain its backlog within {HOLD_SECONDS:g}s")

    def _drop_slow(self, why: str = "") -> None:
        reason = (f"dropped: {self._out_size} bytes of output queued "
                  f"({why or f'over the {OUTPUT_LIMIT}-byte limit'}; the client is too "
                  "slow or stopped reading)")
        self._clear_output()
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
        self._clear_output()
        self._close_after_flush = False

    def _clear_output(self) -> None:
        """Forget what is queued; spliced frames still in a pipe are given up (the session
        reads on)."""
        for piece in self._out:
            if type(piece) is _Splice:
                piece.end()
        self._out.clear()
        self._out_size = 0
        if self._splice_timer is not None:
            self._splice_timer.cancel()
            self._splice_timer = None

    def close(self, reason: str) -> None:
        if self.closed:
            return
        if self.handshake.authenticated or self.channels:
            log.info("attach: %s closed: %s", self.conn.name, reason)
        else:
            self.server.preauth_log.log(log, INFO, "attach: %s closed: %s",
                                        self.conn.name, reason)
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
        session = self.host.sessions.get(sid)
        if session is None:
            raise KeyError(f"session {clip(sid)} is invalid: no such session")
        return session

    def ok(self, channel: int, **fields) -> None:
        self.send({"t": p.OK, "ch": channel, **fields})

    def _req_ping(self, channel: int, message: dict) -> None:
        self.ok(channel, data=message.get("data"), time=time.time())

    def _req_list(self, channel: int, message: dict) -> None:
        after = _after(message)
        if after is None:   # a version 1 client: everything in one reply, if it fits
            states = [stats.list_state(session)
                      for _, session in stats.sessions_after(self.host.sessions, None)]
            self._reply_whole(channel, p.LIST, len(states), {"sessions": states})
            return
        states, more = stats.list_page(self.host.sessions, after)
        self.ok(channel, sessions=states, next=states[-1]["id"] if more else None)

    def _reply_whole(self, channel: int, kind: str, count: int, fields: dict) -> None:
        """The reply to a request for every session at once; one that does not fit a
        frame is refused with what to do instead."""
        try:
            frame = p.encode({"t": p.OK, "ch": channel, **fields})
        except p.ProtocolError:
            raise ValueError(f"{kind}: the {count} sessions do not fit one reply (a frame "
                             f"holds {p.MAX_PAYLOAD >> 20} MiB): ask for them in pages, "
                             "with 'after' (docs/attach-protocol.md)") from None
        self.send_bytes(frame)

    def _req_resize(self, channel: int, message: dict) -> None:
        session = self._session(message)
        rows, cols = p.require(message, "rows", int), p.require(message, "cols", int)
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise ValueError(f"window size {rows}x{cols} is out of range")
        if not session.config.tty:
            raise ValueError(f"session {session.id} has no tty to resize")
        session.resize(rows, cols)
        self.ok(channel)

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
        self.ok(channel, signal=signum)

    def _req_close_stdin(self, channel: int, message: dict) -> None:
        self._session(message).close_stdin()
        self.ok(channel)

    def _req_unblock(self, channel: int, message: dict) -> None:
        session = self._session(message)
        session.unblock()
        if session.phase is Phase.FAILED:
            raise ValueError(f"launch failed with: {session.config.started}")
        self.ok(channel)

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
        if cfg.common.id in self.host.sessions:
            raise ValueError(f"session {cfg.common.id} already exists")
        session = self.host.exec_session(cfg)
        if session.phase is not Phase.RUNNING:
            raise ValueError(f"exec {clip(cfg.cmd.path)}: "
                             f"{cfg.started if session.phase is Phase.FAILED else 'did not start'}")
        if message.get("attach", True) is False:
            self.ok(channel, id=session.id, pid=session.pid, tty=cfg.tty)
            self.finish(channel)
            return
        self._open_attach(channel, session, stdin=True, replay=True,
                          extra={"id": session.id, "pid": session.pid})

    def _req_copy_to(self, channel: int, message: dict) -> None:
        path = _request_path(message)
        self.channels[channel] = CopyToChannel(self, channel, self.host.root, path,
                                               mode=message.get("mode"),
                                               as_tar=bool(message.get("tar")))

    def _req_copy_from(self, channel: int, message: dict) -> None:
        path = _request_path(message)
        self.channels[channel] = CopyFromChannel(self, channel, self.host.root, path,
                                                 as_tar=message.get("tar"))

    def _req_stats(self, channel: int, message: dict) -> None:
        """Collected on the server's stats worker, off the loop; the channel is taken
        until the reply (a `close` on it drops the reply)."""
        after = _after(message)
        if sum(type(c) is _Pending for c in self.channels.values()) >= MAX_PENDING_STATS:
            raise ValueError(f"stats: {MAX_PENDING_STATS} of this client's stats requests "
                             "are still being answered; wait for their replies")
        items = stats.sessions_after(self.host.sessions, after)
        more = False
        if after is not None:
            count = stats.stats_page(items)
            more, items = count < len(items), items[:count]
        figures = stats.snapshot(items)
        pending = self.channels[channel] = _Pending()

        def done(result) -> None:
            if self.closed or self.channels.get(channel) is not pending:
                return   # the client went away, or closed the channel
            del self.channels[channel]
            if isinstance(result, BaseException):
                log.error("attach: stats failed: %s: %s", type(result).__name__, result)
                self.send({"t": p.ERROR, "ch": channel, "msg": _printable(
                    f"stats: internal error: {type(result).__name__}: {result}")})
            elif after is None:
                try:
                    self._reply_whole(channel, p.STATS, len(figures), result)
                except ValueError as err:
                    self.send({"t": p.ERROR, "ch": channel, "msg": str(err)})
            else:
                self.ok(channel, **result, next=items[-1][0] if more else None)
        self.server.stats_worker.submit(lambda: stats.collect_stats(figures), done)


class _Pending:
    """The channel of a request answered later (`stats`, collected off the loop): taken
    until then, so the client cannot reuse it meanwhile."""

    def on_data(self, data) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_detach(self) -> None:
        pass


def _after(message: dict) -> str | None:
    """A paged `list` or `stats`: the ID the page starts after ("" for the first page);
    None for a request of every session at once (version 1)."""
    if message.get("after") is None:
        return None
    return p.require(message, "after", str)


PATH_LIMIT = 4096             # bytes of a copy path, an exec's program or dir (PATH_MAX)
NAME_LIMIT = 256              # bytes of an exec's user or group (LOGIN_NAME_MAX)


def _request_path(message: dict) -> str:
    """A copy request's path, checked before anything is opened or created: a NUL (which
    no system call takes) or a path over PATH_MAX is refused with a clear error."""
    path = p.require(message, "path", str)
    if not path:
        raise ValueError(f"{message['t']}: the path is empty")
    if "\0" in path:
        raise ValueError(f"{message['t']}: the path {clip(path)} contains a NUL byte")
    if len(path.encode(errors="surrogateescape")) > PATH_LIMIT:
        raise ValueError(f"{message['t']}: the path is longer than {PATH_LIMIT} bytes")
    return path


def _printable(text: str) -> str:
    """A refusal's text for the log and the reply: at most REASON_LIMIT characters, with
    control characters escaped (peer text inside it is clipped where it is quoted)."""
    cut = escape_unprintable(text[:REASON_LIMIT])
    return cut + "..." if len(text) > REASON_LIMIT else cut


def _exec_config(message: dict):
    import secrets
    from tether.config import Cmd, Common, SessionConfig, check_id
    args = p.require(message, "args", list)
    if not args or not all(isinstance(a, str) for a in args):
        raise ValueError("exec: args must be a non-empty list of strings")
    env = message.get("env")
    if env is None:
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise ValueError("exec: env must be a list of NAME=VALUE strings")
    sid = check_id(message.get("id") or secrets.token_hex(16), "exec: id")
    tty = bool(message.get("tty"))
    directory = str(message.get("dir") or "")
    user, group = str(message.get("user") or ""), str(message.get("group") or "")
    # Names no system call takes are refused here, before a session exists: a launch
    # error quotes them whole in the session's `started`, and a finished exec is kept
    # (and listed) for a while, so a few of 600 KB made every `list` reply too big.
    for what, text, limit in (("program path", args[0], PATH_LIMIT),
                              ("dir", directory, PATH_LIMIT),
                              ("user", user, NAME_LIMIT), ("group", group, NAME_LIMIT)):
        if len(text.encode(errors="surrogateescape")) > limit:
            raise ValueError(f"exec: the {what} {clip(text)} is longer than {limit} bytes")
    return SessionConfig(
        common=Common(id=sid, name=str(message.get("name") or sid)),
        cmd=Cmd(path=args[0], args=args, env=env, dir=directory),
        tty=tty, attach=True, open_stdin=message.get("stdin", True) is not False,
        user=user, group=group)
