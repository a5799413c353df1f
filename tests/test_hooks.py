"""Lifecycle hooks run as real processes (tether/hooks.py): order, the state on stdin,
exact environment, failures, timeouts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO
from tether.config import Hook, Hooks
from tether.hooks import HookError, run_point, state


def script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_hooks_run_in_order_with_the_state_on_stdin(tmp_path):
    log = tmp_path / "log"
    hooks = Hooks(prestart=[Hook(path=script(tmp_path / f"h{i}", f"read line\n"
                                             f"echo h{i} \"$line\" >> {log}\n"))
                            for i in range(3)])
    doc = state("web", "created", 1234, "/bundle", {"a": "b"})
    assert run_point(hooks, "prestart", doc) == []
    lines = log.read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["h0", "h1", "h2"]
    seen = json.loads(lines[0].split(" ", 1)[1])
    assert seen == {"ociVersion": "1.0.2", "id": "web", "status": "created", "pid": 1234,
                    "bundle": "/bundle", "annotations": {"a": "b"}}


def test_a_hook_gets_exactly_its_env_and_args(tmp_path):
    out = tmp_path / "out"
    path = script(tmp_path / "h", f'echo "$0|$1|$(env | sort | tr "\\n" " ")" > {out}\n')
    hooks = Hooks(poststart=[Hook(path=path, args=["first", "second"], env=["ONLY=this"])])
    run_point(hooks, "poststart", state("web", "running", 1, "/"))
    zero, one, env = out.read_text().strip().split("|")
    assert (zero, one) == (path, "second")   # the shell's $0 is the script it runs
    assert "ONLY=this" in env.split() and "HOME=" not in env and "PATH=/" not in env


def test_the_first_failing_launch_hook_stops_the_rest_with_its_message(tmp_path):
    log = tmp_path / "log"
    bad = script(tmp_path / "bad", "echo 'volume data is not ready' >&2\nexit 3\n")
    after = script(tmp_path / "after", f"echo ran >> {log}\n")
    hooks = Hooks(prestart=[Hook(path=bad), Hook(path=after)])
    with pytest.raises(HookError) as err:
        run_point(hooks, "prestart", state("web", "created", 1, "/"))
    assert str(err.value) == f"prestart hook 0 ({bad}): exited 3: volume data is not ready"
    assert not log.exists()


def test_failing_poststop_hooks_are_reported_and_the_rest_still_run(tmp_path):
    log = tmp_path / "log"
    bad = script(tmp_path / "bad", "exit 1\n")
    after = script(tmp_path / "after", f"echo ran >> {log}\n")
    hooks = Hooks(poststop=[Hook(path=bad), Hook(path=after)])
    failures = run_point(hooks, "poststop", state("web", "stopped", 0, "/"), keep_going=True)
    assert failures == [f"poststop hook 0 ({bad}): exited 1"]
    assert log.read_text() == "ran\n"


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    path = script(tmp_path / "slow", f"sleep 300 &\necho $! > {pidfile}\nwait\n")
    hooks = Hooks(create_runtime=[Hook(path=path, timeout=1)])
    started = time.monotonic()
    with pytest.raises(HookError, match=r"createRuntime hook 0 .*: timed out after 1s"):
        run_point(hooks, "create_runtime", state("web", "created", 1, "/"))
    assert time.monotonic() - started < 30
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the hook's background child outlived the timeout")


def test_a_hook_that_cannot_run_says_why(tmp_path):
    hooks = Hooks(prestart=[Hook(path=str(tmp_path / "missing"))])
    with pytest.raises(HookError, match=r"prestart hook 0 .*missing\): cannot run: exec .*"
                                        r"No such file or directory"):
        run_point(hooks, "prestart", state("web", "created", 1, "/"))


def _run_apart(code: str, pidfile, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` in a Python of its own, so that a wait that never ends fails the test
    instead of hanging it; the hook whose PID `pidfile` holds is killed at the end."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the hook's wait did not end")
    finally:
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass


def test_a_hook_that_does_not_read_a_state_larger_than_a_pipe_still_times_out(tmp_path):
    """Big annotations make a state a pipe cannot hold: writing it used to block until
    the hook read it or exited, past any timeout, and a hook that did neither held PID 1
    (and the launch) for ever."""
    pidfile = tmp_path / "pid"
    path = script(tmp_path / "deaf", f"echo $$ > {pidfile}\nexec sleep 300\n")
    run = _run_apart(f"""
        from tether.config import Hook, Hooks
        from tether.hooks import HookError, run_point, state
        doc = state("web", "created", 1, "/", {{"big": "x" * (1 << 20)}})
        try:
            run_point(Hooks(prestart=[Hook(path={path!r}, timeout=1)]), "prestart", doc)
        except HookError as err:
            print(err)
    """, pidfile)
    assert run.returncode == 0, run.stderr
    assert "prestart hook 0" in run.stdout and "timed out after 1s" in run.stdout


def test_a_hook_whose_timeout_is_beyond_reach_runs(tmp_path):
    """A timeout of centuries (as good as none) used to raise OverflowError from
    select(2): not a HookError, so it escaped the launch's and the exit's handling."""
    hooks = Hooks(poststop=[Hook(path=script(tmp_path / "ok", "exit 0\n"), timeout=10**10),
                            Hook(path=script(tmp_path / "ok2", "exit 0\n"), timeout=10**400)])
    assert run_point(hooks, "poststop", state("web", "stopped", 0, "/"), keep_going=True) == []


def test_hooks_run_when_the_agent_holds_more_than_1024_fds(tmp_path):
    """PID 1 raises RLIMIT_NOFILE and may well hold fds past 1024 (sessions, attach
    connections): select(2) cannot wait on those, and every hook failed with ValueError."""
    pidfile = tmp_path / "pid"
    path = script(tmp_path / "ok", f"echo $$ > {pidfile}\necho fine\n")
    run = _run_apart(f"""
        import os, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        from tether.config import Hook, Hooks
        from tether.hooks import run_point, state
        print(run_point(Hooks(prestart=[Hook(path={path!r})]), "prestart",
                        state("web", "created", 1, "/")))
    """, pidfile)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


FORGED = "2026-01-01T00:00:00.000Z INFO tether.agent: forged"


def test_what_a_hook_prints_reaches_the_log_and_started_escaped(tmp_path, caplog):
    """A createContainer or startContainer hook is a program of the container's image:
    its output must not drive the terminal showing our log or `started` (ESC, OSC), nor
    forge a line of our log (a newline and our format)."""
    failing = script(tmp_path / "failing",
                     "printf 'ok\\n\\033]0;title\\007\\033[2Jlast\\n'\nexit 2\n")
    with pytest.raises(HookError) as err:
        run_point(Hooks(prestart=[Hook(path=failing)]), "prestart",
                  state("web", "created", 1, "/"))
    message = str(err.value)
    assert message.isprintable() and message.endswith(": \\x1b]0;title\\x07\\x1b[2Jlast")
    noisy = f"printf 'ok\\n{FORGED}\\n\\033]0;title\\007\\033[2Jlast\\r{FORGED}\\n'"
    fine = script(tmp_path / "fine", f"{noisy}\nexit 0\n")
    with caplog.at_level("DEBUG", logger="tether.hooks"):
        run_point(Hooks(poststart=[Hook(path=fine)]), "poststart",
                  state("web", "running", 1, "/"), keep_going=True)
    said = [r.getMessage() for r in caplog.records if "said:" in r.getMessage()]
    assert len(said) == 1 and said[0].isprintable()
    assert said[0].endswith(f"said: ok\\n{FORGED}\\n\\x1b]0;title\\x07\\x1b[2Jlast\\r{FORGED}")
