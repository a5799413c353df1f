"""A hostile session against its confinement: the real agent as PID 1 of `tether sandbox`,
a root (or non-root) program probing what it holds and what of this machine it can
reach. A session must not change the host: its files, sysctls, devices."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile

import pytest

from helpers import require_tool

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
NET_RAW = 13


def session(argv, **extra) -> dict:
    return {"cmd": {"path": argv[0], "args": list(argv),
                    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}, **extra}


def config(primary: dict, **others) -> dict:
    return {"common": {"id": "main"}, "sessions": {"main": primary, **others}}


def status_fields(log: str, *names: str) -> dict[str, str]:
    found = {}
    for line in log.splitlines():
        key, _, value = line.partition(":\t")
        if key in names and value:
            found[key] = value.strip()
    return found


# -- capabilities ----------------------------------------------------------------------------
@pytest.fixture
def file_inheritable_busybox():
    """A copy of busybox carrying file capabilities: NET_RAW inheritable and effective, none
    permitted (no setuid bit): it gains NET_RAW only from its caller's inheritable set."""
    require_tool("busybox")
    directory = tempfile.mkdtemp(prefix="tether-fcaps-", dir="/var/tmp")
    try:
        os.chmod(directory, 0o755)
        binary = os.path.join(directory, "busybox")
        shutil.copy(BUSYBOX, binary)
        os.chmod(binary, 0o755)
        # struct vfs_cap_data, revision 2: magic | effective, then (permitted, inheritable)
        # for capabilities 0-31 and 32-63
        xattr = struct.pack("<5I", 0x02000000 | 1, 0, 1 << NET_RAW, 0, 0)
        try:
            os.setxattr(binary, "security.capability", xattr)
        except OSError as err:
            pytest.fail(f"cannot set file capabilities on {directory}: {err}")
        yield binary
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_non_root_session_gains_nothing_from_file_inheritable_capabilities(
        sandbox, file_inheritable_busybox):
    # the default keep-list (NET_RAW among it) is the bounding set, but must not be the
    # inheritable set: that gives the program NET_RAW (moby's CVE-2022-24769)
    probe = session([file_inheritable_busybox, "grep", "-E", "^Cap(Inh|Eff)",
                     "/proc/self/status"], user="nobody")
    result = sandbox.run(config(probe))
    assert result.session("main").started == "true", result.log
    caps = status_fields(result.log, "CapInh", "CapEff")
    assert caps == {"CapInh": "0" * 16, "CapEff": "0" * 16}, result.log


def test_a_root_session_still_has_the_keep_list_with_an_empty_inheritable_set(sandbox):
    probe = session(["/bin/sh", "-c", "grep -E '^Cap(Inh|Prm|Eff|Bnd)' /proc/self/status"],
                    capabilities=["NET_RAW", "CHOWN"])
    result = sandbox.run(config(probe))
    keep = f"{(1 << NET_RAW) | 1:016x}"
    assert status_fields(result.log, "CapInh", "CapPrm", "CapEff", "CapBnd") == {
        "CapInh": "0" * 16, "CapPrm": keep, "CapEff": keep, "CapBnd": keep}, result.log


# -- a container root: busybox, a static probe, the image's passwd ------------------------
CHROOT_ESCAPE = r"""
#include <stdio.h>
#include <unistd.h>
#include <sys/stat.h>
/* The classic escape: chroot into a subdirectory, keep the old cwd (now outside the
   root), walk up from it, chroot there. Then: is / still the container root? */
int main(void) {
    mkdir("/tmp/escape", 0700);
    if (chroot("/tmp/escape") != 0) { perror("chroot /tmp/escape"); return 1; }
    for (int i = 0; i < 64; i++) chdir("..");
    if (chroot(".") != 0) { perror("chroot ."); return 1; }
    printf("after the escape: %s\n",
           access("/only-in-the-rootfs", F_OK) == 0 ? "in the container root"
                                                     : "OUTSIDE the container root");
    return 0;
}
"""


@pytest.fixture
def rootfs(tmp_path):
    require_tool("busybox", "cc")
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "mnt"):
        (root / d).mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    (root / "only-in-the-rootfs").write_text("")
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "cat", "ls", "sleep", "grep", "mknod", "wc", "tty", "readlink"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "alice:x:1234:2345:Alice:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    source = tmp_path / "escape.c"
    source.write_text(CHROOT_ESCAPE)
    subprocess.run(["cc", "-static", "-o", str(root / "bin" / "escape"), str(source)],
                   check=True, timeout=120)
    return root


def in_root(argv, **extra) -> dict:
    return {"cmd": {"path": argv[0], "args": list(argv), "env": ["PATH=/bin"]}, **extra}


def test_a_root_session_cannot_chroot_its_way_out_of_the_container_root(sandbox, rootfs):
    # CAP_SYS_CHROOT is in the default set; a bare chroot let this reach the host's /
    result = sandbox.run(config(in_root(["/bin/escape"])), rootfs=rootfs)
    assert result.session("main").started == "true", result.log
    assert "after the escape: in the container root" in result.log, result.log


# the machine's, not the sandbox's: a root session writes them with no capability at all
KERNEL_KNOBS = ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
                "/sys/power/state", "/sys/kernel/mm/transparent_hugepage/enabled")


def test_the_machines_sysctls_and_sys_are_read_only_to_a_root_session(sandbox, rootfs):
    # each opened for writing (where this kernel has it), never written: `>>` with nothing
    script = "".join(f"[ -e {path} ] && if (: >> {path}); then echo 'writable: {path}'; fi; "
                     for path in KERNEL_KNOBS) + "echo done"
    result = sandbox.run(config(in_root(["/bin/sh", "-c", script])), rootfs=rootfs)
    assert "done" in result.log, result.log
    assert "writable:" not in result.log, result.log
    assert "core_pattern: Read-only file system" in result.log, result.log


def test_a_root_session_cannot_make_device_nodes_for_the_machines_disks(sandbox, rootfs):
    # no device cgroup stands in front of MKNOD in the sandbox: a node for the machine's
    # loop0 (7,0) in the root could be opened. Made, never opened.
    script = ("grep CapBnd /proc/self/status; "
              "if mknod /tmp/loop0 b 7 0; then echo 'made a block device'; fi; echo done")
    asked = in_root(["/bin/sh", "-c", "grep CapBnd /proc/self/status"], capabilities=["MKNOD"])
    result = sandbox.run(config(in_root(["/bin/sh", "-c", script]), asked=asked),
                         rootfs=rootfs)
    assert "done" in result.log, result.log
    assert "made a block device" not in result.log, result.log
    assert not (rootfs / "tmp" / "loop0").exists()
    mknod = 1 << 27
    bounding = [int(v, 16) for v in re.findall(r"^CapBnd:\t(\w+)", result.log, re.M)]
    assert sorted(bounding) == [mknod, 0xa80425fb & ~mknod], result.log   # given when asked


def test_a_tty_session_finds_its_tty_by_its_name_in_the_root(sandbox, rootfs):
    probe = in_root(["/bin/sh", "-c", "echo tty: $(tty) fd0: $(readlink /proc/self/fd/0)"],
                    tty=True)
    result = sandbox.run(config(probe), rootfs=rootfs)
    assert re.search(r"tty: (/dev/pts/\d+) fd0: \1\s", result.log), result.log


def test_mounts_made_in_the_root_later_reach_a_running_session(sandbox, rootfs):
    # what the agent mounts in the root after a launch (a reload's volume, the /etc files
    # bound again on a DHCP renewal) must still reach the session's own mount namespace
    watcher = in_root(["/bin/sh", "-c", "i=0; while [ ! -e /mnt/arrived ] && [ $i -lt 600 ]; "
                       "do sleep 0.1; i=$((i+1)); done; [ -e /mnt/arrived ] && "
                       "echo seen the new mount"])
    box = sandbox.start(config(watcher), rootfs=rootfs)
    box.wait_for_log("session main started")
    enter = ["nsenter", "-t", str(box.agent_pid()), "-m"]
    subprocess.run(enter + ["mount", "-t", "tmpfs", "later", str(rootfs / "mnt")],
                   check=True, timeout=30)
    subprocess.run(enter + ["touch", str(rootfs / "mnt" / "arrived")], check=True, timeout=30)
    result = box.wait()
    assert "seen the new mount" in result.log, result.log
    assert not (rootfs / "mnt" / "arrived").exists()   # in the sandbox's namespace only


# -- a hostile /etc/group ------------------------------------------------------------------
def test_a_user_in_more_groups_than_the_kernel_allows_gets_a_short_clear_error(sandbox, rootfs):
    with open("/proc/sys/kernel/ngroups_max") as f:
        most = int(f.read())
    lines = ["root:x:0:", "staff:x:2345:alice"]
    lines += [f"g{n}:x:{10000 + n}:alice" for n in range(most + 10)]   # the user's own too
    lines += ["::::", "odd:x:notanumber:alice", "short:x", "g0again:x:10000:alice,bob"]
    (rootfs / "etc" / "group").write_text("\n".join(lines) + "\n")
    fits = ["staff:x:2345:alice"] + [f"g{n}:x:{10000 + n}:alice" for n in range(most - 1)]
    many = in_root(["/bin/sh", "-c", "echo never ran"], user="alice")
    result = sandbox.run(config(many), rootfs=rootfs)
    started = result.session("main").started
    assert started == (f"user alice is in {most + 11} groups in {rootfs}/etc/group; "
                       f"the kernel allows {most}"), started[:300]
    assert "never ran" not in result.log
    # exactly as many as the kernel allows: launched, with all of them
    (rootfs / "etc" / "group").write_text("\n".join(fits) + "\n")
    at_most = in_root(["/bin/sh", "-c", "echo groups: $(grep Groups: /proc/self/status | wc -w)"],
                      user="alice")
    result = sandbox.run(config(at_most), rootfs=rootfs)
    assert result.session("main").started == "true", result.log[-2000:]
    assert f"groups: {most + 1}" in result.log, result.log[-2000:]   # with "Groups:"


# -- the child half of a launch, without the agent --------------------------------------------
def test_a_relative_dir_starts_in_the_container_root_not_outside_it(rootfs, tmp_path):
    # chroot keeps the cwd: a relative Dir (config or exec) was taken from the agent's cwd,
    # outside the root, and the session ran there (in a VM: the VM's files)
    from tether.sessions import Credentials, LaunchSpec, Session
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "outside-the-root").write_text("")
    (rootfs / "tmp" / "inside-the-root").write_text("")
    out_r, out_w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    spec = LaunchSpec(path="/bin/ls", args=["ls", "."], env=["PATH=/bin"], dir="tmp",
                      root=str(rootfs), creds=Credentials(0, 0, [0], "/"), stdin=null,
                      stdout=out_w, stderr=out_w, tty=False, setup=None)
    cwd = os.getcwd()
    os.chdir(tmp_path)   # the agent's cwd, outside the root
    try:
        pid = Session._fork(spec)
    finally:
        os.chdir(cwd)
        os.close(out_w)
        os.close(null)
    with os.fdopen(out_r) as f:
        listing = f.read().split()
    os.waitpid(pid, 0)
    assert listing == ["inside-the-root"], listing
