"""An asyncio event loop stepped by the agent's own loop, on the agent's thread.

asyncssh is written for asyncio; the agent's loop (tether/loop.py) owns the thread. The
bridge gives asyncio a selector of its own and watches that selector's epoll fd on the
agent's loop. Each step runs asyncio iterations until one finds nothing to do; the
selector records the timeout asyncio asked for in that idle iteration, and the bridge
sets an agent timer for it. So every asyncssh callback runs on the agent's thread,
between the agent's own callbacks: no locks, and sessions are touched by one thread.

Public asyncio API only: `SelectorEventLoop(selector)`, `run_forever()` and `stop()`
(documented: after stop() the running iteration completes, then run_forever returns).
"""
from __future__ import annotations

import asyncio
import selectors

from tether.log import get_logger

log = get_logger("tether.attach.vic")

MAX_ROUNDS = 64         # asyncio iterations per step before the agent's loop gets a turn
IDLE_TIMEOUT = 0.001    # an iteration that may sleep at least this long found nothing to do


class _SteppingSelector(selectors.EpollSelector):
    """Never blocks: records the timeout asyncio wanted and stops the loop after this
    iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.stop = None
        self.wanted: float | None = 0.0
        self.events = 0

    def select(self, timeout=None):
        self.wanted = timeout
        if self.stop is not None:
            self.stop()
        ready = super().select(0)
        self.events = len(ready)
        return ready


class AsyncioBridge:
    def __init__(self, loop) -> None:
        self.loop = loop                      # the agent's tether.loop.Loop
        self._selector = _SteppingSelector()
        self.aloop = asyncio.SelectorEventLoop(self._selector)
        self._selector.stop = self.aloop.stop
        self._fd = self._selector.fileno()
        self._timer = None
        self._kicked = False
        self._stepping = False
        self.closed = False
        loop.add_reader(self._fd, self.step)

    def kick(self) -> None:
        """Run asyncio soon (after scheduling work into it from the agent's side)."""
        if not self._kicked and not self.closed:
            self._kicked = True
            self.loop.call_soon(self.step)

    def call(self, callback, *args) -> None:
        """Run `callback(*args)` inside asyncio (where asyncssh objects expect to be used)."""
        self.aloop.call_soon(callback, *args)
        self.kick()

    def step(self) -> None:
        self._kicked = False
        if self.closed or self._stepping:
            return
        self._stepping = True
        try:
            for _ in range(MAX_ROUNDS):
                self.aloop.run_forever()
                wanted = self._selector.wanted
                if not self._selector.events and (wanted is None or wanted >= IDLE_TIMEOUT):
                    break
            else:
                self.kick()     # still busy: let the agent's loop breathe, then go on
                return
        finally:
            self._stepping = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wanted is not None:
            self._timer = self.loop.call_later(wanted, self.step)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self._fd)
        try:
            for task in asyncio.all_tasks(self.aloop):
                task.cancel()
            self._selector.stop = None
            for _ in range(8):      # let cancellations run
                self.aloop.call_soon(self.aloop.stop)
                self.aloop.run_forever()
        except Exception:   # noqa: BLE001 - closing must not raise into the agent
            log.debug("asyncio bridge: closing", exc_info=True)
        self.aloop.close()
