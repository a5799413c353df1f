"""Guestinfo over the VMware backdoor (vSphere), and the pieces the toolbox needs.

`open_transport(log)` returns a guestinfo transport (`info_get`/`info_set`) that reaches
the VMX — RPCI over the backdoor ports, else `vmware-rpctool` — or None, after logging
one line saying why, so the caller falls back to another transport. It never faults on a
machine without the backdoor: see `native.py` for the order of checks.
"""

from __future__ import annotations

from .message import BackdoorError, MessageChannel
from .protocol import PROTO_RPCI, PROTO_TCLO, Regs
from .rpci import RpciTransport, RpcToolTransport

__all__ = ["open_transport", "BackdoorError", "MessageChannel", "RpciTransport",
           "RpcToolTransport", "PROTO_RPCI", "PROTO_TCLO", "Regs"]

RPCTOOL = "vmware-rpctool"


def open_transport(log, *, sim_socket: str | None = None, ports=None):
    """The backdoor guestinfo transport, or None (with a log line saying why).

    `sim_socket` connects to a simulated hypervisor (`tether sandbox --backdoor-sim`);
    `ports` gives any `Ports` object directly (tests).
    """
    from . import native

    if sim_socket is not None:
        from .bridge import SocketPorts
        try:
            ports = SocketPorts(sim_socket)
        except OSError as err:
            log.warning("guestinfo: cannot reach the simulated hypervisor at %s (%s); "
                        "falling back", sim_socket, err)
            return None
    try:
        found = native.probe(ports)
    except BackdoorError as err:
        found = native.Probe(False, str(err))
    if found.present:
        transport = RpciTransport(ports if ports is not None else native.NativePorts())
        reason = _check_rpci(transport)
        if reason is None:
            log.info("guestinfo: using RPCI over the VMware backdoor (%s)", found.reason)
            return transport
        transport.close()
        why = (f"{found.reason}, but the backdoor's RPC channel is unusable ({reason})")
    else:
        why = f"no VMware backdoor: {found.reason}"
    if ports is None:
        tool = _rpctool(found)
        if tool is not None:
            log.info("guestinfo: using %s (%s)", tool.path, why)
            return tool
    log.info("guestinfo: %s; falling back to the next transport", why)
    return None


def _check_rpci(transport: RpciTransport) -> str | None:
    """None when an RPCI request gets an answer, else why not."""
    try:
        transport.info_get("guestinfo.ovfEnv")   # what the reference reads first anyway
    except BackdoorError as err:
        return str(err)
    return None


def _rpctool(found) -> RpcToolTransport | None:
    """vmware-rpctool, if installed, and only on VMware: elsewhere it cannot work."""
    vendor = found.vendor
    if not vendor:
        from . import native
        vendor = native.hypervisor_vendor() or ""
    if vendor != "VMwareVMware":
        return None
    import shutil   # only on VMware: PID 1 pays for no import it does not use
    path = shutil.which(RPCTOOL)
    return None if path is None else RpcToolTransport(path)
