"""The agent's console: the log's format, level and rate, where the log goes, and session
output echoed onto it. The console is stderr: a VM's serial console, the sandbox's
terminal, or the log port the log was redirected to.

PID 1 must never block on its console (a stderr pipe nobody reads, a serial line with
flow control held): every byte goes through one `ConsoleWriter`, which writes without
blocking from a bounded buffer, drops the oldest output when the console does not keep
up, and says so on the console once it moves again. Text a peer sent is clipped
(`clip`) before it reaches a log line, and floods of one kind of warning are rate
limited (`RateLimit`).
"""
from __future__ import annotations

import os
import stat
import sys
import time
from _thread import RLock, get_ident   # threading's, without importing it (startup)
from _collections import deque   # collections' deque, without importing collections (startup)

from tether.log import INFO, configure, get_logger

log = get_logger("tether.agent")

CONSOLE_LIMIT = 1 << 20       # bytes of console output held for a console that is behind


class ConsoleWriter:
    """Bytes to a console fd without ever blocking the caller, from any thread.

    A regular file is written directly (a file does not block). A pipe or a tty is
    reopened through /proc/self/fd, so that O_NONBLOCK is set on a file description of
    our own, not on one shared with the sandbox's parent or the user's shell; a socket is
    written with MSG_DONTWAIT. Where neither works (no /proc yet, a virtio port that can
    be opened once), the fd's own description is made non-blocking: in a VM the console
    is the agent's alone.

    What cannot be written now waits in a buffer of at most `limit` bytes, flushed when
    the fd is writable (on the loop, once `attach_loop` was called) or at the next write;
    past the limit the oldest output is dropped and counted in `dropped`, and a line
    saying how much was lost goes out before what follows the gap.
    """

    def __init__(self, fd: int = 2, limit: int = CONSOLE_LIMIT):
        self.limit = limit
        self.dropped = 0
        self._lock = RLock()
        self._pending: deque = deque()
        self._pending_size = 0
        self._gap = 0                 # bytes dropped since the last notice went out
        self._loop = None
        self._waiting = False         # a writer callback is registered on the loop
        self._fd = -1
        self._sock = None
        self._direct = False
        self._open(fd)

    # -- the fd -----------------------------------------------------------------------------
    def _open(self, fd: int) -> None:
        self._source = fd
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            self._fd = -1                 # no console at all: everything is dropped
            return
        if stat.S_ISREG(mode):
            self._fd, self._direct = fd, True
            return
        if stat.S_ISSOCK(mode):
            import socket
            self._sock = socket.socket(fileno=os.dup(fd))
            self._fd = self._sock.fileno()
            return
        try:
            self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK
                               | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            self._fd = os.dup(fd)
            os.set_inheritable(self._fd, False)
            os.set_blocking(self._fd, False)

    def reopen(self, fd: int = 2) -> None:
        """The console fd now leads elsewhere (the log was redirected): follow it."""
        with self._lock:
            self.flush()
            self._release()
            self._open(fd)

    def _release(self) -> None:
        loop, fd = self._loop, self._fd
        if self._waiting and loop is not None:
            self._waiting = False
            if get_ident() == loop.thread_id:
                loop.remove_writer(fd)
            else:
                loop.call_soon_threadsafe(lambda: loop.remove_writer(fd))
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._fd >= 0 and not self._direct:
            os.close(self._fd)
        self._fd = -1
        self._direct = False

    def close(self) -> None:
        with self._lock:
            self._release()
            self.dropped += self._pending_size
            self._pending.clear()
            self._pending_size = 0

    @property
    def pending(self) -> int:
        return self._pending_size

    # -- writing ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if self._fd < 0:
                self.dropped += len(data)
                return
            if self._direct:
                self._write_direct(data)
                return
            self._pending.append(bytes(data))
            self._pending_size += len(data)
            if self._pending_size > self.limit:
                self._drop_oldest()
            self.flush()

    def _write_direct(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:       # a full disk: what did not fit is lost, the agent goes on
            self.dropped += len(view)

    def _drop_oldest(self) -> None:
        # room is left for the notice that tells of the gap
        while self._pending_size > self.limit - 128 and self._pending:
            chunk = self._pending.popleft()
            self._pending_size -= len(chunk)
            self.dropped += len(chunk)
            self._gap += len(chunk)

    def _send(self, chunk) -> int:
        if self._sock is not None:
            import socket
            return self._sock.send(chunk, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        return os.write(self._fd, chunk)

    def flush(self) -> None:
        """Write what the console takes now; arm the loop for the rest."""
        with self._lock:
            try:
                while self._pending:
                    if self._gap:
                        notice = (f"\ntether: {self._gap} bytes of console output dropped "
                                  "(the console was not being read)\n").encode()
                        self._gap = 0
                        self._pending.appendleft(notice)
                        self._pending_size += len(notice)
                    chunk = self._pending[0]
                    n = self._send(chunk)
                    self._pending_size -= n
                    if n < len(chunk):
                        self._pending[0] = chunk[n:]
                        break
                    self._pending.popleft()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:   # the console is gone: drop what waits, keep the agent
                self.dropped += self._pending_size
                self._pending.clear()
                self._pending_size = 0
            self._arm()

    # -- the loop -----------------------------------------------------------------------
    def attach_loop(self, loop) -> None:
        """Flush from `loop` whenever the console becomes writable again."""
        with self._lock:
            self._loop = loop
            self._arm()

    def detach_loop(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is not None and self._waiting:
                self._waiting = False
                loop.remove_writer(self._fd)

    def _arm(self) -> None:
        loop = self._loop
        if loop is None or self._fd < 0:
            return
        want = bool(self._pending)
        if want == self._waiting:
            return
        if get_ident() != loop.thread_id:
            loop.call_soon_threadsafe(self._arm)    # only the loop thread touches the loop
            return
        self._waiting = want
        if want:
            loop.add_writer(self._fd, self.flush)
        else:
            loop.remove_writer(self._fd)

    def drain(self, timeout: float) -> None:
        """Give what is pending up to `timeout` seconds to leave (at exit)."""
        import select
        deadline = time.monotonic() + timeout
        while self._pending and self._fd >= 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([], [self._fd], [], left)
            except (OSError, ValueError):
                break
            self.flush()


_console: ConsoleWriter | None = None


def console() -> ConsoleWriter:
    """The agent's console writer (stderr), made at first use."""
    global _console
    if _console is None:
        _console = ConsoleWriter(2)
    return _console


def configure_logging(stream=None, level: int = INFO) -> None:
    """The agent's log (tether/log.py) onto the console writer, or onto `stream`."""
    configure(level, stream=stream, writer=None if stream is not None else console().write)


DEBUG_ENV = "TETHER_DEBUG"
SECRETS_DEBUG_LEVEL = 3      # below it no secret (args, env, key) reaches the log


def env_debug_level() -> int:
    """The kernel argument tether.debug=N, which stage 0 exports as TETHER_DEBUG: a floor
    under diagnostics.debug, and the level before the config is read."""
    try:
        return int(os.environ.get(DEBUG_ENV, "0") or 0)
    except ValueError:
        return 0


def write_console(data: bytes) -> None:
    """Session output echoed onto the agent log (stderr), never blocking."""
    console().write(data)


def redirect_log(path: str) -> None:
    """Point stdout and stderr (the agent log) at the log port, as the reference did
    with ttyS1. A port that cannot be opened leaves the log where it was."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_APPEND
                     | (0 if path.startswith("/dev/") else os.O_CREAT), 0o644)
    except OSError as err:
        log.error("cannot open the log port %s: %s; logging to stderr", path, err.strerror)
        return
    if os.isatty(fd):
        from tether import system
        try:
            system.set_raw_tty(fd)
        except OSError as err:
            log.warning("log port %s: %s; leaving the line as it is", path, err.strerror)
    sys.stdout.flush()
    sys.stderr.flush()
    console().flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    console().reopen(2)
    log.info("agent log on %s", path)


# -- what peers say, in our log ---------------------------------------------------------------
PEER_TEXT_LIMIT = 80


def clip(value, limit: int = PEER_TEXT_LIMIT) -> str:
    """`value` (text or bytes a peer sent) as at most about `limit` characters, for a log
    line or an error message: repr form, so control characters cannot forge log lines."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[:limit + 1])
        size = len(value)
    else:
        text = value if isinstance(value, str) else str(value)
        raw, size = text[:limit + 1], len(text)
    if size > limit:
        return f"{raw[:limit]!r}...({size} in all)"
    return repr(raw)


def escape_unprintable(text: str, keep: str = "") -> str:
    """`text` with each character that is not printable (C0 and C1 controls, ESC of an
    escape sequence, CR, bidi overrides...) but those in `keep` written as its Python
    escape (\\x1b, \\r, \\u202e): a peer's text shown in a line of ours can neither drive
    the terminal nor forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


class RateLimit:
    """At most `burst` log lines per `interval` seconds for one kind of event; the rest
    are counted and the count is given with the next line let through."""

    def __init__(self, burst: int = 5, interval: float = 10.0, clock=time.monotonic):
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window = -interval
        self._used = 0
        self.suppressed = 0

    def allow(self) -> int | None:
        """None: stay quiet. Otherwise log now; the number is how many were suppressed
        before this one (0 when none)."""
        now = self._clock()
        if now - self._window >= self.interval:
            self._window = now
            self._used = 0
        if self._used >= self.burst:
            self.suppressed += 1
            return None
        self._used += 1
        skipped, self.suppressed = self.suppressed, 0
        return skipped

    def log(self, logger, level: int, msg: str, *args) -> None:
        skipped = self.allow()
        if skipped is None:
            return
        if skipped:
            msg += f" ({skipped} more like this not logged)"
        logger.log(level, msg, *args)
