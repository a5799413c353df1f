"""A hostile session against its confinement: the real agent as PID 1 of `tether sandbox`,
a root (or non-root) program probing what it holds and what of this machine it can
reach. A session must not change the host: its files, sysctls, devices."""
from __future__ import annotations

import os
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
