"""Reaps every child (sessions, orphans re-parented to us) and dispatches exits by PID.

SIGCHLD is handled on the loop: `waitpid(-1, WNOHANG)` until nothing is left, so
coalesced signals lose nothing. A PID someone `watch`es gets its raw wait status; an
unknown PID is an orphan and is only counted. A helper process the agent runs for itself
(none does today) must go through `run_helper`, which registers the PID before anyone can
reap it, so its status reaches the caller instead of being swallowed as an orphan's.
"""
from __future__ import annotations

import os
import time
from _thread import allocate_lock, get_ident   # threading's, without importing it (startup)
from _collections_abc import Callable, Sequence   # collections.abc's, already loaded by os

from tether import signals
from tether.console import RateLimit
from tether.log import DEBUG, get_logger

TYPE_CHECKING = False     # typing's constant without importing typing (PID 1's startup)
if TYPE_CHECKING:
    import subprocess

log = get_logger("tether.reaper")

ExitCallback = Callable[[int], object]   # called with the raw wait status


def describe_status(status: int) -> str:
    """'exited 3' or 'killed by SIGKILL' (the exit-log message)."""
    if os.WIFSIGNALED(status):
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {signals.name(os.WTERMSIG(status))}{core}"
    return f"exited {os.waitstatus_to_exitcode(status)}"


class _HelperSlot:
    __slots__ = ("event", "status")

    def __init__(self) -> None:
        import threading
        self.event = threading.Event()
        self.status: int | None = None


class Reaper:
    def __init__(self, loop) -> None:
        self.loop = loop
        self._watched: dict[int, ExitCallback] = {}
        self._helpers: dict[int, _HelperSlot] = {}
        self._lock = allocate_lock()   # reaping vs. registering a helper
        self.orphans_reaped = 0
        # a process in a container may make orphans by the thousand (a fork storm, a
        # double-forking daemon in a loop): their lines must not flush the console
        self._orphan_log = RateLimit(burst=10, interval=10.0)

    def start(self) -> None:
        self.loop.add_signal_handler(signals.SIGCHLD, self.reap)
        # Children that exited before the handler was in place (switch_root leftovers).
        self.loop.call_soon(self.reap)

    def watch(self, pid: int, on_exit: ExitCallback) -> None:
        """Deliver `pid`'s wait status to `on_exit` on the loop. Call it on the loop right
        after the fork: the reaper runs only on the loop, so it cannot miss the PID."""
        self._watched[pid] = on_exit

    def reap(self) -> None:
        while True:
            with self._lock:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                except InterruptedError:
                    continue
                if pid == 0:
                    return
                helper = self._helpers.pop(pid, None)
            if helper is not None:
                helper.status = status
                helper.event.set()
                continue
            callback = self._watched.pop(pid, None)
            if callback is None:
                self.orphans_reaped += 1
                if log.isEnabledFor(DEBUG):
                    self._orphan_log.log(log, DEBUG, "reaped orphan %d (%s)", pid,
                                         describe_status(status))
                continue
            try:
                callback(status)
            except Exception:
                log.exception("exit handler for pid %d failed; the agent carries on", pid)

    # -- helper processes ------------------------------------------------------------------
    def run_helper(self, argv: Sequence[str], timeout: float = 60.0,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a helper to completion; returns its CompletedProcess (stdout and stderr
        as text). On timeout the helper is killed and TimeoutExpired is raised.
        Safe from the loop thread (waits itself) and from other threads (the loop's
        reaper hands the status over)."""
        import subprocess   # only when a helper runs: keeps the agent's startup light
        import tempfile
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            slot = _HelperSlot()
            with self._lock:
                proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, env=env, close_fds=True)
                self._helpers[proc.pid] = slot
            try:
                status = self._wait_helper(proc.pid, slot, timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signals.SIGKILL)
                self._wait_helper(proc.pid, slot, None)
                proc.returncode = -signals.SIGKILL
                raise subprocess.TimeoutExpired(list(argv), timeout) from None
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(
                list(argv), proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"))

    def _wait_helper(self, pid: int, slot: _HelperSlot, timeout: float | None) -> int:
        import subprocess
        deadline = None if timeout is None else time.monotonic() + timeout
        on_loop_thread = get_ident() == getattr(self.loop, "_owner", None)
        if not on_loop_thread:
            if not slot.event.wait(timeout):
                raise subprocess.TimeoutExpired([str(pid)], timeout or 0)
            assert slot.status is not None
            return slot.status
        # The loop is not turning while we are here, so wait for the PID ourselves.
        pidfd = os.pidfd_open(pid)
        try:
            while True:
                with self._lock:
                    if slot.status is not None:
                        return slot.status
                    try:
                        got, status = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        got, status = 0, 0
                    if got == pid:
                        self._helpers.pop(pid, None)
                        return status
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired([str(pid)], timeout or 0)
                import select   # a helper's wait only: not on PID 1's way to its primary
                select.select([pidfd], [], [], left)
        finally:
            os.close(pidfd)
