"""Sessions launched by the real agent as PID 1 of new namespaces: path lookup, users,
exit statuses, file descriptors, tty. Results are read from the final guestinfo map."""
from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from helpers import executor_config, require_tool, session_config, sid

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def run_one(sandbox, session, **kw):
    result = sandbox.run(executor_config(session), **kw)
    return result, result.session(session.common.id)


def test_absolute_path(sandbox):
    result, s = run_one(sandbox, session_config(sid(), ["/bin/echo", "hello", "world"]))
    assert s.started == "true", result.log
    assert s.exit_status == 0
    assert result.returncode == 0
    assert "hello world\n" in result.log


def test_path_lookup_uses_the_session_path(sandbox):
    result, s = run_one(sandbox, session_config(sid(), ["echo", "found"], env=["PATH=/not:/bin"]))
    assert s.started == "true", result.log
    assert "found\n" in result.log


def test_relative_path_against_dir(sandbox):
    cfg = session_config(sid(), ["./echo", "relative"], env=[])
    cfg.cmd.dir = "/bin"
    result, s = run_one(sandbox, cfg)
    assert s.started == "true", result.log
    assert "relative\n" in result.log


def test_missing_binary_reports_in_started(sandbox):
    result, s = run_one(sandbox, session_config(sid(), ["/not/there"]))
    assert s.started == "stat /not/there: no such file or directory"
    assert result.returncode == 127
    assert "Traceback" not in result.log


def test_missing_in_path(sandbox):
    result, s = run_one(sandbox, session_config(sid(), ["notthere"], env=["PATH=/not"]))
    assert s.started == "notthere: no such executable in PATH"


def test_missing_binary_of_another_session_breaks_nothing(sandbox):
    primary = session_config(sid(), ["/bin/sh", "-c", "sleep 1; echo primary-done"])
    broken = session_config(sid(), ["/not/there/either"])
    result = sandbox.run(executor_config(primary, broken))
    assert result.returncode == 0, result.log
    assert result.session(primary.common.id).started == "true"
    assert result.session(primary.common.id).exit_status == 0
    assert result.session(broken.common.id).started == \
        "stat /not/there/either: no such file or directory"
    assert "primary-done" in result.log


def test_exit_code_3(sandbox):
    result, s = run_one(sandbox, session_config(sid(), ["/bin/sh", "-c", "exit 3"]))
    assert (s.started, s.exit_status, result.returncode) == ("true", 3, 3)
    assert [e.message for e in s.diagnostics.exit_logs] == ["exited 3"]
    assert s.diagnostics.exit_logs[0].exit_status == 3
    assert s.detail.stop_time >= s.detail.start_time > 0


def test_killed_by_sigkill(sandbox):
    result, s = run_one(sandbox, session_config(sid(), ["/bin/sh", "-c", "kill -KILL $$"]))
    assert s.exit_status == -1
    assert s.diagnostics.exit_logs[-1].message == "killed by SIGKILL"
    assert s.diagnostics.exit_logs[-1].exit_status == -1
    assert result.returncode == 128 + 9


OPEN_FDS = ("import os, sys\n"
            "fds = []\n"
            "for fd in range(4096):\n"
            "    try:\n"
            "        os.fstat(fd)\n"
            "        fds.append(fd)\n"
            "    except OSError:\n"
            "        pass\n"
            "with open(sys.argv[1] + '.tmp', 'w') as f:\n"
            "    f.write(repr(fds))\n"
            "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n")


def wait_for_files(*paths) -> list[str]:
    test = " && ".join(f"[ -e {p} ]" for p in paths)
    return ["/bin/sh", "-c", f"until {test}; do sleep 0.05; done"]


def test_only_fds_0_to_2_are_open(sandbox, tmp_path):
    # fstat probing opens nothing itself, unlike listing /proc/self/fd.
    python = "/usr/bin/python3"
    out = {name: tmp_path / name for name in ("plain", "stdin", "tty")}
    release = tmp_path / "release"
    plain = session_config(sid(), [python, "-S", "-c", OPEN_FDS, str(out["plain"])])
    piped = session_config(sid(), [python, "-S", "-c", OPEN_FDS, str(out["stdin"])],
                           open_stdin=True)
    tty = session_config(sid(), [python, "-S", "-c", OPEN_FDS, str(out["tty"])], tty=True)
    primary = session_config(sid(), wait_for_files(*out.values(), release))
    # The agent holds an inheritable fd of its own (not close-on-exec, as a descriptor
    # from whoever started it would be): sessions must not get it.
    held = tmp_path / "held-by-the-agent"
    fd = os.open(held, os.O_RDWR | os.O_CREAT)
    try:
        box = sandbox.start(executor_config(primary, plain, piped, tty), pass_fds=(fd,))
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in out.values()):
            assert time.monotonic() < deadline, box.log_text()
            time.sleep(0.05)
        assert os.readlink(f"/proc/{box.agent_pid()}/fd/{fd}") == str(held)
        release.touch()
        result = box.wait()
    finally:
        os.close(fd)
    assert result.returncode == 0, result.log
    for name, path in out.items():
        assert path.read_text() == "[0, 1, 2]", (name, result.log)


def test_tty_session_has_a_controlling_terminal(sandbox):
    cfg = session_config(sid(), ["/bin/sh", "-c", "echo tty=$(tty) ctty=$(ps -o tty= -p $$)"],
                         tty=True)
    result, s = run_one(sandbox, cfg)
    assert s.started == "true"
    # ps names the controlling terminal ("?" for none); tty names stdin's terminal.
    assert re.search(r"^tty=/dev/(pts/\d+) ctty=\1\s*$", result.log, re.M), result.log


def test_every_session_is_its_own_process_group(sandbox, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    probes = [session_config(sid(), ["/bin/sh", "-c",
                                     "echo $$ $(cut -d' ' -f5,6 /proc/$$/stat) > $0.tmp && "
                                     "mv $0.tmp $0", str(path)]) for path in outs]
    primary = session_config(sid(), wait_for_files(*outs))
    result = sandbox.run(executor_config(primary, *probes))
    for path in outs:
        pid, pgid, session = path.read_text().split()
        assert pid == pgid == session, result.log


def test_environment_is_exactly_the_configured_one(sandbox):
    cfg = session_config(sid(), ["/usr/bin/env"], env=["PATH=/bin", "FOO=bar baz"])
    result, s = run_one(sandbox, cfg)
    env_lines = [l for l in result.log.splitlines() if "=" in l and " " not in l.split("=")[0]
                 and not l[:4].isdigit()]
    assert sorted(env_lines) == ["FOO=bar baz", "HOME=/root", "PATH=/bin"], result.log


# -- users and groups, in a container root made here ---------------------------------------
@pytest.fixture
def rootfs(tmp_path):
    require_tool("busybox")
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "home/alice", "out"):
        (root / d).mkdir(parents=True)
    os.chmod(root / "out", 0o777)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "id", "echo", "cat", "ls", "sleep", "touch", "env", "hostname",
                   "mv"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "alice:x:1234:2345:Alice:/home/alice:/bin/sh\n")
    (root / "etc" / "group").write_text(
        "root:x:0:\nstaff:x:2345:\nextra:x:3456:alice\nother:x:4567:bob\n")
    return root


def who(session_id, user="", group=""):
    script = "echo $(id -u) $(id -g) $(id -G) $HOME > /tmp/$0 && mv /tmp/$0 /out/$0"
    return session_config(session_id, ["/bin/sh", "-c", script, session_id], env=["PATH=/bin"],
                          user=user, group=group)


def test_user_and_group_by_name_and_number(sandbox, rootfs):
    cases = {
        "byname": ("alice", "", "1234 2345 2345 3456 /home/alice"),
        "bynumber": ("1234", "", "1234 2345 2345 3456 /home/alice"),
        "groupname": ("alice", "extra", "1234 3456 3456 /home/alice"),
        "numbers": ("4242", "99", "4242 99 99 /"),
        "colon": ("alice:staff", "", "1234 2345 2345 3456 /home/alice"),
        "root": ("", "", "0 0 0 /root"),
    }
    sessions = [who(name, user, group) for name, (user, group, _) in cases.items()]
    primary = session_config(sid(), wait_for_files(*(f"/out/{name}" for name in cases)),
                             env=["PATH=/bin"])
    result = sandbox.run(executor_config(primary, *sessions), rootfs=rootfs)
    for name, (_, _, expected) in cases.items():
        assert result.session(name).started == "true", (name, result.log)
        got = (rootfs / "out" / name).read_text().split()
        assert sorted(got[2:-1]) == sorted(expected.split()[2:-1]), name
        assert got[:2] + got[-1:] == expected.split()[:2] + expected.split()[-1:], name


def test_unknown_user_fails_loudly_and_does_not_run(sandbox, rootfs):
    primary = session_config(sid(), ["/bin/sleep", "1"], env=["PATH=/bin"])
    result = sandbox.run(executor_config(primary, who("ghost", "nobodyhere"),
                                         who("badgroup", "alice", "nogroup")), rootfs=rootfs)
    assert result.session("ghost").started.startswith(
        "unable to find user nobodyhere: no matching entries in passwd file")
    assert result.session("badgroup").started.startswith(
        "unable to find group nogroup: no matching entries in group file")
    assert not (rootfs / "out" / "ghost").exists()
    assert not (rootfs / "out" / "badgroup").exists()
    assert result.returncode == 0


def test_sessions_are_chrooted_into_the_rootfs(sandbox, rootfs):
    (rootfs / "only-in-the-rootfs").write_text("")
    script = ("echo root: $(ls /); echo passwd: $(cut -d: -f1 /etc/passwd); "
              "echo proc: $(cat /proc/$$/comm) $(ls /proc/1/ns | grep -c .)")
    cfg = session_config(sid(), ["/bin/sh", "-c", script], env=["PATH=/bin"])
    result, s = run_one(sandbox, cfg, rootfs=rootfs)
    assert s.started == "true", result.log
    # / is the rootfs (the host's /usr is not there), with the rootfs's /etc/passwd
    listing = re.search(r"^root: (.*)$", result.log, re.M).group(1).split()
    assert "only-in-the-rootfs" in listing and "usr" not in listing, result.log
    assert re.search(r"^passwd: root alice$", result.log, re.M), result.log
    # and /proc inside it is a live proc (the agent bound it there), not the empty dir
    assert re.search(r"^proc: sh [1-9]\d*$", result.log, re.M), result.log


def test_hostname_and_etc_files_inside_the_rootfs(sandbox, rootfs):
    (rootfs / "etc" / "hosts").write_text("10.9.8.7 image-entry\n")
    (rootfs / "etc" / "hostname").write_text("image-name\n")
    ident = sid()
    cfg = session_config(ident, ["/bin/sh", "-c",
                                 "echo name=$(hostname) file=$(cat /etc/hostname); cat /etc/hosts"],
                         env=["PATH=/bin"])
    result, s = run_one(sandbox, cfg, rootfs=rootfs)
    assert s.started == "true", result.log
    assert f"name={ident[:12]} file={ident[:12]}" in result.log, result.log
    assert "image-entry" in result.log          # the image's hosts blended in
    assert (rootfs / "etc" / "hostname").read_text() == "image-name\n"   # image untouched


def test_exit_code_of_a_failed_primary_comes_from_the_errno_not_the_text(sandbox, tmp_path):
    """126 when the command cannot be executed (EACCES), 127 when it is not there
    (ENOENT), as tini does, whatever words the path happens to hold."""
    odd = tmp_path / "permission denied"
    odd.mkdir()
    result, s = run_one(sandbox, session_config(sid(), [str(odd / "missing")]))
    assert s.started == f"stat {odd}/missing: no such file or directory"
    assert result.returncode == 127, result.log
    result, s = run_one(sandbox, session_config(sid(), [str(tmp_path)]))
    assert s.started == f"{tmp_path}: is a directory"
    assert result.returncode == 126, result.log


def test_an_executor_id_that_cannot_be_a_hostname_leaves_the_hostname_alone(sandbox):
    """The hostname is the ID's first 12 characters (the reference's rule); one with a
    newline or a blank is no hostname: it would be the kernel's, and `hostname` would
    print two lines. Left as it is, and the log says why."""
    import signal
    shower = session_config(sid(), ["/bin/sh", "-c", "echo name=$(hostname | od -c | head -1)"
                                    "; exec sleep 1000"], env=["PATH=/bin:/usr/bin"])
    box = sandbox.start(executor_config(shower, executor_id="ab\ncd 10.0.0.1"))
    box.wait_for_log(r"name=")
    box.signal(signal.SIGTERM)
    result = box.wait()
    assert "cannot be a hostname" in result.log, result.log
    shown = re.search(r"name=(.*)$", result.log, re.M).group(1)
    assert "\\n" not in shown and "a   b" not in shown, result.log
