"""The attach server's channel kinds: a client attached to a session, a file (or tar
stream) copied in, a file (or a directory as tar) copied out.

A channel belongs to one `Connection` (tether/attach/server.py), which gives it `send`,
`send_parts`, `ok`, `finish`, `checked` (whether data frames carry a CRC), `channels`
(the connection's open channels), and flow control: `hold_if_behind(session)` pauses a
session's output while this client's backlog is high, `has_room()` says whether a
producer may queue more. The connection calls a channel's `on_data(bytes)`, `on_eof()`
and `on_detach()` with what the client sends, and `pump()` (when the channel has one)
when its backlog drains. A copy-to that writes slower than the client sends stops the
connection's reading for a while (`pause_reading(holder)` / `resume_reading(holder)`,
`reading_paused()`); `wrote_at` is when the client last took bytes (time.monotonic).

A copy's file work blocks (a slow disk, a hung filesystem), so it runs on a worker
thread of its own (`copyfiles.py` holds that half), never on the loop: bytes go between
the two through bounded queues, and the worker posts its results to the loop.
"""
from __future__ import annotations

import tarfile
import threading
import time
from collections import deque

from tether.attach import copyfiles
from tether.attach import protocol as p
from tether.console import clip
from tether.log import get_logger
from tether.sessions import Phase

log = get_logger("tether.attach")

MAX_COPIES = 16               # copies running at once, each on a worker thread
COPY_IDLE_TIMEOUT = 60.0      # seconds a copy's worker may wait on its client: then stopped
OUTBOX_LIMIT = 4 << 20        # copy-from: read ahead of the connection at most this much
INBOX_HIGH = 8 << 20          # copy-to: the client's bytes not yet written: over this,
INBOX_LOW = 2 << 20           # stop reading the client until down to this
_copy_slots = threading.BoundedSemaphore(MAX_COPIES)


def describe_error(err: Exception) -> str:
    """An error as the client reads it: the message, the path of an OSError."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


class AttachChannel:
    """A client on a session: output listener, stdin source."""

    def __init__(self, connection, channel: int, session):
        self.connection = connection
        self.channel = channel
        self.session = session
        self.stdin = True
        self.attached = False
        self.holding = False     # told the client `hold`: the session's stdin is behind

    def start(self, *, stdin: bool, replay: bool, extra: dict | None = None) -> None:
        connection, channel, session = self.connection, self.channel, self.session
        self.stdin = stdin
        connection.send({"t": p.OK, "ch": channel, "tty": bool(session.config.tty),
                         "running": bool(session.running), **(extra or {})})
        if replay:
            for stream, data in session.output.replay():
                if not self._forward(stream, data):
                    return
        if connection.channels.get(channel) is not self:
            return   # the reply or the replay cost the client its conversation
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
        if self.attached:
            connection.hold_if_behind(self.session)
        return True

    # listener interface (OutputFanout)
    def on_output(self, stream: str, data: bytes) -> None:
        self._forward(stream, data)

    def can_splice(self) -> bool:
        return self.connection.can_splice()

    def splice_output(self, stream: str, fd: int, count: int, session, tail: int = 0,
                      on_tail=None) -> tuple[int, bool]:
        """Send bytes waiting in the pipe `fd`, spliced, as data frames: (how many of
        `count` it took, whether all of those have gone; if not, the session's output is
        held until they have). `on_tail(fd, n)` is called before the last `tail` bytes
        leave the pipe (see Connection.send_splice)."""
        return self.connection.send_splice(self.channel, stream, fd, count, session, tail,
                                           on_tail)

    def on_close(self) -> None:
        self.attached = False
        session = self.session
        if self.connection.channels.get(self.channel) is not self:
            return
        self.connection.send({"t": p.EXIT, "ch": self.channel,
                              "status": session.config.exit_status,
                              "code": session.exit_code(),
                              "signal": session.exit_signal})
        self.connection.finish(self.channel)

    # from the client
    def on_data(self, data: bytes) -> None:
        # Input the process has not read piles up in the session: past its high mark the
        # client is told to `hold` its input until `go` (it waits in the client, not
        # here; what a client that ignores this sends past the session's limit is lost).
        if self.stdin and not self.session.write_stdin(data) and not self.holding:
            self.holding = True
            self.connection.send({"t": p.HOLD, "ch": self.channel})
            self.session.when_stdin_drained(self._stdin_drained)

    def _stdin_drained(self) -> None:
        self.holding = False
        if self.connection.channels.get(self.channel) is self:
            self.connection.send({"t": p.GO, "ch": self.channel})

    def on_eof(self) -> None:
        pass   # the client has no more input; the process's stdin stays open (detach rule)

    def on_detach(self) -> None:
        if self.attached:
            self.session.output.unsubscribe(self)
            self.attached = False


# -- copies: the loop side, and the bridge to the worker thread ---------------------------------
class Cancelled(Exception):
    """The channel went away: the worker stops where it is."""


class CopyWorker:
    """Runs `work()` on a daemon thread. `post(callback)` runs callback on the loop unless
    the copy was cancelled; an exception in `work` reaches `on_error(text)` on the loop.
    At most MAX_COPIES run at once (a worker stuck in a hung filesystem keeps its slot)."""

    def __init__(self, loop, name: str, work, on_error):
        if not _copy_slots.acquire(blocking=False):
            raise copyfiles.CopyError(f"{MAX_COPIES} copies are already running; try again "
                                      "when one has finished")
        self.loop = loop
        self.on_error = on_error
        self.cancelled = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)

    def start(self) -> None:
        try:
            self.thread.start()
        except BaseException:
            _copy_slots.release()
            raise

    def post(self, callback) -> None:
        with self._lock:
            if not self.cancelled:
                self.loop.call_soon_threadsafe(callback)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True

    def _run(self, work) -> None:
        try:
            work()
        except Cancelled:
            pass
        except (ValueError, OSError, tarfile.TarError, EOFError) as err:   # CopyError too
            text = describe_error(err)
            self.post(lambda: self.on_error(text))
        except Exception as err:   # noqa: BLE001 - a bug costs this copy, never the agent
            log.exception("attach: %s failed", self.thread.name)
            text = f"internal error: {type(err).__name__}: {err}"
            self.post(lambda: self.on_error(text))
        finally:
            _copy_slots.release()


class Outbox:
    """copy-from's bytes, worker to loop: `write` (worker) waits while OUTBOX_LIMIT bytes
    are queued; `take` (loop) hands one chunk to the connection."""

    def __init__(self, wake, limit: int = OUTBOX_LIMIT):
        self._wake = wake             # worker side: have the loop pump
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._closed = False
        self._cancelled = False
        self.waiting_since: float | None = None   # the worker waits for the client to take

    def write(self, data: bytes) -> None:
        with self._cond:
            while self._size >= self._limit and not self._cancelled:
                if self.waiting_since is None:
                    self.waiting_since = time.monotonic()
                self._cond.wait()
            self.waiting_since = None
            if self._cancelled:
                raise Cancelled()
            first = not self._chunks
            self._chunks.append(data)
            self._size += len(data)
        if first:
            self._wake()

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self._wake()

    def take(self) -> tuple[bytes | None, bool]:
        """(a chunk or None, whether everything has been taken)."""
        with self._cond:
            if not self._chunks:
                return None, self._closed
            chunk = self._chunks.popleft()
            self._size -= len(chunk)
            self._cond.notify()
            return chunk, False

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._chunks.clear()
            self._cond.notify_all()


class Inbox:
    """copy-to's bytes, loop to worker: `put` (loop) never waits and returns what is
    queued; `read` (worker) waits for bytes, and calls `drained()` when the queue falls
    to INBOX_LOW from above."""

    def __init__(self, drained):
        self._drained = drained
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._cancelled = False
        self.waiting_since: float | None = None   # the worker waits for the client's bytes

    def put(self, data: bytes) -> int:
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify()
            return self._size

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._chunks.clear()
            self._cond.notify()

    def read(self, size: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self._eof and not self._cancelled:
                if self.waiting_since is None:
                    self.waiting_since = time.monotonic()
                self._cond.wait()
            self.waiting_since = None
            if self._cancelled:
                raise Cancelled()
            if not self._chunks:
                return b""
            chunk = self._chunks[0]
            if 0 <= size < len(chunk):
                self._chunks[0] = chunk[size:]
                chunk = chunk[:size]
            else:
                self._chunks.popleft()
            before = self._size
            self._size -= len(chunk)
            crossed = before > INBOX_LOW >= self._size
        if crossed:
            self._drained()
        return chunk


class IdleWatch:
    """Stops a copy whose worker has waited on the client for COPY_IDLE_TIMEOUT seconds:
    a copy-to's client sent nothing, a copy-from's client took nothing (the connection
    wrote it nothing: a slow line still counts as taking). A copy holds one of the
    MAX_COPIES slots, and idle clients holding them all locked every copy out. Checked a
    few times per timeout, on the loop. For a copy-to, the time the connection's reading
    is paused (for a copy-to that lags, maybe another one) does not count."""

    def __init__(self, connection, queue, on_idle, *, sending: bool):
        self.connection = connection
        self.queue = queue                # Inbox or Outbox: its `waiting_since`
        self.on_idle = on_idle
        self.sending = sending            # copy-from: the client's progress is our writes
        self._paused_at = 0.0
        self._timer = None
        self._arm()

    def _arm(self) -> None:
        self._timer = self.connection.loop.call_later(COPY_IDLE_TIMEOUT / 4, self._check)

    def _check(self) -> None:
        now = time.monotonic()
        if self.sending:
            progress = self.connection.wrote_at
        else:
            if self.connection.reading_paused():
                self._paused_at = now
            progress = self._paused_at
        since = self.queue.waiting_since
        if since is not None and now - max(since, progress) >= COPY_IDLE_TIMEOUT:
            self._timer = None
            self.on_idle()
            return
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def idle_reason(what: str) -> str:
    return (f"the client {what} for {COPY_IDLE_TIMEOUT:g}s: the copy was stopped (it held "
            f"one of the {MAX_COPIES} copy slots)")


class CopyToChannel:
    """Data in, a file (written to a temporary name, put in place at the end) or a tar
    stream extracted under a directory; the file work on a worker thread."""

    def __init__(self, connection, channel: int, root: str, path: str, *,
                 mode, as_tar: bool):
        self.connection = connection
        self.channel = channel
        self.path = path
        self.paused = False
        self.inbox = Inbox(drained=lambda: self.worker.post(self._drained))
        mode = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0o644
        self.worker = CopyWorker(connection.loop, f"copy-to {path}",
                                 lambda: self._work(root, path, mode, as_tar), self._failed)
        self.worker.start()
        self.idle = IdleWatch(connection, self.inbox, self._idle, sending=False)

    def _ours(self) -> bool:
        return self.connection.channels.get(self.channel) is self

    # on the worker thread
    def _work(self, root: str, path: str, mode: int, as_tar: bool) -> None:
        guard = copyfiles.Guard(root)
        try:
            target = (copyfiles.TarTarget(guard, path) if as_tar
                      else copyfiles.FileTarget(guard, path, mode))
            self.worker.post(self._opened)
            source = copyfiles.Digesting(self.inbox)
            if as_tar:
                target.extract(source)
                while source.read(copyfiles.CHUNK):
                    pass   # what follows the end of the archive: read to the client's eof
            else:
                try:
                    while chunk := source.read(copyfiles.CHUNK):
                        target.write(chunk)
                    target.commit()
                except BaseException:
                    target.discard()
                    raise
            size, digest = source.size, source.digest.hexdigest()
            self.worker.post(lambda: self._done(size, digest))
        finally:
            guard.close()

    # on the loop
    def _opened(self) -> None:
        if self._ours():
            self.connection.send({"t": p.OK, "ch": self.channel})

    def _done(self, size: int, digest: str) -> None:
        self.idle.stop()
        if self._ours():
            self.connection.ok(self.channel, size=size, sha256=digest)
            self.connection.finish(self.channel)
        self._resume()

    def _failed(self, reason: str) -> None:
        self.idle.stop()
        if self._ours():
            self.connection.send({"t": p.ERROR, "ch": self.channel, "msg": reason})
            self.connection.channels.pop(self.channel, None)
        self.inbox.cancel()
        self._resume()

    def _idle(self) -> None:
        reason = idle_reason("sent nothing")
        log.warning("attach: copy-to %s: %s", clip(self.path), reason)
        self.worker.cancel()     # the worker stops where it waits, the partial file goes
        self._failed("copy-to: " + reason)

    def _drained(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.connection.resume_reading(self)

    def on_data(self, data: bytes) -> None:
        if self.inbox.put(data) > INBOX_HIGH and not self.paused:
            self.paused = True
            self.connection.pause_reading(self)

    def on_eof(self) -> None:
        self.inbox.close()

    def on_detach(self) -> None:
        self.idle.stop()
        self.worker.cancel()
        self.inbox.cancel()
        self._resume()


class CopyFromChannel:
    """A file, or a directory as a tar stream made as it goes, out to the client as the
    client keeps up; read on a worker thread."""

    def __init__(self, connection, channel: int, root: str, path: str, *, as_tar):
        self.connection = connection
        self.channel = channel
        self.path = path
        self.sending = False
        self.outbox = Outbox(wake=lambda: self.worker.post(self.pump))
        self.worker = CopyWorker(connection.loop, f"copy-from {path}",
                                 lambda: self._work(root, path, as_tar), self._failed)
        self.worker.start()
        self.idle = IdleWatch(connection, self.outbox, self._idle, sending=True)

    def _ours(self) -> bool:
        return self.connection.channels.get(self.channel) is self

    # on the worker thread
    def _work(self, root: str, path: str, as_tar) -> None:
        guard = copyfiles.Guard(root)
        try:
            source = copyfiles.Source(guard, path, as_tar)
            try:
                info = {"kind": source.kind, "size": source.size, "mode": source.mode}
                self.worker.post(lambda: self._opened(info))
                source.send(self.outbox.write)
            finally:
                source.close()
            self.outbox.close()
        finally:
            guard.close()

    # on the loop
    def _opened(self, info: dict) -> None:
        if self._ours():
            self.connection.ok(self.channel, **info)
            self.sending = True
            self.pump()

    def _failed(self, reason: str) -> None:
        self.sending = False
        self.idle.stop()
        if self._ours():
            self.connection.send({"t": p.ERROR, "ch": self.channel, "msg": reason})
            self.connection.channels.pop(self.channel, None)

    def pump(self) -> None:
        connection = self.connection
        if not self.sending:
            return
        if not self._ours():
            return self.on_detach()
        while connection.has_room():
            chunk, finished = self.outbox.take()
            if chunk is None:
                if finished:
                    self.sending = False
                    self.idle.stop()
                    connection.send({"t": p.EOF, "ch": self.channel})
                    connection.finish(self.channel)
                return
            parts, size = p.data_parts(self.channel, chunk, "stdout", connection.checked)
            if not connection.send_parts(parts, size):
                return

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def _idle(self) -> None:
        reason = idle_reason("took nothing")
        log.warning("attach: copy-from %s: %s", clip(self.path), reason)
        self.on_detach()
        if self._ours():
            self.connection.send({"t": p.ERROR, "ch": self.channel,
                                  "msg": "copy-from: " + reason})
            self.connection.channels.pop(self.channel, None)

    def on_detach(self) -> None:
        self.sending = False
        self.idle.stop()
        self.worker.cancel()
        self.outbox.cancel()
