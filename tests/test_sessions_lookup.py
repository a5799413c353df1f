"""Plain-data parts of session launch: signals, users and groups, path lookup."""
from __future__ import annotations

import os
import signal

import pytest

from tether import sessions
from tether.sessions import LaunchError, lookup_path, parse_signal, resolve_credentials


@pytest.mark.parametrize("spec,num", [("", 15), ("TERM", 15), ("sigkill", 9), ("SIGUSR1", 10),
                                      ("quit", 3), ("2", 2)])
def test_parse_signal(spec, num):
    assert parse_signal(spec) == num


@pytest.mark.parametrize("spec", ["NOPE", "SIGNOPE", "0", "-1", "999"])
def test_parse_signal_rejects(spec):
    with pytest.raises(ValueError):
        parse_signal(spec)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n# comment\n"
        "alice:x:1000:1000:A:/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text(
        "root:x:0:\nalice:x:1000:\nbob:x:1001:\nwheel:x:10:alice,bob\naudio:x:29:alice\n")
    return str(tmp_path)


def test_user_by_name_gets_supplementary_groups(root):
    c = resolve_credentials(root, "alice", "")
    assert (c.uid, c.gid, sorted(c.groups), c.home) == (1000, 1000, [10, 29, 1000],
                                                         "/home/alice")


def test_user_and_group_numbers(root):
    c = resolve_credentials(root, "1001", "29")
    assert (c.uid, c.gid, c.home) == (1001, 29, "/home/bob")
    assert c.groups[0] == 29 and 10 in c.groups


def test_unknown_numeric_user_is_allowed_with_gid_0(root):
    c = resolve_credentials(root, "5000", "")
    assert (c.uid, c.gid, c.groups, c.home) == (5000, 0, [0], "/")


def test_empty_user_is_root(root):
    c = resolve_credentials(root, "", "")
    assert (c.uid, c.gid, c.home) == (0, 0, "/root")


@pytest.mark.parametrize("user,group,message", [
    ("mallory", "", "unable to find user mallory"),
    ("alice", "nogroup", "unable to find group nogroup"),
    ("2147483648", "", "out of range"),
    ("alice", "2147483648", "out of range"),
])
def test_bad_user_or_group_fails(root, user, group, message):
    with pytest.raises(LaunchError, match=message):
        resolve_credentials(root, user, group)


def test_missing_passwd_file_fails_for_names(tmp_path):
    with pytest.raises(LaunchError, match="unable to find user alice"):
        resolve_credentials(str(tmp_path), "alice", "")


def test_the_images_user_files_are_read_inside_its_root(tmp_path):
    """A hostile image's /etc/passwd and /etc/group linking out of its root (to the
    agent's /etc/shadow, say) are followed inside the root: here, to nothing."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("alice:x:4242:4242::/home/alice:/bin/sh\n")
    (outside / "group").write_text("staff:x:4343:\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to(outside / "passwd")     # absolute: the agent's
    (root / "etc" / "group").symlink_to(outside / "group")
    with pytest.raises(LaunchError, match="unable to find user alice"):
        resolve_credentials(str(root), "alice", "")
    with pytest.raises(LaunchError, match="unable to find group staff"):
        resolve_credentials(str(root), "0", "staff")
    # the same absolute link, meant inside the root: what the root holds there is read
    inside = root / str(outside).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "passwd").write_text("alice:x:4141:4141::/home/alice:/bin/sh\n")
    assert resolve_credentials(str(root), "alice", "").uid == 4141


def test_a_user_file_that_is_not_a_regular_file_is_not_read(tmp_path):
    """A FIFO would hang PID 1 at the launch (no writer ever comes): it is not opened."""
    (tmp_path / "etc").mkdir()
    os.mkfifo(tmp_path / "etc" / "passwd")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the FIFO was opened"))
    signal.alarm(10)
    try:
        assert resolve_credentials(str(tmp_path), "", "").uid == 0
        with pytest.raises(LaunchError, match="unable to find user alice"):
            resolve_credentials(str(tmp_path), "alice", "")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_a_user_file_past_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "USER_DB_LIMIT", 64)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("alice:x:1000:1000::/home/alice:/bin/sh\n" * 4)
    with pytest.raises(LaunchError, match="passwd is larger than"):
        resolve_credentials(str(tmp_path), "alice", "")


def test_lookup_path_rules(tmp_path):
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("data")
    env = [f"PATH=/nonexistent::{tmp_path}"]
    assert lookup_path("tool", env, "/") == str(exe)
    assert lookup_path(str(exe), [], "/") == str(exe)
    assert lookup_path("./tool", [], str(tmp_path)) == str(exe)
    with pytest.raises(LaunchError, match="tool: no such executable in PATH"):
        lookup_path("tool", ["PATH=/nonexistent"], "/")
    with pytest.raises(LaunchError, match="no PATH"):
        lookup_path("tool", [], "/")
    with pytest.raises(LaunchError, match=f"{plain}: permission denied"):
        lookup_path(str(plain), [], "/")
    with pytest.raises(LaunchError, match=f"{tmp_path}: is a directory"):
        lookup_path(str(tmp_path), [], "/")
    with pytest.raises(LaunchError, match="stat /not/there: no such file or directory"):
        lookup_path("/not/there", [], "/")


def test_restart_backoff_doubles_caps_and_resets_after_a_stable_run():
    """The restart policy lives in the supervisor (tether/supervisor.py)."""
    import time
    from tether import supervisor
    from tether.config import Cmd, Common, SessionConfig
    from tether.loop import Loop
    from tether.reaper import Reaper
    from tether.sessions import Phase, Session
    loop = Loop()
    try:
        s = Session(SessionConfig(common=Common(id="r"), cmd=Cmd(path="/bin/true")),
                    loop=loop, reaper=Reaper(loop))
        sup = supervisor.Supervisor(loop, create=None, publish=None, request_stop=None,
                                    stop_grace=1.0)
        s.phase = Phase.EXITED                      # as after each run
        sup._started_at["r"] = time.monotonic()     # every run ends at once
        delays = [sup.restart_delay(s) for _ in range(10)]
        assert delays[:4] == [0.25, 0.5, 1.0, 2.0]
        assert delays == sorted(delays) and delays[-1] == supervisor.RESTART_MAX
        sup._started_at["r"] = time.monotonic() - supervisor.STABLE_RUN - 1   # a stable run
        assert sup.restart_delay(s) == supervisor.RESTART_BASE
        sup._started_at["r"] = time.monotonic()     # and the next run is quick again
        assert sup.restart_delay(s) == 2 * supervisor.RESTART_BASE
    finally:
        loop.close()
