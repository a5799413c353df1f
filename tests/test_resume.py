"""The kernel command line (tether/system.py `kernel_args`, `kernel_arg`): read once, in
one place, for every `tether.*` kernel argument the agent takes."""
from __future__ import annotations

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
