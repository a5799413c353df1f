"""The agent's single-threaded event loop: fds, timers, signals and cross-thread calls.

Everything that touches sessions runs on this loop. Threads (DHCP renewal, toolbox)
hand work to it with `call_soon_threadsafe`. A callback that raises is logged and the
loop goes on: PID 1 must not die of one bad callback.

It waits in epoll(7) directly (the agent runs on Linux only): selectors would add its
own module and math to PID 1's startup. The epoll instance (and the `select` and `_heapq`
extension modules, each a shared object to load) comes with the first fd, timer or run:
for PID 1 that is after its primary's exec.
"""
from __future__ import annotations

import itertools
import os
import time
from _thread import get_ident   # threading's, without importing threading (startup)
from _collections import deque   # collections' deque, without importing collections (startup)
from _collections_abc import Callable   # collections.abc's, already loaded by os

from tether import signals
from tether.log import get_logger

log = get_logger("tether.loop")

Callback = Callable[[], object]

# epoll(7)'s event bits (Linux ABI), so testing a mask needs no `select` module
EPOLLIN = 0x001
EPOLLOUT = 0x004


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self._epoll = None   # opened by _poller(), on first need
        self._registered: dict[int, int] = {}   # fd -> the epoll events asked for
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._ready: deque[Callback] = deque()
        self._threadsafe: deque[Callback] = deque()
        self._signal_handlers: dict[int, Callback] = {}
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._owner = get_ident()   # the loop thread: it alone changes the config
        self.wakeups = 0   # rounds run: a loop that spins shows here

    @property
    def thread_id(self) -> int:
        """The thread the loop belongs to (the one that made it)."""
        return self._owner

    # -- file descriptors -------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def _poller(self):
        """The epoll instance, opened with the wake-up pipe in it on first use."""
        if self._epoll is None:
            import select
            self._epoll = select.epoll()
            self._epoll.register(self._wake_r, EPOLLIN)
        return self._epoll

    def _update(self, fd: int) -> None:
        events = (EPOLLIN if fd in self._readers else 0) | (
            EPOLLOUT if fd in self._writers else 0)
        current = self._registered.get(fd)
        if current is None:
            if events:
                self._poller().register(fd, events)
                self._registered[fd] = events
        elif not events:
            del self._registered[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:   # closed before it was removed: the kernel dropped it
                pass
        elif events != current:
            self._epoll.modify(fd, events)
            self._registered[fd] = events

    # -- callbacks and timers ------------------------------------------------------------
    def call_soon(self, callback: Callback) -> None:
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        from _heapq import heappush   # heapq's C function, without heapq.py
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self._threadsafe.append(callback)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop will wake anyway

    # -- signals ---------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run `callback` on the loop when `signum` arrives (main thread only)."""
        self._signal_handlers[signum] = callback
        signals.signal(signum, self._on_signal)
        signals.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signals.siginterrupt(signum, False)

    def _on_signal(self, signum: int, _frame) -> None:
        # Runs between bytecodes on the main thread; defer the work to the loop.
        handler = self._signal_handlers.get(signum)
        if handler is not None:
            self._threadsafe.append(handler)

    # -- running -----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Run until `done()` is true (checked after each round); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopping = False
        while not done():
            if self._stopping:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._run_once(deadline)
        return True

    def run_forever(self) -> None:
        self.run_until(lambda: False)

    def _run_once(self, deadline: float | None) -> None:
        timeout: float | None = None
        if self._ready or self._threadsafe:
            timeout = 0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        epoll = self._poller()
        try:
            if timeout is not None and 0 < timeout < 0.001:
                # epoll_wait counts whole milliseconds (Python rounds a timeout up, so it
                # never wakes early); select(2) on the epoll fd waits to the microsecond
                # (a streaming session's next read, sessions.COALESCE_DELAY). Nothing
                # ready when it returns: no need to ask epoll.
                import select
                ready, _, _ = select.select([epoll.fileno()], [], [], timeout)
                events = epoll.poll(0) if ready else ()
            else:
                events = epoll.poll(timeout)
        except InterruptedError:
            events = []
        self.wakeups += 1
        for fd, mask in events:
            if fd == self._wake_r:
                self._drain_wakeup()
                continue
            # as selectors reads epoll: an error or hang-up wakes the reader and the writer
            if mask & ~EPOLLOUT and fd in self._readers:
                self._run(self._readers[fd])
            if mask & ~EPOLLIN and fd in self._writers:
                self._run(self._writers[fd])
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            from _heapq import heappop
            _, _, timer = heappop(self._timers)
            if not timer.cancelled:
                self._run(timer.callback)
        while self._threadsafe:
            self._ready.append(self._threadsafe.popleft())
        for _ in range(len(self._ready)):
            self._run(self._ready.popleft())

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    @staticmethod
    def _run(callback: Callback) -> None:
        try:
            callback()
        except Exception:
            log.exception("callback %r failed; the agent carries on", callback)

    def close(self) -> None:
        signals.set_wakeup_fd(-1)
        if self._epoll is not None:
            self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
