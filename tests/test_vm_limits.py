"""Limits in a real VM: the agent as PID 1 mounts cgroup2 itself (no v1 hierarchy there),
gives each session a group of its own, and `tether vm --cpus/--memory` size the VM.

The sandbox tests (test_limits_sandbox.py) cover the same behaviour on whatever this
machine's kernel offers; this one covers cgroup v2 as a container VM has it."""
from __future__ import annotations

import pytest

from test_vm import boot, session

pytestmark = pytest.mark.vm

# busybox sh gives up at the first fork that fails ("can't fork"): one line per child
BOMB = "i=0; while [ $i -lt 100 ]; do sleep 6 & echo child $!; i=$((i+1)); done; wait"


def test_cgroup2_limits_oom_and_pids_in_a_vm(image_dir):  # noqa: F811
    primary = session("/bin/sh", "-c",
                      "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo; "
                      "cat /proc/self/cgroup; grep CapBnd /proc/self/status; sleep 12")
    hog = session("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1",
                  limits={"memory_bytes": 32 << 20})
    bomb = session("/bin/sh", "-c", BOMB, limits={"pids": 20})
    # a child is OOM-killed, the session's shell lives on: only the inotify watch on
    # memory.events can tell before the exit
    parent = session("/bin/sh", "-c", "dd if=/dev/zero of=/dev/null bs=256M count=1; "
                     "echo dd returned $?; sleep 2", limits={"memory_bytes": 32 << 20})
    config = {"common": {"id": "main", "name": "main"},
              "sessions": {"main": primary, "hog": hog, "bomb": bomb, "parent": parent}}
    vm = boot(image_dir, config, cpus=2, memory_mb=768)
    assert vm.result.exit_code == 0, vm.explain()
    text = vm.text()
    lines = text.splitlines()
    assert lines[0] == "2", vm.explain()                       # --cpus 2
    mem_kib = int(lines[1].split()[1])
    assert 600 * 1024 < mem_kib <= 768 * 1024, lines[1]       # --memory 768
    assert "0::/session-main" in text                          # cgroup2 only, its own group
    assert "CapBnd:\t00000000a80425fb" in text
    console = vm.result.console
    assert "cgroups: cgroup2 on /sys/fs/cgroup" in console, vm.explain()
    # the OOM kill, in the reference's status and in our record
    assert vm.session_key("hog", "status") == "-1"
    assert vm.map["guestinfo.vice..tether.sessions|hog.exitrecords|0.oomkilled"] == "true"
    assert vm.map["guestinfo.vice..tether.sessions|hog.exitrecords|0.reason"] == "oom"
    assert "dd returned 137" in vm.text("parent"), vm.text("parent")
    assert "session parent: the OOM killer killed 1 process(es)" in console, vm.explain()
    assert vm.map["guestinfo.vice..tether.sessions|parent.exitrecords|0.oomkilled"] == "true"
    assert vm.map["guestinfo.vice..tether.sessions|parent.exitrecords|0.reason"] == "exited"
    # the fork bomb was held under 20 processes (the shell itself is one of them)
    bomb_out = vm.text("bomb")
    children = [line for line in bomb_out.splitlines() if line.startswith("child ")]
    assert 0 < len(children) < 20, bomb_out
    assert "can't fork" in bomb_out, bomb_out
