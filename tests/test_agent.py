"""The agent's lifecycle as PID 1 of new namespaces: restart and backoff, SIGHUP reload,
graceful SIGTERM, orphan reaping, the output log, injected setup failures, exit codes."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

from helpers import (REPO, executor_config, require_namespaces, require_tool, session_config,
                     sid, write_config)
from tether import iolog

SHELL_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def wait_for_file(path: str) -> list[str]:
    """A shell line that blocks until `path` exists."""
    return ["/bin/sh", "-c", f"while [ ! -e {path} ]; do sleep 0.05; done; echo released"]


def test_three_sessions_one_restarting_with_backoff(sandbox, tmp_path):
    runs, flag = tmp_path / "runs", tmp_path / "flag"
    primary = session_config(sid(), wait_for_file(str(flag)))
    flaky = session_config(sid(), ["/bin/sh", "-c",
                                   f"echo run >> {runs}; [ $(wc -l < {runs}) -ge 4 ] && "
                                   f"touch {flag}; exit 1"], restart=True)
    third = session_config(sid(), ["/bin/sh", "-c", "echo third-ran"])
    result = sandbox.run(executor_config(primary, flaky, third))
    assert result.returncode == 0, result.log
    s = result.session(flaky.common.id)
    assert s.diagnostics.resurrection_count >= 3
    assert len(runs.read_text().splitlines()) == s.diagnostics.resurrection_count + 1
    assert [e.message for e in s.diagnostics.exit_logs][:3] == ["exited 1"] * 3
    assert len(s.diagnostics.exit_logs) <= 5
    delays = [float(d) for d in re.findall(
        rf"session {flaky.common.id} restarts in ([0-9.]+)s", result.log)]
    assert len(delays) >= 3
    assert delays[:3] == sorted(delays[:3]) and delays[0] < delays[1] < delays[2]
    assert result.session(third.common.id).exit_status == 0
    assert "third-ran" in result.log


def test_sighup_launches_a_new_session(sandbox, tmp_path):
    flag = tmp_path / "flag"
    primary = session_config(sid(), wait_for_file(str(flag)))
    config = executor_config(primary)
    box = sandbox.start(config)
    box.wait_for_log(r"serving 1 session")
    added = session_config("added", ["/bin/sh", "-c", f"touch {flag}; echo added-ran"])
    config.sessions["added"] = added
    write_config(config, box.dir)
    box.signal(signal.SIGHUP)
    result = box.wait()
    assert result.returncode == 0, result.log
    assert "reload: new session added" in result.log
    assert result.session("added").started == "true"
    assert result.session("added").exit_status == 0
    assert result.session(primary.common.id).exit_status == 0


def test_a_reload_keeps_the_executor_id_the_agent_booted_with(sandbox, tmp_path):
    # The executor's ID names the primary (whose exit is the agent's), the hostname and
    # where results go: a reload whose config names another ID must not orphan them.
    flag = tmp_path / "flag"
    primary = session_config(sid(), wait_for_file(str(flag)))
    primary.cmd.args[-1] += "; exit 3"
    config = executor_config(primary)
    box = sandbox.start(config)
    box.wait_for_log(r"serving 1 session")
    config.common.id = "renamed"
    write_config(config, box.dir)
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"reloading the configuration")
    flag.touch()
    result = box.wait()
    assert result.returncode == 3, result.log
    assert "reload: the executor ID stays" in result.log
    assert f"primary session {primary.common.id} exited" in result.log


def test_sighup_relaunches_restart_sessions_and_survives_a_failing_reload(sandbox, tmp_path):
    # A session that has exited and that the host then marks Restart: nothing relaunches
    # it but the SIGHUP (the supervisor only restarts what exits while it is Restart).
    flag, runs, program = tmp_path / "flag", tmp_path / "runs", tmp_path / "program"
    program.write_text(f"#!/bin/sh\necho first >> {runs}\n")
    program.chmod(0o755)
    primary = session_config(sid(), wait_for_file(str(flag)))
    phoenix = session_config("phoenix", [str(program)])
    config = executor_config(primary, phoenix)
    box = sandbox.start(config)
    box.wait_for_log(r"session phoenix \(pid \d+\) exited 0")

    # A reload that fails (the config file no longer parses) is reported, not fatal.
    with open(box.config_path, "w") as f:
        f.write("this is not a VMX line\n")
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"step reload failed")

    # The next SIGHUP, with the config readable and phoenix now Restart, relaunches it.
    program.write_text(f"#!/bin/sh\necho second >> {runs}\ntouch {flag}\nexec sleep 1000\n")
    phoenix.restart = True
    write_config(config, box.dir)
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"reload: relaunched session phoenix")
    result = box.wait()
    assert result.returncode == 0, result.log
    assert "Traceback" in result.log      # the failed reload, reported with its traceback
    assert runs.read_text().split() == ["first", "second"]
    assert result.session("phoenix").started == "true"
    assert result.session("phoenix").diagnostics.resurrection_count == 1


def test_sigterm_stops_everything_gracefully(sandbox):
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    other = session_config(sid(), ["/bin/sleep", "1000"])
    stubborn = session_config(sid(), ["/bin/sh", "-c", "trap '' TERM; sleep 1000"])
    box = sandbox.start(executor_config(primary, other, stubborn), stop_grace=2)
    box.wait_for_log(r"serving 3 session")
    box.signal(signal.SIGTERM)
    result = box.wait()
    assert "stopping: signal SIGTERM" in result.log
    assert result.returncode == 128 + signal.SIGTERM
    for s in (primary, other):
        got = result.session(s.common.id)
        assert got.exit_status == -1
        assert got.diagnostics.exit_logs[-1].message == "killed by SIGTERM"
    got = result.session(stubborn.common.id)
    assert got.diagnostics.exit_logs[-1].message == "killed by SIGKILL"
    assert "still running after 2s: SIGKILL" in result.log


def test_stop_signal_is_used(sandbox):
    primary = session_config(sid(), ["/bin/sleep", "1000"], stop_signal="USR1")
    box = sandbox.start(executor_config(primary))
    box.wait_for_log(r"serving 1 session")
    box.signal(signal.SIGINT)
    result = box.wait()
    assert "sending SIGUSR1" in result.log
    assert result.session(primary.common.id).diagnostics.exit_logs[-1].message == \
        "killed by SIGUSR1"
    assert result.returncode == 128 + signal.SIGUSR1


ORPHANS = """
import os, sys, time
for _ in range(10000):
    if os.fork() == 0:          # the grandchild: orphaned as soon as its parent is gone
        os._exit(0)
"""

COUNT_ZOMBIES = """
import os, sys, time
deadline = time.monotonic() + 300
while True:
    zombies = []
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                with open(f'/proc/{pid}/stat') as f:
                    state = f.read().rsplit(')', 1)[1].split()[0]
            except OSError:
                continue
            if state == 'Z':
                zombies.append(pid)
    if not zombies or time.monotonic() > deadline:
        print('zombies left:', len(zombies), flush=True)
        sys.exit(1 if zombies else 0)
    time.sleep(0.2)
"""


def test_ten_thousand_orphans_are_reaped(sandbox):
    # The session's child forks 10,000 grandchildren and exits without waiting: every
    # one is re-parented to the agent (PID 1), which must reap them all.
    primary = session_config(sid(), [
        "/bin/sh", "-c", "/usr/bin/python3 -S -c \"$0\" && exec /usr/bin/python3 -S -c \"$1\"",
        ORPHANS, COUNT_ZOMBIES])
    result = sandbox.run(executor_config(primary), timeout=900)
    assert "zombies left: 0" in result.log, result.log[-3000:]
    assert result.returncode == 0
    reaped = int(re.search(r"orphans reaped: (\d+)", result.log).group(1))
    assert reaped >= 10000


def test_output_log_round_trips_through_tether_logs(sandbox, tmp_path):
    long_line = "L" * 10000
    done = tmp_path / "other-done"
    primary = session_config(sid(), ["/bin/sh", "-c",
                                     f"until [ -e {done} ]; do sleep 0.05; done; "
                                     f"echo one; echo {long_line}; printf 'no newline'"])
    other = session_config("other", ["/bin/sh", "-c", f"echo err-line >&2; touch {done}"])
    result = sandbox.run(executor_config(primary, other), output_log=True)
    entries = list(iolog.parse(result.output_log))
    primary_out = b"".join(e.data for e in entries if e.session is None and e.stream == 0)
    assert primary_out == f"one\n{long_line}\nno newline".encode()
    assert [(e.session, e.stream, e.data) for e in entries if e.session == "other"] == \
        [("other", 1, b"err-line\n")]
    assert all(len(e.data) <= 4095 for e in entries)
    path = f"{sandbox.directory}/output.log"
    with open(path, "wb") as f:
        f.write(result.output_log)
    raw = subprocess.run([sys.executable, "-m", "tether", "logs", path, "--raw",
                          "--session", "primary"], capture_output=True, cwd=REPO, timeout=120)
    assert raw.stdout == primary_out
    shown = subprocess.run([sys.executable, "-m", "tether", "logs", path, "--session", "other"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z other stderr err-line\n",
                        shown.stdout), shown.stdout


def test_injected_setup_failures_are_reported_not_fatal(sandbox):
    primary = session_config(sid(), ["/bin/echo", "still-ran"])
    result = sandbox.run(executor_config(primary),
                         env={"TETHER_FAILPOINTS": "system,hostname,rootfs,attach"})
    assert result.returncode == 0, result.log
    assert result.session(primary.common.id).started == "true"
    assert "still-ran" in result.log
    for step in ("system", "hostname", "rootfs", "attach"):
        assert f"injected failure in step '{step}'" in result.log
    assert result.log.count("Traceback") == 4
    assert "finished with 4 error(s)" in result.log


def test_failed_session_step_stops_cleanly(sandbox):
    primary = session_config(sid(), ["/bin/echo", "never"])
    result = sandbox.run(executor_config(primary), env={"TETHER_FAILPOINTS": "sessions"})
    assert "stopping: the sessions could not be launched" in result.log
    assert "never" not in result.log.replace("/bin/echo never", "")


def test_debug_level_dumps_config_redacted(sandbox):
    primary = session_config(sid(), ["/bin/echo", "secret-arg"], env=["SECRET=hunter2"])
    result = sandbox.run(executor_config(primary, debug=1))
    assert re.search(r"cmd\.args = <redacted>", result.log)
    assert "hunter2" not in result.log
    result = sandbox.run(executor_config(primary, debug=2))
    assert "hunter2" not in result.log     # nothing secret below level 3
    result = sandbox.run(executor_config(primary, debug=3))
    assert "hunter2" in result.log


def test_session_started_line_shows_argv_only_from_the_secrets_level(sandbox):
    """Below debug 3 (where the config dump shows args, env and key) the "started" line
    names the path and counts the arguments; the arguments themselves (a password on the
    command line) appear only from there."""
    primary = session_config(sid(), ["/bin/true", "--password=hunter2", "x"])
    pid_line = r"session \S+ started: pid \d+, "
    for debug in (0, 2):
        result = sandbox.run(executor_config(primary, debug=debug))
        assert result.returncode == 0, result.log
        assert re.search(pid_line + r"/bin/true \(3 arguments\)", result.log), result.log
        assert "hunter2" not in result.log
    result = sandbox.run(executor_config(primary, debug=3))
    assert re.search(pid_line + r"/bin/true --password=hunter2 x$", result.log, re.M), result.log


def test_sandbox_json_config_exit_status(sandbox, tmp_path):
    config = {"common": {"id": "seven"},
              "sessions": {"seven": {"cmd": {"path": "/bin/sh",
                                             "args": ["/bin/sh", "-c", "exit 7"],
                                             "env": SHELL_ENV}}}}
    result = sandbox.run(config)
    assert result.returncode == 7, result.log
    assert result.guestinfo["guestinfo.vice..sessions|seven.status"] == "7"
    assert result.guestinfo["guestinfo.vice..sessions|seven.started"] == "true"


def test_a_killed_sandbox_leaves_no_files_behind(sandbox, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary), env={"TMPDIR": str(tmpdir)})
    box.wait_for_log(r"serving 1 session")
    box.kill()      # SIGKILL: no cleanup code of the sandbox runs
    assert list(tmpdir.iterdir()) == []


def test_sandbox_hello_example(tmp_path):
    require_namespaces()
    out = tmp_path / "out.vmx"
    run = subprocess.run([sys.executable, "-m", "tether", "sandbox", "examples/hello.json",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\nhello\n" in run.stderr
    from extraconfig.transport import parse_vmx
    assert parse_vmx(out.read_text())["guestinfo.vice..sessions|hello.started"] == "true"
    # without --out, the map goes to stdout
    run = subprocess.run([sys.executable, "-m", "tether", "sandbox", "examples/hello.json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert parse_vmx(run.stdout)["guestinfo.vice..sessions|hello.status"] == "0"


def test_pid1_of_a_vm_powers_off_through_reboot(tmp_path):
    """`tether agent` as PID 1 (not the sandbox) ends in reboot(RB_POWER_OFF). In a PID
    namespace the kernel turns that into SIGINT for the namespace's init."""
    require_namespaces()
    require_tool("unshare")
    primary = session_config(sid(), ["/bin/sh", "-c", "echo vm-session; exit 5"])
    vmx = write_config(executor_config(primary), str(tmp_path))
    # An output log of its own: as PID 1 the agent would otherwise take this host's
    # /dev/ttyS2 for it (the port VIC's VMs have there) and set it raw.
    output_log = tmp_path / "output.log"
    run = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc",
                          "--mount-proc", sys.executable, "-m", "tether", "agent",
                          "--guestinfo-file", vmx, "--no-attach",
                          "--output-log", str(output_log)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "powering off" in run.stderr, run.stderr
    assert f"session output log: {output_log}" in run.stderr, run.stderr
    assert [e.data for e in iolog.parse(output_log.read_bytes())] == [b"vm-session\n"]
    assert run.returncode in (-signal.SIGINT, 128 + signal.SIGINT), run.stderr
    from extraconfig.transport import parse_vmx
    final = parse_vmx(open(vmx).read())
    assert final[f"guestinfo.vice..sessions|{primary.common.id}.status"] == "5"
    assert final[f"guestinfo.vice..sessions|{primary.common.id}.started"] == "true"


def test_sigpwr_is_a_graceful_stop(sandbox):
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary))
    box.wait_for_log(r"serving 1 session")
    box.signal(signal.SIGPWR)
    result = box.wait()
    assert "stopping: signal SIGPWR" in result.log
    assert result.returncode == 128 + signal.SIGTERM     # the primary's StopSignal


def test_a_restart_session_whose_relaunch_fails_is_retried_with_backoff(sandbox, tmp_path):
    """Its binary is gone when the restart comes: the relaunch fails, and is tried again
    on the restart backoff, without a SIGHUP, until the binary is back."""
    program, away = tmp_path / "program", tmp_path / "program.away"
    first, second = tmp_path / "first-run", tmp_path / "second-run"
    program.write_text(f"#!/bin/sh\n"
                       f"if [ -e {first} ]; then touch {second}; exec sleep 1000; fi\n"
                       f"touch {first}; mv {program} {away}; exit 1\n")
    program.chmod(0o755)
    flaky = session_config(sid(), [str(program)], restart=True)
    # The primary puts the binary back a moment after it went, then waits (at most
    # 30 s) for the second run.
    primary = session_config(sid(), ["/bin/sh", "-c", (
        f"while [ ! -e {away} ]; do sleep 0.05; done; sleep 1.5; mv {away} {program}; "
        f"i=0; while [ ! -e {second} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
        f"[ -e {second} ]")])
    result = sandbox.run(executor_config(primary, flaky))
    assert result.returncode == 0, result.log
    assert "SIGHUP" not in result.log and "reload" not in result.log
    retries = [float(d) for d in re.findall(
        rf"session {flaky.common.id} failed to relaunch; retrying in ([0-9.]+)s", result.log)]
    assert retries, result.log
    assert retries == sorted(retries) and len(set(retries)) == len(retries)   # backing off
    got = result.session(flaky.common.id)
    assert got.started == "true"                  # the last launch worked
    assert got.diagnostics.resurrection_count == len(retries) + 1


def test_a_primary_that_cannot_start_stops_the_agent_and_launches_nothing_more(sandbox):
    """Sessions are launched in ID order; those after a primary that failed to start
    are not launched (the agent is stopping) and say so in `started`."""
    primary = session_config("a" + sid()[1:], ["/not/there"])
    other = session_config("b" + sid()[1:], ["/bin/sleep", "1000"])
    result = sandbox.run(executor_config(primary, other), timeout=60)
    assert result.returncode == 127, result.log
    assert result.session(other.common.id).started == "not launched: the agent is stopping"
    assert "still running" not in result.log
