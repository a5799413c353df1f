"""The kernel command line (tether/system.py `kernel_args`, `kernel_arg`): read once, in
one place, for every `tether.*` kernel argument the agent takes. The clock and RNG
actions a VM template's clone takes (tether/system.py)."""
from __future__ import annotations

import errno
import os

import pytest

from helpers import require_root
from tether import guestinfo, system


def test_a_kernel_argument_is_the_first_value_of_its_name():
    args = ["quiet", "tether.guestinfoX=/no", "tether.guestinfo=/first", "tether.guestinfo=/2",
            "tether.empty="]
    assert system.kernel_arg("tether.guestinfo", args) == "/first"
    assert system.kernel_arg("tether.empty", args) == ""
    assert system.kernel_arg("quiet", args) is None      # a flag has no value
    assert system.kernel_arg("tether.absent", args) is None
    assert guestinfo.kernel_guestinfo_file(["tether.guestinfo=/f.vmx"]) == "/f.vmx"
    assert guestinfo.kernel_guestinfo_file(["tether.guestinfo="]) is None


def test_the_kernel_command_line_is_read_once(tmp_path, monkeypatch):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 tether.template=1\n")
    monkeypatch.setattr(system, "CMDLINE", str(cmdline))
    monkeypatch.setattr(system, "_kernel_args", None)
    assert system.kernel_args() == ["console=ttyS0", "tether.template=1"]
    cmdline.write_text("console=ttyS0\n")
    assert system.kernel_arg("tether.template") == "1"    # as read the first time
    assert system.kernel_args("a  b\n") == ["a", "b"]     # a given text is only split
    monkeypatch.setattr(system, "_kernel_args", None)
    monkeypatch.setattr(system, "CMDLINE", str(tmp_path / "missing"))
    assert system.kernel_args() == []


# -- the platform actions ----------------------------------------------------------------------
def as_nobody(action) -> int:
    """Run `action()` in a child that has dropped root; its errno (0: no error)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 255
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                action()
                code = 0
            except OSError as err:
                code = err.errno or 254
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        data = os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return data[0]


def test_set_clock_sets_the_wall_clock():
    """Only the refusal is safe to watch here: without CAP_SYS_TIME the kernel says no,
    which it only says to a clock_settime(CLOCK_REALTIME) (and the value is now anyway)."""
    require_root("to drop to nobody in a child")
    import time
    assert as_nobody(lambda: system.set_clock(time.time_ns())) == errno.EPERM


def test_reseed_random_writes_the_seed_then_reseeds_the_crng(tmp_path):
    require_root("RNDRESEEDCRNG needs CAP_SYS_ADMIN")
    system.reseed_random(os.urandom(32))                 # harmless: one more reseed
    # without CAP_SYS_ADMIN the write is allowed, the ioctl is not: it is made
    assert as_nobody(lambda: system.reseed_random(os.urandom(32))) == errno.EPERM
    # the write comes first, and the ioctl goes to the same file
    plain = tmp_path / "pool"
    plain.write_bytes(b"")
    with pytest.raises(OSError, match="RNDRESEEDCRNG") as raised:
        system.reseed_random(b"s" * 32, device=str(plain))
    assert raised.value.errno == errno.ENOTTY
    assert plain.read_bytes() == b"s" * 32
