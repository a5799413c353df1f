"""The interactive attach loop: our stdin to an attached session, its output to us, until
it exits or we detach. `tether attach`, `tether exec` and `tether vm --attach` all use it.

A terminal on a tty session is put in raw mode (keys go through as typed) and the
session's window follows ours (SIGWINCH). The detach keys (ctrl-p ctrl-q, as docker
attach) are looked for only when our stdin is a terminal.

Replay is inert (`replay_settle`): output that comes in a burst at the start, until the
session has been quiet for `replay_settle` seconds (at most REPLAY_MAX), is the replay.
Terminal queries are taken out of it (tether/attach/termquery.py), and whatever our
terminal sends meanwhile (its answers to anything that got through) is dropped, with
the terminal's input queue flushed at the end, so only what is typed afterwards reaches
the session.
"""
from __future__ import annotations

import math
import os
import select
import signal
import sys
import time
from typing import Callable

DETACH_KEYS = b"\x10\x11"   # ctrl-p ctrl-q, as docker attach
REPLAY_SETTLE = 0.4         # seconds of quiet after which the replay is taken as shown
REPLAY_MAX = 3.0            # the longest the replay's inert phase lasts

Writer = Callable[[bytes], object]

# What select() would call readable: poll(2) reports a hang-up or an error apart from
# POLLIN; the read then says what happened.
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL


class DetachScanner:
    """Finds the detach sequence in typed input; holds back a partial match."""

    def __init__(self, keys: bytes = DETACH_KEYS):
        self.keys = keys
        self.held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes to send, detach?)"""
        data = self.held + data
        self.held = b""
        found = data.find(self.keys)
        if found >= 0:
            return data[:found], True
        for n in range(len(self.keys) - 1, 0, -1):
            if data.endswith(self.keys[:n]):
                self.held = data[-n:]
                return data[:-n], False
        return data, False


def fd_writer(fd: int) -> Writer:
    """Write everything to `fd`, waiting when it is non-blocking and full."""
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll()
                continue
            view = view[n:]
    return write


def file_writer(stream) -> Writer:
    """Write to a binary file object and flush."""
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()
    return write


def _terminal_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns), or None when unknown (a pty nobody sized says 0x0)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if not size.lines or not size.columns:
        return None
    return size.lines, size.columns


class ReplayPhase:
    """The inert start of a replaying attach: when it ends, and the query filter on the
    output meanwhile."""

    def __init__(self, settle: float, now: float):
        from tether.attach.termquery import QueryFilter
        self.settle = settle
        self.quiet_at = now + settle
        self.ends_at = now + REPLAY_MAX
        self.filter = QueryFilter()

    def output(self, data: bytes, now: float) -> bytes:
        self.quiet_at = now + self.settle
        return self.filter.feed(data)

    def over(self, now: float) -> bool:
        return now >= min(self.quiet_at, self.ends_at)

    def timeout(self, now: float) -> float:
        return max(0.0, min(self.quiet_at, self.ends_at) - now)


def interact(client, stream, *, stdin_fd: int | None = 0, stdout: Writer | None = None,
             stderr: Writer | None = None, detach_keys: bytes | None = DETACH_KEYS,
             deadline: float | None = None,
             replay_settle: float | None = None) -> int | None:
    """Pump `stdin_fd` (None: no input) to the session and its output to `stdout` and
    `stderr` (default: fds 1 and 2). Returns the session's exit code, 0 after a detach,
    None when the agent ended the attach without an exit or `deadline` (monotonic) passed.
    At the end of our input the session's stdin is closed, and output goes on. With
    `replay_settle` (the attach asked for a replay) the replay is inert (module doc)."""
    import termios
    import tty
    stdout = stdout or fd_writer(1)
    stderr = stderr or fd_writer(2)
    replay = ReplayPhase(replay_settle, time.monotonic()) if replay_settle else None
    tty_in = stdin_fd is not None and os.isatty(stdin_fd)

    def end_replay() -> None:
        nonlocal replay
        held = replay.filter.flush()
        if held:
            stdout(held)
        if tty_in:
            termios.tcflush(stdin_fd, termios.TCIFLUSH)   # answers still queued
        replay = None

    raw_saved = None
    tty_fd = stdin_fd
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_handlers: dict[int, object] = {}

    def on_winch(_signum, _frame) -> None:
        try:
            os.write(wake_w, b"w")
        except BlockingIOError:
            pass   # a wake-up is already pending

    def restore_terminal() -> None:
        nonlocal raw_saved
        if raw_saved is not None:
            saved, raw_saved = raw_saved, None
            try:
                termios.tcsetattr(tty_fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass   # the terminal is gone (hung up): nothing left to restore

    # Everything from the terminal going raw on is inside the try: whatever ends the
    # attach (a refused or unanswered resize, an error, SIGTERM, SIGHUP) restores it.
    try:
        if stream.tty and tty_in:
            if threading_is_main():
                old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, on_winch)
                for signum in END_SIGNALS:
                    if signal.getsignal(signum) is not signal.SIG_IGN:
                        old_handlers[signum] = signal.signal(signum, _end_by_signal)
            raw_saved = termios.tcgetattr(tty_fd)
            tty.setraw(tty_fd, termios.TCSANOW)
            size = _terminal_size(tty_fd)
            if size:
                stream.resize(*size)
        scanner = DetachScanner(detach_keys) if detach_keys and tty_in else None
        # poll(2), not select(2): select cannot take an fd above 1023, which a program
        # with many files open has (the client library waits the same way).
        poller = select.poll()
        for fd in (client.fileno(), wake_r) + ((stdin_fd,) if stdin_fd is not None else ()):
            poller.register(fd, select.POLLIN)
        stdin_held = False   # the agent holds the session's stdin: ours is not read meanwhile
        while True:
            for kind, value in stream.pending():
                if kind == "stdout":
                    stdout(value if replay is None else replay.output(value, time.monotonic()))
                elif kind == "stderr":
                    stderr(value)
                elif kind == "exit":
                    return int(value or 0)
            if stream.closed:
                return None
            if replay is not None and replay.over(time.monotonic()):
                end_replay()
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return None
            if replay is not None:
                wait = replay.timeout(time.monotonic())
                timeout = wait if timeout is None else min(timeout, wait)
            if stdin_fd is not None and stream.held != stdin_held:
                stdin_held = stream.held
                if stdin_held:
                    poller.unregister(stdin_fd)
                else:
                    poller.register(stdin_fd, select.POLLIN)
            try:
                ready = {fd for fd, events in poller.poll(_poll_ms(timeout))
                         if events & _READABLE}
            except InterruptedError:
                continue
            if wake_r in ready:
                os.read(wake_r, 64)
                size = _terminal_size(tty_fd)
                if size:
                    stream.resize(*size)
            if stdin_fd is not None and stdin_fd in ready:
                data = os.read(stdin_fd, 64 << 10)
                if data and replay is not None and tty_in:
                    continue   # the terminal's answers to the replay, or keys typed during it
                if not data:
                    poller.unregister(stdin_fd)
                    stdin_fd = None
                    stream.close_stdin()
                    continue
                if scanner is not None:
                    data, detach = scanner.feed(data)
                    if data:
                        stream.write(data)
                    if detach:
                        stream.detach()
                        restore_terminal()
                        print("\r\nread escape sequence", file=sys.stderr)
                        return 0
                else:
                    stream.write(data)
            if client.fileno() in ready:
                client.pump(0)
    finally:
        restore_terminal()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)


END_SIGNALS = (signal.SIGTERM, signal.SIGHUP)   # end an attach, the terminal restored


def _end_by_signal(signum, _frame):
    """SIGTERM or SIGHUP on a raw terminal: exit as the signal would (128+N), but through
    the `finally` that restores the terminal; the default action would leave it raw."""
    raise SystemExit(128 + signum)


def _poll_ms(timeout: float | None) -> int | None:
    """A timeout in seconds (None: none) as poll(2) takes it, rounded up."""
    return None if timeout is None else math.ceil(max(0.0, timeout) * 1000)


def threading_is_main() -> bool:
    """Signal handlers can be set on the main thread only."""
    import threading
    return threading.current_thread() is threading.main_thread()
