"""Limits, OOM records, capabilities, no_new_privileges and hooks, against the real agent
as PID 1 of `tether sandbox`, which gives it a cgroup subtree of its own (removed after)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import (REPO, connect_client, missing, not_applicable, require_namespaces,
                     require_tool)

PY = sys.executable
PATH_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
DOCKER_DEFAULT_CAPBND = "00000000a80425fb"
NET_RAW = 13


def session(argv, **extra) -> dict:
    return {"cmd": {"path": argv[0], "args": list(argv), "env": PATH_ENV}, **extra}


def config(primary: dict, **others) -> dict:
    return {"common": {"id": "main"}, "sessions": {"main": primary, **others}}


def cgroups_missing() -> str | None:
    from tether import cgroups
    try:
        layout = cgroups.find_layout()
    except OSError as err:
        return f"cannot read the cgroup layout: {err}"
    missing = [c for c in ("memory", "cpu", "pids") if c not in layout.controllers]
    return f"no {', '.join(missing)} controller here ({layout})" if missing else None


@pytest.fixture
def limited(sandbox):
    reason = cgroups_missing()
    if reason:
        missing("cgroup controllers", reason)
    return sandbox


def decoded(guestinfo: dict):
    """The config as the host reads it back, our extension included."""
    from extraconfig.transport import GuestSource, MapTransport
    from tether.extension import decode_config
    return decode_config(GuestSource(MapTransport(dict(guestinfo))))


def records(result, sid: str):
    return decoded(result.guestinfo).sessions[sid]


def sandbox_groups_left(pid: int) -> list[str]:
    from tether import cgroups
    layout = cgroups.find_layout()
    bases = {d for _, d in layout.controllers.values()} | ({layout.core} - {None})
    name = f"{cgroups.SANDBOX_PREFIX}{pid}"
    return [os.path.join(b, name) for b in bases if os.path.exists(os.path.join(b, name))]


# -- memory --------------------------------------------------------------------------------
def test_a_session_over_its_memory_limit_is_oom_killed_and_recorded(limited, hypervisor):
    from extraconfig.transport import NIL
    from tether.extension import encode_config
    from tether.jsonform import config_from_json
    sim, path = hypervisor
    hog = session([PY, "-c", "b = bytearray(256 << 20); print('allocated')"],
                  limits={"memory_bytes": 32 << 20})
    primary = session(["/bin/sh", "-c", "sleep 600"])
    cfg = config_from_json(config(primary, hog=hog))
    sim.guestinfo.update({k: v or NIL for k, v in encode_config(cfg).items()})
    box = limited.start(cfg, extra_args=["--backdoor-sim", path], stop_grace=2)
    # written back with the status when the session exits, while the agent and the
    # primary go on running (not only in the final write-back at shutdown); the list's
    # length key comes after its elements
    count = "guestinfo.vice..tether.sessions|hog.exitrecords"
    assert sim.wait_for(lambda s: s.guestinfo.get(count) == "0", 30), box.log_text()
    live = dict(sim.guestinfo)
    assert live["guestinfo.vice..sessions|hog.status"] == "-1"
    assert live["guestinfo.vice..tether.sessions|hog.exitrecords|0.oomkilled"] == "true"
    assert live["guestinfo.vice..tether.sessions|hog.exitrecords|0.reason"] == "oom"
    assert box.proc.poll() is None
    assert "session main (pid" not in box.log_text()
    box.signal(15)
    result = box.wait()
    assert result.returncode == 128 + 15, result.log
    assert "allocated" not in result.log
    final = decoded(sim.guestinfo)   # the agent wrote to the simulated hypervisor
    hog_record = final.sessions["hog"].exit_records[-1]
    assert (hog_record.oom_killed, hog_record.reason, hog_record.signal,
            hog_record.exit_code) == (True, "oom", 9, 137)
    assert "out of memory" in final.sessions["hog"].diagnostics.exit_logs[-1].message
    main_record = final.sessions["main"].exit_records[-1]
    assert (main_record.oom_killed, main_record.reason, main_record.signal) == (
        False, "stopped", 15)
    assert sandbox_groups_left(box.pid) == []


def test_an_oom_kill_of_a_child_is_seen_while_the_session_runs_on(limited):
    script = ("import subprocess, sys, time\n"
              "r = subprocess.run([sys.executable, '-c', 'b = bytearray(256 << 20)'])\n"
              "print('child returned', r.returncode, flush=True)\n"
              "time.sleep(1)\n")   # runs on: only the OOM watch can tell before the exit
    primary = session([PY, "-c", script], limits={"memory_bytes": 48 << 20})
    result = limited.run(config(primary))
    assert "child returned -9" in result.log
    # the watch (memory.events / memory.oom_control) reported it before the exit
    assert re.search(r"session main: the OOM killer killed 1 process", result.log), result.log
    record = records(result, "main").exit_records[-1]
    assert (record.oom_killed, record.reason, record.exit_code) == (True, "exited", 0)


# -- pids and cpu --------------------------------------------------------------------------
FORK_UP_TO_200 = """
import os, time
n = 0
try:
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            time.sleep(2)
            os._exit(0)
        n += 1
except OSError as err:
    print("fork failed:", err.strerror, flush=True)
print("forked", n, flush=True)
"""


def test_a_pids_limit_stops_a_fork_bomb(limited):
    primary = session([PY, "-c", FORK_UP_TO_200], limits={"pids": 20})
    result = limited.run(config(primary))
    forked = int(re.search(r"forked (\d+)", result.log).group(1))
    assert forked < 20, result.log
    assert "fork failed: Resource temporarily unavailable" in result.log


def test_a_cpu_limit_holds_a_busy_loop_to_a_fifth_of_a_cpu(limited, tmp_path):
    socket_path = tmp_path / "attach.sock"
    primary = session([PY, "-c", "while True: pass"], limits={"cpus": 0.2})
    box = limited.start(config(primary), attach_socket=socket_path, stop_grace=2)
    box.wait_for_log(r"session main started")
    with connect_client(f"unix:{socket_path}", box, wait=60) as client:
        time.sleep(1)
        first = client.stats()
        time.sleep(5)
        second = client.stats()
    box.signal(15)
    box.wait()
    a, b = first["sessions"]["main"], second["sessions"]["main"]
    assert a["source"] == b["source"] == "cgroup"
    share = (b["cpu_usec"] - a["cpu_usec"]) / 1e6 / (second["time"] - first["time"])
    print(f"share {share:.3f}")
    assert 0.15 <= share <= 0.25, f"the busy loop had {share:.1%} of a CPU"


# -- capabilities and privileges -------------------------------------------------------------
PING = "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; exec ping -c1 -W2 127.0.0.1"


def without(caps: list[str], name: str) -> list[str]:
    return [c for c in caps if c != name]


def test_ping_works_with_the_default_set_and_capbnd_is_dockers(limited):
    if not shutil.which("ping"):
        pytest.fail("ping is missing (iputils-ping)")
    result = limited.run(config(session(["/bin/sh", "-c", PING])))
    assert f"CapBnd:\t{DOCKER_DEFAULT_CAPBND}" in result.log
    assert f"CapEff:\t{DOCKER_DEFAULT_CAPBND}" in result.log
    assert result.returncode == 0, result.log
    assert "1 received" in result.log


def test_ping_fails_without_net_raw_and_capbnd_says_so(limited):
    if not shutil.which("ping"):
        pytest.fail("ping is missing (iputils-ping)")
    from tether.privileges import DEFAULT
    primary = session(["/bin/sh", "-c", PING], capabilities=without(list(DEFAULT), "NET_RAW"))
    result = limited.run(config(primary))
    expected = int(DOCKER_DEFAULT_CAPBND, 16) & ~(1 << NET_RAW)
    assert f"CapBnd:\t{expected:016x}" in result.log, result.log
    assert result.returncode != 0, result.log
    assert "1 received" not in result.log


SETUID_HELPER = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d uid=%d\n", (int)geteuid(), (int)getuid()); return 0; }
"""


@pytest.fixture
def setuid_helper():
    """A setuid-root program in a directory every user can reach (not tmp_path: 0700)."""
    if not shutil.which("cc"):
        pytest.fail("no C compiler (gcc) to build the setuid helper")
    directory = tempfile.mkdtemp(prefix="tether-setuid-", dir="/var/tmp")
    try:
        os.chmod(directory, 0o755)
        source = os.path.join(directory, "whoami.c")
        binary = os.path.join(directory, "whoami")
        with open(source, "w") as f:
            f.write(SETUID_HELPER)
        subprocess.run(["cc", "-o", binary, source], check=True, timeout=120)
        os.chown(binary, 0, 0)
        os.chmod(binary, 0o4755)
        yield binary
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_no_new_privileges_keeps_a_setuid_binary_from_gaining_root(limited, setuid_helper):
    plain = session([setuid_helper], user="nobody")
    guarded = session(["/bin/sh", "-c", f"grep NoNewPrivs /proc/self/status; {setuid_helper}"],
                      user="nobody", no_new_privileges=True)
    first = limited.run(config(plain))
    second = limited.run(config(guarded))
    assert "euid=0 uid=65534" in first.log, first.log   # the helper does work
    assert "NoNewPrivs:\t1" in second.log
    assert "euid=65534 uid=65534" in second.log, second.log


def test_an_explicit_keep_list_gives_a_non_root_session_ambient_capabilities(limited):
    primary = session(["/bin/sh", "-c", "grep -E '^Cap(Eff|Amb)' /proc/self/status"],
                      user="nobody", capabilities=["NET_BIND_SERVICE"])
    default = session(["/bin/sh", "-c", "grep -E '^Cap(Eff|Amb)' /proc/self/status"],
                      user="nobody")
    bind = f"{1 << 10:016x}"
    result = limited.run(config(primary))
    assert f"CapEff:\t{bind}" in result.log and f"CapAmb:\t{bind}" in result.log, result.log
    result = limited.run(config(default))
    assert f"CapEff:\t{0:016x}" in result.log, result.log


def test_the_parent_death_signal_is_armed_in_the_session(limited):
    probe = "import prctl, time; print('pdeathsig', prctl.get_pdeathsig(), flush=True); "
    result = limited.run(config(session([PY, "-c", probe + "time.sleep(2)"]),
                                armed=session([PY, "-c", probe], parent_death_signal="KILL")))
    assert result.log.count("pdeathsig 9") == 1 and result.log.count("pdeathsig 0") == 1, \
        result.log


def test_asking_for_a_capability_the_agent_lacks_fails_the_launch_clearly(tmp_path):
    """The sandbox runs with CAP_SYS_TIME out of its bounding set; a session asking for it
    gets a `started` that says so, and one asking for a made-up name too."""
    require_namespaces()
    import prctl
    path = tmp_path / "config.json"
    # launched in ID order, both before the primary (a failed primary stops the rest)
    path.write_text(json.dumps(config(
        session(["/bin/true"]),
        **{"a-systime": session(["/bin/true"], capabilities=["SYS_TIME"]),
           "b-typo": session(["/bin/true"], capabilities=["NET_RAWW"])})))
    out = tmp_path / "out.vmx"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([PY, "-m", "tether", "sandbox", str(path), "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: prctl.capbset_drop(prctl.CAP_SYS_TIME))
    from extraconfig.transport import parse_vmx
    keys = parse_vmx(out.read_text())
    assert keys["guestinfo.vice..sessions|a-systime.started"] == (
        "capabilities: the agent does not hold CAP_SYS_TIME (not in its bounding set), "
        "so the session cannot be given it"), run.stderr
    assert keys["guestinfo.vice..sessions|b-typo.started"] == (
        "capabilities: unknown capability 'NET_RAWW'")
    assert keys["guestinfo.vice..sessions|main.started"] == "true"


# -- hooks ---------------------------------------------------------------------------------------
def hook_script(directory, name: str, body: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


HOOK_POINTS = ("prestart", "create_runtime", "create_container", "start_container",
               "poststart", "poststop")


def test_hooks_run_in_order_with_the_state_on_stdin(limited, tmp_path):
    log = tmp_path / "hooks.log"
    marker = tmp_path / "ran"
    hooks = {}
    for point in HOOK_POINTS:
        body = (f'state=$(cat)\n'
                f'if [ -e {marker} ]; then seen=after; else seen=before; fi\n'
                f'echo "{point} $seen $state" >> {log}\n')
        hooks[point] = [{"path": hook_script(tmp_path, point, body), "env": PATH_ENV}]
    primary = session(["/bin/sh", "-c", f"touch {marker}; echo $$ > {marker}"])
    cfg = config(primary)
    cfg["hooks"] = hooks
    result = limited.run(cfg)
    assert result.returncode == 0, result.log
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert [line[0] for line in lines] == list(HOOK_POINTS)
    # the launch hooks ran before the session's own program did
    assert [line[1] for line in lines[:4]] == ["before"] * 4
    assert lines[5][1] == "after"
    states = [json.loads(line[2]) for line in lines]
    pid = int(marker.read_text())
    assert [s["status"] for s in states] == ["created"] * 4 + ["running", "stopped"]
    assert all(s["id"] == "main" and s["ociVersion"] and s["bundle"] == "/" for s in states)
    assert [s["pid"] for s in states[:5]] == [pid] * 5


def test_a_failing_prestart_hook_stops_the_launch_with_its_message(limited, tmp_path):
    marker = tmp_path / "ran"
    bad = hook_script(tmp_path, "check", "echo 'the volume is not mounted' >&2\nexit 4\n")
    cfg = config(session(["/bin/sh", "-c", f"touch {marker}"]))
    cfg["hooks"] = {"prestart": [{"path": bad}]}
    box = limited.start(cfg)
    result = box.wait()
    assert result.session("main").started == (
        f"prestart hook 0 ({bad}): exited 4: the volume is not mounted")
    assert not marker.exists()
    assert result.returncode == 127
    assert sandbox_groups_left(box.pid) == []


def test_a_failing_poststop_hook_is_in_the_exit_record(limited, tmp_path):
    bad = hook_script(tmp_path, "cleanup", "echo 'nothing to clean' >&2\nexit 1\n")
    cfg = config(session(["/bin/true"]))
    cfg["hooks"] = {"poststop": [{"path": bad}]}
    result = limited.run(cfg)
    record = records(result, "main").exit_records[-1]
    assert record.message == f"poststop hook 0 ({bad}): exited 1: nothing to clean"
    assert record.message in result.session("main").diagnostics.exit_logs[-1].message


def test_groups_of_a_killed_sandbox_are_removed_by_the_next_one(limited):
    box = limited.start(config(session(["/bin/sleep", "600"])))
    box.wait_for_log(r"session main started")
    assert sandbox_groups_left(box.pid)
    box.kill()   # SIGKILL: no chance to clean up; its agent dies with it (pdeathsig)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{box.pid}"):
        time.sleep(0.05)
    limited.run(config(session(["/bin/true"])))
    assert sandbox_groups_left(box.pid) == []


def test_pid1_without_a_cgroup_namespace_leaves_the_hosts_cgroups_alone(tmp_path):
    """`tether agent` as PID 1 of a PID namespace only: the cgroups it sees are the
    host's, so it makes no groups there (the session stays in the agent's own)."""
    require_namespaces()
    require_tool("unshare")
    from tether import cgroups
    if cgroups.not_at_root() is None:
        not_applicable("this test process is at the root of every hierarchy: nothing to tell "
                       "apart")
    path = tmp_path / "config.json"
    cfg = config(session(["/bin/cat", "/proc/self/cgroup"]))
    cfg["diagnostics"] = {"debug_level": 1}   # the session's output echoed on the log
    path.write_text(json.dumps(cfg))
    vmx = tmp_path / "guestinfo.vmx"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    encode = subprocess.run([PY, "-m", "tether", "config", "encode", str(path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    vmx.write_text(encode.stdout)
    run = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc",
                          "--mount-proc", PY, "-m", "tether", "agent", "--guestinfo-file",
                          str(vmx), "--no-attach"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert "leaves the host's cgroups alone" in run.stderr, run.stderr
    assert re.search(r"^\d+:[^:]*:/", run.stderr, re.M), run.stderr   # cat's output
    assert "session-" not in run.stderr, run.stderr
