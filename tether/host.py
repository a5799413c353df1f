"""What a subsystem may use of the agent: the narrow `Host` interface.

The attach servers (the msgpack one, and the VIC SSH one over COM1) and the toolbox get
a Host, never the whole Agent: they can look sessions up, start an exec session, stop a
session or the agent, and post work to the loop. The Agent implements it; a test or a
small server can implement it with a few lines (tests/test_attach_serial.py does).

Every member is for the loop thread, except `loop.call_soon_threadsafe`, which is how a
thread (the toolbox's) hands work over.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from tether.config import SessionConfig
    from tether.loop import Loop
    from tether.sessions import Session


class Host(Protocol):
    loop: "Loop"
    key: bytes | None     # the executor Key: the attach HMAC key (and VIC's SSH host key)
    root: str             # the container root, for copy in and out

    @property
    def sessions(self) -> Mapping[str, "Session"]:
        """Every session by ID: configured ones and exec'd ones."""

    @property
    def primary(self) -> "Session | None":
        """The session whose ID is the executor's, once it exists."""

    def exec_session(self, config: "SessionConfig") -> "Session":
        """Add a session and launch it; ValueError when it cannot be added (the agent is
        stopping). A launch failure is the session's FAILED phase, not an exception."""

    def request_stop(self, reason: str) -> None:
        """Stop the agent: every session with its stop signal, then shut down."""

    def stop_session(self, session: "Session", *, grace: float | None = None,
                     kill_wait: float | None = None,
                     done: Callable[[bool], object] | None = None) -> None:
        """Stop one session (stop signal, SIGKILL after `grace`); `done(stopped)` after."""
