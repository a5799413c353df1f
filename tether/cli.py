"""The `tether` command: dispatches to subcommands, importing only the one that runs."""
from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function, one-line help). Each function takes argv (after the name).
COMMANDS = {
    "agent": ("tether.agentcli", "main", "run the agent (PID 1 of a container VM)"),
    "sandbox": ("tether.sandbox", "main", "run the agent as PID 1 of new namespaces here"),
    "config": ("tether.configcli", "main", "encode JSON config to VMX lines, or decode back"),
    "logs": ("tether.logscli", "main", "print a session output log (iolog framing)"),
    "attach": ("tether.clientcli", "attach_main", "attach to a session"),
    "exec": ("tether.clientcli", "exec_main", "start a process in a running agent"),
    "ps": ("tether.clientcli", "ps_main", "list sessions"),
    "kill": ("tether.clientcli", "kill_main", "signal a session"),
    "cp": ("tether.clientcli", "cp_main", "copy files into or out of the container"),
    "ports": ("tether.portscli", "main", "list the ports a config or guestinfo publishes"),
    "vm": ("tether.vm", "main", "boot a config in a QEMU VM, playing the port layer"),
    "boot-timeline": ("tether.bootchart", "main", "show a VM's boot timeline from its guestinfo map"),
    "vsphere": ("tether.vsphere.cli", "main", "run|ps|logs|stop|rm container VMs on vSphere"),
}


def usage() -> str:
    lines = ["usage: tether COMMAND [ARGS...]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # the reader went away (`tether logs FILE | head`): stop quietly, as cat does;
        # stdout points at /dev/null so the interpreter's last flush fails no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141      # 128 + SIGPIPE, what a shell reports for a writer cut off


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tether: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
