"""The direct kernel boot's machine and command line, without booting (no QEMU needed):
the firmware and the kernel arguments."""
from __future__ import annotations

import os

import pytest

from helpers import missing
from tether.jsonform import config_from_json
from tether.vm import QBOOT, Disk, MachineSpec, kernel_command_line, qemu_argv

SOCKETS = {name: f"/tmp/{name}.sock" for name in
           ("console", "org.tether.guestinfo", "org.tether.output", "org.tether.attach")}


def test_direct_boot_skips_the_initcalls_a_container_vm_never_uses():
    line = kernel_command_line("ttyS0")
    assert "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init" in line.split()
    assert "quiet" in line.split() and "console=ttyS0" in line.split()


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
