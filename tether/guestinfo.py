"""Choosing the guestinfo transport: VMware backdoor, else virtio-serial, else a file.

A VM whose host gave it the virtio-serial port `org.tether.guestinfo` (`tether vm`) uses
that port and never probes the backdoor: the port is the host naming the channel, and
QEMU's `vmport` answers GETVERSION but has no RPCI, so the probe (its modules, a forked
child, the RPCI attempt: ~50 ms of a boot under TCG) could only end in a fallback. The
kernel argument `tether.probe_backdoor=1` probes it first all the same (to see, on the
console, what the backdoor answers). Otherwise each candidate that is missing or not
usable is logged with the reason and the next one is tried. The file is a VMX-style file
named by `--guestinfo-file` or the kernel argument `tether.guestinfo=PATH`.
"""
from __future__ import annotations

from tether.log import get_logger

log = get_logger("tether.guestinfo")

KERNEL_ARG = "tether.guestinfo="
PROBE_BACKDOOR_ARG = "tether.probe_backdoor"    # =1: probe the backdoor even with the port


def kernel_guestinfo_file(args: list[str] | None = None) -> str | None:
    """The file of `tether.guestinfo=PATH` among the kernel arguments (`args`, else the
    kernel's own: tether/system.py reads them)."""
    from tether.system import kernel_arg
    return kernel_arg(KERNEL_ARG.rstrip("="), args) or None


def candidates(sys_root: str = "/sys", dev_root: str = "/dev",
               args: list[str] | None = None) -> tuple[str, ...]:
    """The channel modules to try, in order (`args`: the kernel arguments, else the
    kernel's own)."""
    from extraconfig.virtio import PORT_NAME, find_port
    if find_port(PORT_NAME, sys_root, dev_root) is not None:
        from tether.system import kernel_arg
        if kernel_arg(PROBE_BACKDOOR_ARG, args) != "1":
            log.info("guestinfo: the host gave the virtio-serial port %s: the VMware "
                     "backdoor is not probed (kernel argument %s=1 probes it)",
                     PORT_NAME, PROBE_BACKDOOR_ARG)
            return ("extraconfig.virtio",)
    return ("extraconfig.backdoor", "extraconfig.virtio")


def open_transport(guestinfo_file: str | None = None):
    """The first guestinfo transport that works, or raise RuntimeError saying why none did."""
    if guestinfo_file is None:
        for module in candidates():
            try:
                opener = __import__(module, fromlist=["open_transport"]).open_transport
            except ImportError as err:
                log.info("guestinfo: %s is not available (%s)", module, err)
                continue
            try:
                transport = opener(log)
            except Exception as err:   # noqa: BLE001 - try the next transport
                log.warning("guestinfo: %s failed: %s", module, err)
                continue
            if transport is not None:
                log.info("guestinfo: using %s", module)
                return transport
            log.info("guestinfo: %s found no channel", module)
        guestinfo_file = kernel_guestinfo_file()
    if guestinfo_file is None:
        raise RuntimeError("no guestinfo channel: no VMware backdoor, no virtio-serial port "
                           "org.tether.guestinfo, and no --guestinfo-file or "
                           f"{KERNEL_ARG}PATH kernel argument")
    from extraconfig.transport import VmxFileTransport
    log.info("guestinfo: using the file %s", guestinfo_file)
    return VmxFileTransport(guestinfo_file)
