"""Accepting clients on a listening socket without letting a flood or fd exhaustion hurt
the agent's loop: the server admits or refuses each client, accept pauses with a growing
backoff when it fails for want of fds or memory, and the warnings are rate limited.

Without the pause, a listener whose accept fails with EMFILE stays readable (the client
waits in the backlog), so the loop would call accept again at once, for ever, logging
each time. Both attach servers (msgpack and VIC's SSH) accept through an `Acceptor`.
"""
from __future__ import annotations

import errno
from typing import Callable

from tether.console import RateLimit
from tether.log import WARNING, get_logger

log = get_logger("tether.attach")

MAX_CONNECTIONS = 64        # clients per listener (both attach servers)
BATCH = 16                  # clients accepted per wake-up, so one listener cannot hog the loop
BACKOFF_FIRST = 0.1         # seconds accept pauses after a resource error...
BACKOFF_MAX = 2.0           # ...doubling while it keeps failing, up to this
# Errors about one client that is already gone: accept the next one.
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}


class Acceptor:
    """Accepts clients of one listener on `loop`.

    `accept()` returns a client (anything with `close()`), None when none is waiting, and
    raises OSError. `admit(client)` returns None to take the client, handed to
    `on_accept(client)`, or the reason it is refused (the client is closed at once)."""

    def __init__(self, loop, fd: int, name: str, accept: Callable, on_accept: Callable,
                 admit: Callable[[object], str | None] = lambda client: None):
        self.loop = loop
        self.fd = fd
        self.name = name
        self._accept = accept
        self._on_accept = on_accept
        self._admit = admit
        self._delay = BACKOFF_FIRST
        self._timer = None
        self._reading = False
        self._closed = False
        self.refused = 0
        self.failures = 0
        self._failure_log = RateLimit(burst=3, interval=30.0)
        self._refusal_log = RateLimit(burst=3, interval=30.0)
        self._listen()

    def _listen(self) -> None:
        if not self._reading and not self._closed:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _on_readable(self) -> None:
        for _ in range(BATCH):
            try:
                client = self._accept()
            except OSError as err:
                if err.errno in _CLIENT_GONE:
                    continue
                self._pause(err)
                return
            if client is None:
                return
            self._delay = BACKOFF_FIRST
            reason = self._admit(client)
            if reason is not None:
                self.refused += 1
                try:
                    client.close()
                except OSError:
                    pass
                self._refusal_log.log(log, WARNING, "attach: %s: refused a client: %s",
                                      self.name, reason)
                continue
            self._on_accept(client)

    def _pause(self, err: OSError) -> None:
        """accept failed for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM): the
        client stays in the backlog; try again later instead of spinning."""
        self.failures += 1
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False
        self._failure_log.log(log, WARNING,
                              "attach: accept on %s failed: %s; not accepting for %.1fs",
                              self.name, err.strerror or err, self._delay)
        self._timer = self.loop.call_later(self._delay, self._resume)
        self._delay = min(self._delay * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        self._timer = None
        self._listen()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False
