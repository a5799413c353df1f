"""`tether agent`: the command line of PID 1. Options are parsed by hand: argparse and
gettext cost startup time on every boot."""
from __future__ import annotations

import gc
import os
import sys

from tether import boottime, signals
from tether.agent import DEFAULT_STOP_GRACE, Agent, Options, RunMode
from tether.console import configure_logging, console, env_debug_level, redirect_log
from tether.log import DEBUG, INFO, get_logger

log = get_logger("tether.agent")


AGENT_USAGE = """usage: tether agent [options]

Run the agent (PID 1 of a container VM).

options:
  --guestinfo-file FILE  VMX-style guestinfo file, used as given (nothing is probed);
                         kernel argument tether.guestinfo= names one as a fallback
  --rootfs DIR           container root (default: the containerfs disk, else /)
  --output-log PATH      session output log (default: virtio port org.tether.output,
                         else /dev/ttyS2; only as PID 1)
  --attach ENDPOINT      attach endpoint: unix:PATH, vsock:PORT, tcp:HOST:PORT,
                         port:NAME, serial:DEV; repeatable
  --no-attach            serve no attach endpoint at all
  --vic-attach ENDPOINT  serve VIC's handshake + SSH attach on unix:PATH or a serial
                         device; repeatable (default: /dev/ttyS0 in VIC's serial layout)
  --vic-handshake V      head (default), v0.9 or auto; also kernel argument
                         tether.vic_handshake=V
  --vic-auth MODE        none (default, as the reference) or key: the client must sign
                         with ExecutorConfig.Key; also kernel argument tether.vic_auth=
  --log-port DEVICE      write the agent log there (raw, 115200 when a tty)
  --no-power-off         exit with the primary's status instead of powering off
  --stop-grace SECONDS   between the stop signal and SIGKILL (default 10)
  --keep-execs N         finished exec'd sessions kept (default 32); older ones are
                         removed with their guestinfo keys
  --output-log-max BYTES a file output log is rotated to PATH.1 past this size
                         (default 64 MiB)
"""

_VALUED = {"--guestinfo-file": "guestinfo_file", "--rootfs": "rootfs",
           "--output-log": "output_log", "--attach": "attach_endpoints",
           "--log-port": "log_port", "--stop-grace": "stop_grace",
           "--vic-attach": "vic_attach", "--vic-handshake": "vic_handshake",
           "--vic-auth": "vic_auth", "--keep-execs": "keep_execs",
           "--output-log-max": "output_log_max"}
_FLAGS = {"--no-attach": "no_attach", "--no-power-off": "no_power_off"}


class UsageError(Exception):
    pass


class Arguments:
    """The parsed options: attributes named as the option (types.SimpleNamespace's job,
    without importing types)."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)


def parse_args(argv: list[str]) -> Arguments:
    """The agent's options, parsed by hand: argparse costs PID 1 startup time."""
    args = Arguments(guestinfo_file=None, rootfs=None, output_log=None,
                     attach_endpoints=None, log_port=None, stop_grace=DEFAULT_STOP_GRACE,
                     no_attach=False, no_power_off=False, help=False, vic_attach=None,
                     vic_handshake=None, vic_auth=None, keep_execs=None,
                     output_log_max=None)
    items = list(argv)
    while items:
        item = items.pop(0)
        name, _, inline = item.partition("=")
        if item in ("-h", "--help"):
            args.help = True
        elif name in _FLAGS and not inline:
            setattr(args, _FLAGS[name], True)
        elif name in _VALUED:
            if inline or "=" in item:
                value = inline
            elif items:
                value = items.pop(0)
            else:
                raise UsageError(f"{name} needs a value")
            dest = _VALUED[name]
            if dest in ("attach_endpoints", "vic_attach"):
                setattr(args, dest, (getattr(args, dest) or []) + [value])
            elif dest == "stop_grace":
                try:
                    args.stop_grace = float(value)
                except ValueError:
                    raise UsageError(f"--stop-grace: not a number: {value!r}") from None
            elif dest in ("keep_execs", "output_log_max"):
                if not value.isdigit():
                    raise UsageError(f"{name}: not a count: {value!r}")
                setattr(args, dest, int(value))
            else:
                setattr(args, dest, value)
        else:
            raise UsageError(f"unknown argument {item!r}")
    return args


def main(argv: list[str]) -> int:
    """`tether agent`: the PID 1 entry. Never ends with a traceback."""
    # No collections until the sessions are launched (Agent.run enables it again): what
    # the startup builds is kept, and holds no garbage cycles worth the collector's time.
    gc.disable()
    boottime.mark("imports")
    configure_logging(level=DEBUG if env_debug_level() >= 1 else INFO)
    if "tether.bootblob" in sys.modules:   # the image's entry (tether/bootblob.py)
        log.info("code: %s", sys.modules["tether.bootblob"].status)
    code = 1
    power_off = False
    try:
        try:
            args = parse_args(argv)
        except UsageError as err:
            print(f"tether agent: {err}\n\n{AGENT_USAGE}", file=sys.stderr)
            return 2
        if args.help:
            print(AGENT_USAGE)
            return 0
        if args.log_port:
            redirect_log(args.log_port)
        mode = RunMode.detect()
        power_off = (mode.owns_machine and not args.no_power_off
                     and not os.path.basename(sys.argv[0]).endswith("-debug"))
        from tether.guestinfo import open_transport
        transport = open_transport(args.guestinfo_file)
        boottime.mark("guestinfo")
        options = Options(mode=mode, rootfs=args.rootfs, output_log=args.output_log,
                          attach_endpoints=[] if args.no_attach else args.attach_endpoints,
                          stop_grace=args.stop_grace,
                          vic_attach=[] if args.no_attach else args.vic_attach,
                          vic_options={"handshake": args.vic_handshake, "auth": args.vic_auth},
                          keep_execs=args.keep_execs, output_log_max=args.output_log_max)
        agent = Agent(transport, options)
        boottime.mark("agent")      # its modules: loop, reaper, supervisor, sessions
        code = agent.run()
    except BaseException:   # noqa: BLE001 - the last guard of PID 1
        log.critical("the agent failed; stopping cleanly", exc_info=True)
    if power_off:
        log.info("powering off")
        console().drain(1.0)
        try:
            from tether import system
            system.power_off()
        except BaseException:   # noqa: BLE001
            log.critical("power off failed; halting here", exc_info=True)
            while True:   # PID 1 must not exit: that would panic the kernel
                signals.pause()
    return code
