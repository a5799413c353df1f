"""The one owner of what happens to sessions after launch: restarts and the stop sequence.

Restart: a `Restart` session that exits is launched again after a delay that doubles on
each quick exit (0.25 s, 0.5 s, ... up to 30 s) and goes back to 0.25 s after a run of 10 s
or more. A relaunch that fails to launch (the binary gone for a moment, no memory) is
retried on the same backoff: no SIGHUP is needed to revive it. A first launch that fails
is not retried: it is a configuration error, reported in `started`.

Stop: the session's StopSignal (SIGTERM when unset or unknown), SIGKILL after the grace,
then, KILL_WAIT later, give up on it: a process stuck in the kernel must not hold the
shutdown for ever. The agent stops every session this way; the toolbox's OS_Halt stops
the primary this way before it asks the agent to stop.

Exec'd sessions: the last `keep_execs` that finished are kept (for `list`, `attach`
with replay, and their keys in guestinfo); an older finished one is removed with its
keys (`remove`), so a container that runs many execs does not grow without bound.
Sessions the host configured are never removed.

Everything here runs on the loop thread; sessions report their phase changes to
`Supervisor.on_change`.
"""
from __future__ import annotations

import time
from _collections import deque   # collections' deque, without importing collections (startup)
from _collections_abc import Callable   # collections.abc's, already loaded by os

from tether import signals
from tether.log import get_logger
from tether.sessions import Phase, Session, launch_failure_code, parse_signal

log = get_logger("tether.supervisor")

RESTART_BASE = 0.25         # first restart delay, doubled on each quick exit
RESTART_MAX = 30.0
STABLE_RUN = 10.0           # a run this long resets the backoff
KILL_WAIT = 10.0            # after SIGKILL, how long a stuck process may hold a stop
KEEP_EXECS = 32             # finished exec'd sessions kept; older ones are removed


def stop_signal_of(session) -> int:
    """The session's StopSignal as a number; SIGTERM when it is unset or unknown."""
    try:
        return parse_signal(session.config.stop_signal)
    except ValueError as err:
        log.warning("session %s: %s; using SIGTERM", session.id, err)
        return signals.SIGTERM


class StopSequence:
    """Stop one session: its stop signal, SIGKILL after `grace`, give up `kill_wait` later.
    Whoever sees the process exit calls `ended()`. `outcome`: None while it runs, True
    when the process exited, False when it was given up on."""

    def __init__(self, loop, session, grace: float, kill_wait: float = KILL_WAIT):
        self.loop = loop
        self.session = session
        self.grace = grace
        self.kill_wait = kill_wait
        self.outcome: bool | None = None
        self._timer = None
        self._done: list[Callable[[bool], object]] = []

    def add_done(self, callback: Callable[[bool], object]) -> None:
        """`callback(outcome)` once the sequence ends (at once when it has)."""
        if self.outcome is None:
            self._done.append(callback)
        else:
            callback(self.outcome)

    def begin(self) -> None:
        self.session.stop_requested = True   # the exit record's reason: stopped
        signum = stop_signal_of(self.session)
        log.info("session %s: sending %s", self.session.id, signals.name(signum))
        self.session.signal(signum)
        self._timer = self.loop.call_later(self.grace, self._kill)

    def _kill(self) -> None:
        log.warning("session %s still running after %.0fs: SIGKILL", self.session.id,
                    self.grace)
        self.session.signal(signals.SIGKILL)
        self._timer = self.loop.call_later(self.kill_wait, self._give_up)

    def _give_up(self) -> None:
        self._timer = None
        log.error("session %s did not exit %.0fs after SIGKILL; stopping without it",
                  self.session.id, self.kill_wait)
        self._finish(False)

    def ended(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._finish(True)

    def _finish(self, outcome: bool) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        callbacks, self._done = self._done, []
        for callback in callbacks:
            callback(outcome)


class Supervisor:
    """The agent's sessions, and their restarts and stops.

    `create(config, on_change)` builds a Session for a SessionConfig (the agent knows the
    root, the output log and the console); `publish(session)` writes a session back;
    `request_stop(reason)` asks the agent to stop (a primary that exited or did not start);
    `remove(session)` takes a finished exec'd session out of the config and guestinfo.
    """

    def __init__(self, loop, *, create: Callable, publish: Callable[[Session], object],
                 request_stop: Callable[[str], object], stop_grace: float,
                 kill_wait: float = KILL_WAIT,
                 remove: Callable[[Session], object] | None = None,
                 keep_execs: int = KEEP_EXECS):
        self.loop = loop
        self.sessions: dict[str, Session] = {}
        self.stopping = False
        self.stop_grace = stop_grace
        self.kill_wait = kill_wait
        self._create = create
        self._publish = publish
        self._request_stop = request_stop
        self._timers: dict[str, object] = {}          # session ID -> pending relaunch
        self._backoff: dict[str, float] = {}          # session ID -> its next delay
        self._started_at: dict[str, float] = {}       # session ID -> monotonic launch time
        self._stops: dict[str, StopSequence] = {}     # session ID -> its stop in progress
        self._remove = remove
        self.keep_execs = max(0, keep_execs)
        self._execs: set[str] = set()                 # IDs of exec'd sessions
        self._finished_execs: deque[str] = deque()    # of those, the finished, oldest first

    # -- sessions ------------------------------------------------------------------------
    def add(self, config) -> Session:
        session = self._create(config, self.on_change)
        self.sessions[session.id] = session
        return session

    def launch(self, config, *, exec_: bool = False) -> Session:
        """A new session, started (or waiting for RunBlock). Once the agent is stopping
        it is not launched (it would escape the stop): it fails with a reason instead.
        `exec_`: a session a client exec'd, removed some time after it finishes."""
        session = self.add(config)
        if exec_:
            self._execs.add(session.id)
        if self.stopping:
            session.refuse("not launched: the agent is stopping")
        else:
            session.start()
        return session

    def revive(self, session) -> bool:
        """SIGHUP: launch a `Restart` session again that has stopped and is not already
        waiting for its restart timer. True when it was relaunched."""
        if self.stopping or not session.config.restart or not session.launches \
                or session.phase not in (Phase.EXITED, Phase.FAILED) \
                or session.id in self._timers:
            return False
        self._relaunch(session)
        return True

    def on_change(self, session, old: Phase, new: Phase) -> None:
        """Every session's phase changes come here (on the loop)."""
        if new is Phase.RUNNING:
            self._started_at[session.id] = time.monotonic()
            self._publish(session)
        elif new is Phase.FINISHING:
            stop = self._stops.get(session.id)
            if stop is not None:
                stop.ended()
        elif new is Phase.FAILED:
            self._publish(session)
            self._launch_failed(session)
            self._exec_finished(session)
        elif new is Phase.EXITED:
            self._publish(session)
            self._exited(session)
            self._exec_finished(session)

    def _exec_finished(self, session) -> None:
        """An exec'd session ended: keep the last `keep_execs`, remove older ones."""
        if session.id not in self._execs or session.config.restart \
                or session.id in self._finished_execs:
            return
        self._finished_execs.append(session.id)
        while len(self._finished_execs) > self.keep_execs:
            self._forget(self._finished_execs.popleft())

    def _forget(self, sid: str) -> None:
        session = self.sessions.get(sid)
        if session is None or session.phase not in (Phase.EXITED, Phase.FAILED):
            return
        del self.sessions[sid]
        self._execs.discard(sid)
        for table in (self._timers, self._backoff, self._started_at, self._stops):
            table.pop(sid, None)
        log.info("session %s: removed (an exec that finished; the last %d are kept)",
                 sid, self.keep_execs)
        if self._remove is not None:
            self._remove(session)

    def _launch_failed(self, session) -> None:
        if self.stopping:
            return
        if session.launches and session.config.restart:
            delay = self.restart_delay(session)
            log.warning("session %s failed to relaunch; retrying in %.2fs (resurrection %d)",
                        session.id, delay, session.config.diagnostics.resurrection_count + 1)
            self._schedule(session, delay)
        elif session.primary and not session.launches:
            self._request_stop(f"primary session failed to start: {session.config.started}")

    def _exited(self, session) -> None:
        if self.stopping:
            return
        if session.config.restart:
            delay = self.restart_delay(session)
            log.info("session %s restarts in %.2fs (resurrection %d)", session.id, delay,
                     session.config.diagnostics.resurrection_count + 1)
            self._schedule(session, delay)
        elif session.primary:
            self._request_stop(f"primary session {session.id} exited")

    def restart_delay(self, session) -> float:
        """The wait before `session`'s next relaunch: 0.25 s, doubled on each quick exit or
        failed relaunch up to 30 s, back to 0.25 s after a run of 10 s or more."""
        started = self._started_at.get(session.id)
        if started is not None and session.phase is Phase.EXITED \
                and time.monotonic() - started >= STABLE_RUN:
            self._backoff[session.id] = RESTART_BASE
        delay = self._backoff.get(session.id, RESTART_BASE)
        self._backoff[session.id] = min(delay * 2, RESTART_MAX)
        return delay

    def _schedule(self, session, delay: float) -> None:
        self._timers[session.id] = self.loop.call_later(delay, lambda: self._relaunch(session))

    def _relaunch(self, session) -> None:
        self._timers.pop(session.id, None)
        if self.stopping or session.phase not in (Phase.EXITED, Phase.FAILED):
            return
        session.config.diagnostics.resurrection_count += 1
        self._publish(session)   # the reference publishes the count before the relaunch
        session.start()

    def launch_failure_code(self, session) -> int | None:
        """The agent's exit code when `session` never launched (126/127), else None."""
        if session.phase is Phase.FAILED and not session.launches:
            return launch_failure_code(session.launch_errno)
        return None

    # -- stopping ------------------------------------------------------------------------
    def stop_session(self, session, *, grace: float | None = None,
                     kill_wait: float | None = None,
                     done: Callable[[bool], object] | None = None) -> StopSequence | None:
        """Stop one session (stop signal, SIGKILL, give up); `done(stopped)` at the end,
        at once when it is not running. A session already being stopped keeps its sequence."""
        sequence = self._stops.get(session.id)
        if sequence is None or sequence.outcome is not None:
            if not session.running:
                if done is not None:
                    done(True)
                return None
            sequence = StopSequence(self.loop, session,
                                    self.stop_grace if grace is None else grace,
                                    self.kill_wait if kill_wait is None else kill_wait)
            self._stops[session.id] = sequence
            sequence.begin()
        if done is not None:
            sequence.add_done(done)
        return sequence

    def stop_all(self) -> None:
        """The agent stops: no more restarts or RunBlock launches; stop what runs."""
        self.stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for session in list(self.sessions.values()):
            session.cancel()
            self.stop_session(session)

    def all_stopped(self) -> bool:
        """Every session has ended, or was given up on after SIGKILL."""
        for session in self.sessions.values():
            if session.phase in (Phase.RUNNING, Phase.FINISHING):
                stop = self._stops.get(session.id)
                if stop is None or stop.outcome is not False:
                    return False
        return True
