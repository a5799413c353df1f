"""`tether vsphere run|ps|logs|stop|rm`: container VMs on vCenter or ESXi, through the API.

    tether vsphere run CONFIG.json --url https://USER:PASS@HOST/sdk [--insecure]
                       [--datastore DS] [--network [ENDPOINT=]NET] [--folder F]
                       [--resource-pool P] [--iso DS_PATH | --image DIR] [--keep | -d]
    tether vsphere ps                  the VMs `run` created: power state, started, status
    tether vsphere logs NAME           the session output log (COM3 file, iolog framing)
    tether vsphere stop NAME           guest halt, power off after --timeout
    tether vsphere rm NAME             delete the VM and its files

Errors are one line on stderr; the exit status is 1 for a vSphere failure, 2 for a usage
or config error, and for `run` the primary session's status (124: timeout, 127: the
primary did not start), as `tether vm`.
"""
from __future__ import annotations

import argparse
import sys

PROG = "tether vsphere"


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="https://USER:PASSWORD@HOST/sdk of vCenter or ESXi "
                        "(default: $TETHER_VSPHERE_URL; the password may come from "
                        "$TETHER_VSPHERE_PASSWORD)")
    common.add_argument("--insecure", action="store_true",
                        help="do not check the server's TLS certificate")
    common.add_argument("--datacenter", help="the datacenter (default: the only one)")
    return common


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = _connection_options()
    parser = argparse.ArgumentParser(prog=PROG, description="Container VMs on vSphere.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="create, start and wait for a "
                              "container VM", description="Create a container VM from a "
                              "config, power it on, wait for its primary session to start "
                              "and exit, print the final guestinfo, and remove the VM.")
    run.add_argument("config", help="the ExecutorConfig in JSON form")
    run.add_argument("--datastore", help="for the VM, its logs and the ISO (default: the only one)")
    run.add_argument("--network", action="append", default=[], metavar="[ENDPOINT=]NETWORK",
                     help="the vSphere network of a config endpoint (repeatable); a bare "
                     "NETWORK serves every endpoint not named (default: the network's name "
                     "in the config)")
    run.add_argument("--folder", help="VM folder (default: the datacenter's)")
    run.add_argument("--resource-pool", help="resource pool (default: the first host's or "
                     "cluster's root pool)")
    run.add_argument("--host", help="the host to run on (default: vSphere's or DRS's choice; "
                     "needed on a cluster without DRS)")
    run.add_argument("--iso", metavar="DS_PATH", help="boot this ISO already on a datastore, "
                     "e.g. '[datastore1] iso/bootstrap.iso' (default: upload IMAGE/bootstrap.iso "
                     "once, keyed by its hash)")
    run.add_argument("--image", default="build", help="directory of init/build's outputs (build/)")
    run.add_argument("--containerfs", metavar="DS_PATH", help="the container image disk (ext4 "
                     "labelled containerfs); attached as a thin child disk (default with a "
                     "layer_id: [DATASTORE] tether/images/ID/ID.vmdk)")
    run.add_argument("--attach-uri", help="connect COM1 (attach) to this URI, e.g. "
                     "tcp://10.0.0.5:2377 (default: left unconnected)")
    run.add_argument("--name", help="VM name (default: the config's name and 8 random hex digits)")
    run.add_argument("--memory", type=int, default=512, help="memory in MiB (512)")
    run.add_argument("--cpus", type=int, default=1, help="virtual CPUs (1)")
    run.add_argument("--timeout", type=float, default=300.0,
                     help="seconds to wait for the start and the exit (300)")
    run.add_argument("--keep", action="store_true", help="keep the VM when it is done")
    run.add_argument("-d", "--detach", action="store_true",
                     help="return once the primary started, leaving the VM running")
    run.add_argument("--out", help="write the final guestinfo map here as VMX lines, as "
                     "tether vm and tether sandbox do (default: stdout); `tether config "
                     "decode FILE` reads it")

    commands.add_parser("ps", parents=[common], help="list the container VMs")

    logs = commands.add_parser("logs", parents=[common], help="print a container VM's output log")
    logs.add_argument("name")
    logs.add_argument("--console", action="store_true",
                      help="the console and agent log (COM2) instead of the output log")
    logs.add_argument("--session", help="only this session ID ('primary': the primary's)")
    logs.add_argument("--raw", action="store_true", help="payload only, no timestamps")
    logs.add_argument("--save", metavar="FILE", help="write the log file as it is "
                      "(`tether logs FILE` reads it)")

    stop = commands.add_parser("stop", parents=[common], help="halt a container VM")
    stop.add_argument("names", nargs="+", metavar="NAME")
    stop.add_argument("--timeout", type=float, default=10.0,
                      help="seconds for the guest to halt before it is powered off (10)")

    rm = commands.add_parser("rm", parents=[common], help="delete a container VM")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="power it off first if running")
    return parser.parse_args(argv)


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def network_options(items: list[str]) -> tuple[dict[str, str], str | None]:
    mapping, default = {}, None
    for item in items:
        endpoint, sep, network = item.partition("=")
        if not sep:
            default = item
        elif not endpoint or not network:
            raise ValueError(f"--network {item!r}: expected ENDPOINT=NETWORK or NETWORK")
        else:
            mapping[endpoint] = network
    return mapping, default


# --------------------------------------------------------------------------- commands

def run_command(conn, args) -> int:
    from tether.jsonform import ConfigError, load_config
    from . import containers
    try:
        config = load_config(args.config)
        mapping, default = network_options(args.network)
    except (ConfigError, ValueError, OSError) as err:
        _say(str(err))
        return 2
    options = containers.RunOptions(
        datacenter=args.datacenter, datastore=args.datastore, networks=mapping,
        default_network=default, folder=args.folder, resource_pool=args.resource_pool,
        host=args.host,
        iso=args.iso, image_dir=args.image, containerfs=args.containerfs,
        attach_uri=args.attach_uri, name=args.name, memory_mb=args.memory, cpus=args.cpus,
        keep=args.keep, detach=args.detach, timeout=args.timeout)
    result = containers.run(conn, config, options, log=_say)
    if result.output:
        _echo_primary(result.output)
    from extraconfig.transport import format_vmx
    if args.out:
        with open(args.out, "w") as f:
            f.write(format_vmx(result.guestinfo))
    else:
        sys.stdout.write(format_vmx(result.guestinfo))
        sys.stdout.flush()
    if result.message:
        _say(result.message)
    if result.kept:
        _say(f"kept VM {result.name}" + (" (running)" if args.detach else ""))
    return result.exit_code


def _echo_primary(blob: bytes) -> None:
    """The primary's output, as `tether vm` and docker run show it."""
    from tether import iolog
    try:
        for entry in iolog.parse(blob):
            if entry.session is None:
                stream = sys.stdout.buffer if entry.stream == iolog.STDOUT else sys.stderr.buffer
                stream.write(entry.data)
                stream.flush()
    except iolog.FramingError as err:
        _say(f"output log: {err}")


def ps_command(conn, args) -> int:
    from . import containers
    dc = conn.datacenter(args.datacenter)
    rows = [("NAME", "ID", "POWER", "STARTED", "STATUS")]
    rows += [(c.name, c.id, c.power, c.started or "-", c.status or "-")
             for c in containers.containers(conn, dc)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def logs_command(conn, args) -> int:
    from tether import iolog
    from tether.logscli import write_entries
    from . import containers, spec
    dc = conn.datacenter(args.datacenter)
    vm = containers.find_container(conn, dc, args.name)
    basename = spec.DEBUG_LOG if args.console else spec.OUTPUT_LOG
    blob = containers.fetch_file(conn, dc, vm, basename)
    if blob is None:
        _say(f"{args.name}: no {basename} yet (the VM has not written it)")
        return 1
    if args.save:
        with open(args.save, "wb") as f:
            f.write(blob)
        return 0
    out = sys.stdout.buffer
    if args.console:
        out.write(blob)
        out.flush()
        return 0
    running = containers.power_state(conn, vm) == containers.ON
    try:
        write_entries(blob, out, args.session, args.raw)
    except iolog.FramingError as err:
        out.flush()
        if not (running and str(err).startswith("truncated")):   # still being written
            _say(f"{args.name}: {basename}: {err}")
            return 1
    out.flush()
    return 0


def stop_command(conn, args) -> int:
    from . import containers
    dc = conn.datacenter(args.datacenter)
    vms = [containers.find_container(conn, dc, name) for name in args.names]
    for name, vm in zip(args.names, vms):
        what = containers.stop(conn, vm, args.timeout, log=lambda text: _say(f"{name}: {text}"))
        print(f"{name}: {what}")
    return 0


def rm_command(conn, args) -> int:
    from . import containers
    dc = conn.datacenter(args.datacenter)
    vms = [containers.find_container(conn, dc, name) for name in args.names]
    for name, vm in zip(args.names, vms):
        containers.remove(conn, vm, force=args.force)
        print(name)
    return 0


COMMANDS = {"run": run_command, "ps": ps_command, "logs": logs_command,
            "stop": stop_command, "rm": rm_command}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        from pyVmomi import vmodl
        from .connection import Connection, VsphereError, fault_text, parse_url
    except ImportError as err:
        _say(f"needs pyVmomi ({err}): pip install 'tether[vsphere]'")
        return 2
    try:
        target = parse_url(args.url, args.insecure)
        with Connection.open(target) as conn:
            return COMMANDS[args.command](conn, args)
    except VsphereError as err:
        _say(str(err))
    except vmodl.MethodFault as err:
        _say(fault_text(err))
    except OSError as err:          # the connection dropped mid-way
        _say(f"lost the connection: {err}")
    except KeyboardInterrupt:
        return 130
    return 1
