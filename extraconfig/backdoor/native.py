"""The CPU's own ports, and deciding whether touching them is safe.

An `inl` on port 0x5658 without I/O permission raises #GP (SIGSEGV kills the process);
with permission on a machine without the backdoor it returns garbage. So the order is:
the C extension must be importable; CPUID must report a hypervisor (bare metal never
has the backdoor); the hypervisor must not be one known to lack it (Hyper-V, Xen, ...:
VMware has it, and so has QEMU with `vmport=on`, whatever vendor string QEMU shows);
this thread must be granted the ports (ioperm/iopl); only then is
GETVERSION sent, and the backdoor counts as present only if it answers with the magic in
ebx (we put its complement there).
"""

from __future__ import annotations

import os
import struct

from .message import BackdoorError
from .protocol import CMD_GETVERSION, MAGIC, MASK32, PORT, Regs

try:
    from . import _portio
except ImportError as err:   # not built (no compiler, not x86-64): other transports remain
    _portio = None
    _IMPORT_ERROR = str(err)
else:
    _IMPORT_ERROR = "" if _portio.SUPPORTED else "built for a platform without x86 port I/O"
    if not _portio.SUPPORTED:
        _portio = None

# `inl` on 0x5658 touches ports 0x5658-0x565b (the CPU checks all four), and `rep insb`/
# `rep outsb` use 0x5659.
PORT_SPAN = 4

# CPUID hypervisor vendors, by name for the log. QEMU's vmport device answers GETVERSION
# under KVM and TCG (TCG may show no vendor leaf at all), so any hypervisor is probed
# except those known to have no VMware backdoor, whose ports are left alone.
VENDOR_NAMES = {"VMwareVMware": "VMware", "KVMKVMKVM": "KVM", "TCGTCGTCGTCG": "QEMU TCG",
                "Microsoft Hv": "Hyper-V", "XenVMMXenVMM": "Xen", "VBoxVBoxVBox": "VirtualBox",
                "ACRNACRNACRN": "ACRN", "bhyve bhyve": "bhyve", "QNXQVMBSQG": "QNX"}
NO_BACKDOOR = {"Microsoft Hv", "XenVMMXenVMM", "VBoxVBoxVBox", "ACRNACRNACRN",
               "bhyve bhyve", "QNXQVMBSQG"}


class Probe:
    """What the probe found (plain data: dataclasses would cost the boot inspect)."""
    __slots__ = ("present", "reason", "vendor", "version")

    def __init__(self, present: bool, reason: str, vendor: str = "", version: int = 0):
        self.present = present     # GETVERSION answered with the magic
        self.reason = reason       # for the log: why (not) present
        self.vendor = vendor       # CPUID hypervisor vendor, "" when none
        self.version = version

    def __repr__(self) -> str:
        return (f"Probe(present={self.present!r}, reason={self.reason!r}, "
                f"vendor={self.vendor!r}, version={self.version!r})")


class NativePorts:
    """`Ports` on the CPU, through the `_portio` extension. Grants access per thread."""

    def __init__(self):
        if _portio is None:
            raise OSError(f"the port I/O extension is not available ({_IMPORT_ERROR})")

    @staticmethod
    def grant() -> None:
        """Ask the kernel for the backdoor ports for this thread; raises OSError."""
        _portio.grant(PORT, PORT_SPAN)

    def _granted(self) -> None:
        try:
            self.grant()
        except OSError as err:
            raise BackdoorError(f"no I/O port access for the backdoor in this thread: {err}")

    def backdoor(self, regs: Regs) -> Regs:
        self._granted()
        return Regs(*_portio.backdoor(tuple(regs)))

    def hb_out(self, regs: Regs, data: bytes) -> Regs:
        self._granted()
        return Regs(*_portio.hb_out(tuple(regs), data))

    def hb_in(self, regs: Regs, size: int) -> tuple[Regs, bytes]:
        self._granted()
        out, data = _portio.hb_in(tuple(regs), size)
        return Regs(*out), data


def extension_available() -> tuple[bool, str]:
    return _portio is not None, _IMPORT_ERROR


def hypervisor_vendor() -> str | None:
    """CPUID's hypervisor vendor string; None on bare metal (hypervisor bit clear)."""
    if _portio is not None:
        if not (_portio.cpuid(1)[2] >> 31) & 1:
            return None
        _, b, c, d = _portio.cpuid(0x40000000)
        return struct.pack("<III", b, c, d).rstrip(b"\0 ").decode("ascii", "replace")
    return _vendor_from_proc()


def _vendor_from_proc() -> str | None:
    # Without the extension: the kernel's view. Enough to choose vmware-rpctool.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    if " hypervisor" not in flags:
        return None
    try:
        with open("/sys/class/dmi/id/sys_vendor") as f:
            if "VMware" in f.read():
                return "VMwareVMware"
    except OSError:
        pass
    return ""


def probe(ports=None) -> Probe:
    """Detect the VMware backdoor without ever faulting. `ports` overrides the CPU's."""
    if ports is not None:
        return _getversion(ports, vendor="")
    if _portio is None:
        return Probe(False, f"the port I/O extension is not available ({_IMPORT_ERROR})")
    vendor = hypervisor_vendor()
    if vendor is None:
        return Probe(False, "CPUID reports no hypervisor (bare metal has no VMware backdoor)")
    if vendor in NO_BACKDOOR:
        return Probe(False, f"hypervisor {VENDOR_NAMES[vendor]} has no VMware backdoor", vendor)
    try:
        NativePorts.grant()
    except OSError as err:
        return Probe(False, f"no I/O port access for the backdoor ({err.strerror or err}); "
                            "needs root and a kernel with CONFIG_X86_IOPL_IOPERM", vendor)
    faulted = _getversion_in_child()
    if faulted is not None:
        return Probe(False, faulted, vendor)
    return _getversion(NativePorts(), vendor)


def _getversion_in_child() -> str | None:
    """Send GETVERSION from a child process first: if the CPU faults there, the child
    dies and we (maybe PID 1, where a fault would panic the kernel) live on."""
    try:
        pid = os.fork()
    except OSError as err:
        return f"cannot fork to probe the backdoor safely ({err})"
    if pid == 0:
        try:
            _portio.backdoor((MAGIC, ~MAGIC & MASK32, CMD_GETVERSION, PORT, 0, 0, 0))
            os._exit(0)
        except BaseException:   # noqa: BLE001 - a child must never return into the caller
            os._exit(1)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "the backdoor probe's child process was reaped by someone else"
    if os.WIFSIGNALED(status):
        import signal   # only when the probe faulted
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"GETVERSION faulted ({name}) in a child process: no usable backdoor port"
    if os.waitstatus_to_exitcode(status) != 0:
        return "GETVERSION failed in a child process"
    return None


def _getversion(ports, vendor: str) -> Probe:
    out = ports.backdoor(Regs(eax=MAGIC, ebx=~MAGIC & MASK32, ecx=CMD_GETVERSION, edx=PORT))
    if out.ebx == MAGIC and out.eax != MASK32:
        return Probe(True, f"GETVERSION answered with the VMware magic (version {out.eax})",
                     vendor, out.eax)
    where = f"hypervisor {VENDOR_NAMES.get(vendor, repr(vendor))}" if vendor else "the port layer"
    return Probe(False, f"{where} did not answer GETVERSION with the VMware magic "
                        f"(ebx={out.ebx:#x})", vendor)
