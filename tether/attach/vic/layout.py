"""Where the agent serves VIC's attach, and with which settings; cheap to import.

VIC wires a container VM's serial ports so: COM1 (ttyS0) to the port layer (attach),
COM2 (ttyS1) the kernel console and the agent's log, COM3 (ttyS2) the session output
log. The server module (and with it socket, asyncio and SSH) is imported only when
there is somewhere to serve.
"""
from __future__ import annotations

import os

from tether.log import get_logger

log = get_logger("tether.attach.vic")

LINE = "/dev/ttyS0"            # COM1: VIC wires it to the port layer
LOG_LINE = "/dev/ttyS1"        # COM2: kernel console and the agent's log
CMDLINE_HANDSHAKE = "tether.vic_handshake="
CMDLINE_AUTH = "tether.vic_auth="


def kernel_console(args: list[str]) -> str:
    """The device of the last console= argument (the one /dev/console is), or ''."""
    consoles = [a[len("console="):].split(",")[0] for a in args if a.startswith("console=")]
    return consoles[-1] if consoles else ""


def vic_layout(transport_module: str, args: list[str]) -> bool:
    """VIC's serial layout applies when guestinfo comes over the VMware backdoor (a VM that
    VIC created) or when the kernel console is ttyS1 (VIC's ISO command line, which
    leaves COM1 to the port layer)."""
    return transport_module.startswith("extraconfig.backdoor") or \
        kernel_console(args) == "ttyS1"


def settings(options: dict | None, args: list[str]) -> tuple[str, bool]:
    """(handshake variant, require the client key): options, else kernel arguments,
    else head and no key (what the reference's port layer does)."""
    options = options or {}
    variant = options.get("handshake")
    auth = options.get("auth")
    for arg in args:
        if variant is None and arg.startswith(CMDLINE_HANDSHAKE):
            variant = arg[len(CMDLINE_HANDSHAKE):]
        if auth is None and arg.startswith(CMDLINE_AUTH):
            auth = arg[len(CMDLINE_AUTH):]
    from tether.attach.vic import handshake as hs
    auth = (auth or "none").strip().lower()
    if auth not in ("none", "key"):
        raise ValueError(f"unknown VIC attach auth {auth!r}: use none or key")
    return hs.parse_variant(variant or hs.HEAD), auth == "key"


def start_for_agent(host, *, endpoints: list[str] | None, options: dict | None,
                    in_vm: bool, transport_module: str) -> "object | None":
    """The agent's VIC attach: explicit endpoints (the sandbox, `--vic-attach`), or, in a
    VM wired as VIC wires them (`in_vm`: PID 1 of a VM, not the sandbox), COM1; there the
    agent log goes to COM2 too. `host` is the agent's host interface."""
    from tether.system import kernel_args
    args = kernel_args() if in_vm else []
    if endpoints is None:
        endpoints = []
        if in_vm and vic_layout(transport_module, args) and os.path.exists(LINE):
            endpoints = [LINE]
            log.info("VIC's serial layout (guestinfo over %s, kernel console %s): attach "
                     "on ttyS0", transport_module, kernel_console(args) or "none")
            if kernel_console(args) != "ttyS1" and os.path.exists(LOG_LINE):
                from tether.console import redirect_log
                redirect_log(LOG_LINE)
    if not endpoints:
        return None
    variant, require_key = settings(options, args)
    if require_key and not host.key:
        raise RuntimeError("VIC attach auth 'key' needs ExecutorConfig.Key in the config")
    from tether.attach.vic.server import VicAttachServer
    server = VicAttachServer(host, endpoints, variant=variant, require_key=require_key)
    log.info("VIC attach on %s (%s handshake%s)", ", ".join(endpoints), variant,
             ", client key required" if require_key else "")
    return server

