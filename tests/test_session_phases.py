"""A session's phases, driven in-process on the real loop and reaper: the transition
table, what it refuses, and the errno a failed launch carries."""
from __future__ import annotations

import errno
import signal

import pytest

from helpers import require_root
from tether.config import Cmd, Common, SessionConfig
from tether.loop import Loop
from tether.reaper import Reaper
from tether.sessions import (TRANSITIONS, Event, Phase, Session, SessionStateError,
                             launch_failure_code)

TIMEOUT = 60.0


@pytest.fixture
def rig():
    require_root("sessions set their groups")
    loop = Loop()
    reaper = Reaper(loop)
    reaper.start()
    try:
        yield loop, reaper
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        loop.close()


def make(rig, argv, changes=None, **fields):
    loop, reaper = rig
    cfg = SessionConfig(common=Common(id="s"), cmd=Cmd(path=argv[0], args=argv,
                                                       env=["PATH=/bin:/usr/bin"]), **fields)
    on_change = None if changes is None else (lambda s, old, new: changes.append((old, new)))
    return Session(cfg, loop=loop, reaper=reaper, on_change=on_change)


def test_blocked_running_finishing_exited_and_launched_again(rig):
    loop, _ = rig
    changes = []
    session = make(rig, ["/bin/sh", "-c", "echo hi"], changes, run_block=True)
    session.start()
    assert session.phase is Phase.BLOCKED and session.blocked and not session.running
    session.unblock()
    assert session.running and session.config.started == "true"
    assert loop.run_until(lambda: session.phase is Phase.EXITED, timeout=TIMEOUT)
    session.start()                                  # a restart: launched again
    assert loop.run_until(lambda: session.phase is Phase.EXITED, timeout=TIMEOUT)
    assert changes == [(Phase.CREATED, Phase.BLOCKED), (Phase.BLOCKED, Phase.RUNNING),
                       (Phase.RUNNING, Phase.FINISHING), (Phase.FINISHING, Phase.EXITED),
                       (Phase.EXITED, Phase.RUNNING),
                       (Phase.RUNNING, Phase.FINISHING), (Phase.FINISHING, Phase.EXITED)]
    assert session.launches == 2 and session.config.exit_status == 0


def test_events_the_phase_does_not_allow_are_refused(rig):
    loop, _ = rig
    session = make(rig, ["/bin/sleep", "30"])
    with pytest.raises(SessionStateError, match="'output done' is not possible while created"):
        session._change(Event.OUTPUT_DONE)
    session.start()
    with pytest.raises(SessionStateError, match="cannot launch while running"):
        session.start()
    session.signal(signal.SIGKILL)
    assert loop.run_until(lambda: session.phase is Phase.EXITED, timeout=TIMEOUT)
    assert session.exit_signal == signal.SIGKILL
    # every phase can be left, and only RUNNING has a process to wait for
    assert set(TRANSITIONS) == set(Phase)
    assert [p for p, moves in TRANSITIONS.items() if Event.PROCESS_EXITED in moves] == \
        [Phase.RUNNING]


def test_a_cancelled_wait_for_runblock_never_launches(rig):
    session = make(rig, ["/bin/true"], run_block=True)
    session.start()
    session.cancel()
    session.unblock()                                # too late: the agent is stopping
    assert session.phase is Phase.CREATED and session.pid is None


def test_a_failed_launch_carries_the_errno(rig, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    no_interpreter = tmp_path / "no-interpreter.sh"
    no_interpreter.write_text("#!/not/there/sh\nexit 0\n")
    no_interpreter.chmod(0o755)
    cases = [([str(tmp_path / "missing")], errno.ENOENT, 127),
             ([str(tmp_path)], errno.EACCES, 126),           # a directory
             ([str(script)], errno.EACCES, 126),             # no execute bit
             ([str(no_interpreter)], errno.ENOENT, 127),     # execve's own ENOENT
             (["missing-in-path"], errno.ENOENT, 127)]
    for argv, code, exit_code in cases:
        changes = []
        session = make(rig, argv, changes)
        session.start()
        assert session.phase is Phase.FAILED, argv
        assert changes == [(Phase.CREATED, Phase.FAILED)]
        assert (session.launch_errno, launch_failure_code(session.launch_errno)) == \
            (code, exit_code), (argv, session.config.started)
        assert session.config.started not in ("", "true")


class LogRecorder:
    def __init__(self):
        self.lines: list[str] = []

    def log(self, level, msg, *args):
        self.lines.append(msg % args)

    def __getattr__(self, name):   # info, warning...: recorded alike
        return lambda msg, *args, **kw: self.lines.append(msg % args)


def test_input_dropped_for_a_process_that_never_reads_is_logged_a_few_times(rig, monkeypatch):
    """A client typing into a process that reads nothing: past the stdin backlog its
    input is dropped, and said so in a few lines, not one per write."""
    from tether import sessions
    loop, _ = rig
    recorder = LogRecorder()
    monkeypatch.setattr(sessions, "log", recorder)
    session = make(rig, ["/bin/sleep", "60"], open_stdin=True)
    session.start()
    try:
        chunk = b"x" * 65536
        for _ in range(2 * sessions.STDIN_LIMIT // len(chunk) + 200):
            session.write_stdin(chunk)   # what the pipe does not take waits in the backlog
        dropped = [line for line in recorder.lines if "dropping input" in line]
        assert 1 <= len(dropped) <= 3, dropped
    finally:
        session.signal(signal.SIGKILL)
        loop.run_until(lambda: session.phase is Phase.EXITED, timeout=TIMEOUT)
