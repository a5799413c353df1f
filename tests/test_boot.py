"""The direct kernel boot's machine and command line, without booting (no QEMU needed):
the firmware, the kernel arguments and which initrd `tether vm` hands QEMU."""
from __future__ import annotations

import os

import pytest

from helpers import missing
from tether.jsonform import config_from_json
from tether.vm import QBOOT, Disk, MachineSpec, VmRun, kernel_command_line, qemu_argv

SOCKETS = {name: f"/tmp/{name}.sock" for name in
           ("console", "org.tether.guestinfo", "org.tether.output", "org.tether.attach")}


def test_direct_boot_skips_the_initcalls_a_container_vm_never_uses():
    line = kernel_command_line("ttyS0")
    assert "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init" in line.split()
    assert "quiet" in line.split() and "console=ttyS0" in line.split()


def test_direct_boot_keeps_the_lock_prefixes_and_skips_the_apic_timer_calibration():
    args = kernel_command_line("ttyS0").split()
    assert "noreplace-smp" in args and "nolapic_timer" in args


def test_direct_boot_uses_qboot_and_the_iso_seabios():
    if not os.path.isfile(QBOOT):
        missing("qboot", f"no {QBOOT} (package qemu-system-data)")
    direct = MachineSpec(iso=None, disks=[Disk("/r.ext4", 2, readonly=True)], nics=[],
                         kernel="/k/vmlinux", initrd="/k/initrd.img")
    argv = qemu_argv(direct, SOCKETS)
    assert argv[argv.index("-bios") + 1] == QBOOT
    assert argv[argv.index("-machine") + 1] == "q35"
    iso = MachineSpec(iso="/i.iso", disks=[], nics=[])
    assert "-bios" not in qemu_argv(iso, SOCKETS)      # isolinux needs SeaBIOS's disk calls


@pytest.fixture
def image(tmp_path):
    for name in ("vmlinux", "initrd.img", "initrd-debug.img", "root.ext4", "bootstrap.iso",
                 "bootstrap-debug.iso"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def initrd_of(image, **kwargs) -> str:
    config = config_from_json({"common": {"id": "a"}, "sessions": {"a": {"cmd": {"path": "/bin/true"}}}})
    run = VmRun(config, str(image), **kwargs)
    try:
        return os.path.basename(run.spec.initrd)
    finally:
        run.close()


def test_the_plain_boot_gets_the_small_initrd_the_debug_one_busybox(image):
    assert initrd_of(image) == "initrd.img"
    assert initrd_of(image, kernel_args="tether.debug=2") == "initrd.img"
    assert initrd_of(image, debug_image=True) == "initrd-debug.img"
    assert initrd_of(image, kernel_args="tether.shell=1") == "initrd-debug.img"
    os.unlink(image / "initrd-debug.img")          # an image built before the split
    assert initrd_of(image, debug_image=True) == "initrd.img"
