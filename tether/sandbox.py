"""`tether sandbox CONFIG.json`: the agent as PID 1 of new PID, mount, UTS, IPC and network
namespaces on this machine, with an in-memory guestinfo map seeded from the JSON config.

The network namespace is new and private by default: loopback up, and a stand-in NIC (a
dummy link, or a veth pair) for each endpoint whose ID names an interface or a MAC, so static configs
apply as they would in a VM; nothing reaches the host's network. `--netns NAME` joins the
named namespace instead (`ip netns add NAME`, with the veth or bridge a test or a user set
up): the agent configures the networks and the firewall there, and they stay after exit.

The parent unshares, forks the agent (PID 1 inside), forwards SIGTERM/SIGINT/SIGHUP/
SIGPWR to it and exits with its status. The agent writes the final guestinfo map (the
keys it wrote included) as VMX lines to --out (mode 0600) or stdout (the executor Key
redacted), and exits with the primary session's status (128+N when signal N killed it);
a map that cannot be written is reported and the status kept. On SIGHUP the JSON file is read again:
new sessions appear, read-only keys are refreshed, the agent's own keys are kept.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPWR)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tether sandbox",
        description="Run the agent as PID 1 of new namespaces, configured from JSON.")
    parser.add_argument("config", help="the ExecutorConfig in JSON form (or VMX lines, "
                        "in a file named *.vmx)")
    parser.add_argument("--rootfs", help="container root directory (sessions chroot there)")
    parser.add_argument("--out", help="write the final guestinfo map here, Key included "
                        "(default: stdout, with the Key redacted)")
    parser.add_argument("--attach-socket", help="serve attach on this unix socket")
    parser.add_argument("--vic-attach", metavar="PATH",
                        help="serve VIC's attach (sync handshake, then SSH) on this unix "
                        "socket; each client connection stands in for COM1")
    parser.add_argument("--vic-handshake", choices=("head", "v0.9", "auto"), default="head",
                        help="the handshake version for --vic-attach (default head)")
    parser.add_argument("--vic-auth", choices=("none", "key"), default="none",
                        help="none (as the reference) or key: a client must sign with "
                        "ExecutorConfig.Key")
    parser.add_argument("--output-log", help="write session output (iolog framing) here")
    parser.add_argument("--output-log-max", type=int, default=None, metavar="BYTES",
                        help="rotate the output log to OUTPUT_LOG.1 past this size "
                        "(default 64 MiB)")
    parser.add_argument("--backdoor-sim", metavar="SOCKET",
                        help="take guestinfo (and TCLO) from a simulated VMware hypervisor "
                        "serving the backdoor's port calls on this unix socket")
    parser.add_argument("--netns", metavar="NAME",
                        help="join the named network namespace (ip netns) instead of a "
                        "new private one")
    parser.add_argument("--stop-grace", type=float, default=10.0,
                        help="seconds between the stop signal and SIGKILL (default 10)")
    parser.add_argument("--keep-execs", type=int, default=None, metavar="N",
                        help="finished exec'd sessions kept (default 32); older ones are "
                        "removed with their guestinfo keys")
    return parser.parse_args(argv)


def load_seed(path: str) -> dict[str, str]:
    """Every key of the config, as the host would have written them. A `.vmx` file
    (e.g. from `tether config encode`) is taken as the keys themselves."""
    if path.endswith(".vmx"):
        from extraconfig.transport import parse_vmx
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return parse_vmx(f.read())
    from tether.extension import encode_config
    from tether.jsonform import load_config
    return encode_config(load_config(path))


def exit_code_of(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from tether.console import configure_logging
    configure_logging()
    try:
        seed = load_seed(args.config)
    except Exception as err:   # noqa: BLE001 - a bad config file is a usage error
        print(f"tether sandbox: cannot load {args.config}: {err}", file=sys.stderr)
        return 2
    if args.rootfs and not os.path.isdir(args.rootfs):
        print(f"tether sandbox: --rootfs {args.rootfs}: not a directory", file=sys.stderr)
        return 2
    if args.out:
        try:   # find out now, not after the run, that the map cannot be written there
            os.close(os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as err:
            print(f"tether sandbox: --out {args.out}: {err.strerror}", file=sys.stderr)
            return 2
    from tether import system
    flags = system.CLONE_NEWPID | system.CLONE_NEWNS | system.CLONE_NEWUTS | system.CLONE_NEWIPC
    try:
        if args.netns:
            join_netns(args.netns)
        else:
            flags |= system.CLONE_NEWNET
        system.unshare(flags)
    except OSError as err:
        print(f"tether sandbox: cannot create namespaces ({err}); it needs root "
              "(CAP_SYS_ADMIN)", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"tether sandbox: {err}", file=sys.stderr)
        return 2
    delegation = delegate_cgroups()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        delegation.remove()
        raise
    if pid == 0:
        code = 1
        try:
            code = run_inside(args, seed, delegation.paths)
        except BaseException:   # noqa: BLE001 - report, then exit like PID 1 would
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _f: _forward(pid, s))
    status = None
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            break
    left = delegation.remove()
    if left:
        print(f"tether sandbox: cgroups still busy, not removed: {' '.join(left)}",
              file=sys.stderr)
    return 1 if status is None else exit_code_of(status)


def delegate_cgroups():
    """A group of the sandbox's own in each cgroup hierarchy, for its agent to make the
    sessions' groups in; the host's groups are never touched. Removed at the end."""
    from tether import cgroups
    try:
        return cgroups.delegate(f"{cgroups.SANDBOX_PREFIX}{os.getpid()}")
    except (OSError, cgroups.CgroupError) as err:
        print(f"tether sandbox: no cgroups for the sessions ({err}); limits will fail",
              file=sys.stderr)
        return cgroups.Delegation()


def enter_cgroups(paths: list[str]) -> bool:
    """Inside: into the delegated groups, then a cgroup namespace rooted there, so the
    agent mounts and uses them as a VM's agent uses the whole hierarchy."""
    from tether import cgroups, system
    if not paths:
        return False
    try:
        cgroups.enter(paths)
        system.unshare(cgroups.CLONE_NEWCGROUP)
    except OSError as err:
        print(f"tether sandbox: cannot enter the sandbox's cgroups ({err}); limits will "
              "fail", file=sys.stderr)
        return False
    return True


def join_netns(name: str) -> None:
    """Enter the network namespace `ip netns add NAME` made (/run/netns/NAME)."""
    from tether import system
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"--netns {name!r}: expected a name from `ip netns list`")
    path = os.path.join("/run/netns", name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"--netns {name}: no such network namespace ({path}); "
                         f"create it with `ip netns add {name}`") from None
    try:
        system.setns(fd, system.CLONE_NEWNET)
    finally:
        os.close(fd)


def setup_netns(seed: dict[str, str], private: bool) -> None:
    """Inside the sandbox: a /sys that shows this namespace's links; in a private
    namespace also loopback up and the stand-in NICs."""
    from tether import system
    try:
        system.umount("/sys", system.MNT_DETACH)
    except OSError:
        pass
    system.mount("sysfs", "/sys", "sysfs", system.MS_NOSUID | system.MS_NODEV | system.MS_NOEXEC)
    if not private:
        return
    from extraconfig.codec import DecodeError, decode
    from tether.config import ExecutorConfig
    from tether.network.nic import classify
    try:
        networks = decode(dict(seed), ExecutorConfig).networks or {}
    except DecodeError:
        networks = {}    # the agent says what is wrong with the config
    wanted = {ep.common.id for ep in networks.values()
              if ep is not None and classify(ep.common.id) in ("name", "mac")}
    loopback_up()
    if not wanted:
        return
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        for n, ident in enumerate(sorted(wanted)):
            mac = ident.lower() if classify(ident) == "mac" else None
            name = f"nic{n}" if mac else ident
            if not mac and ipr.link_lookup(ifname=name):
                continue
            try:
                add_stand_in_nic(ipr, name, mac, f"sbx{n}")
            except Exception as err:   # noqa: BLE001 - the agent will say the NIC is missing
                print(f"tether sandbox: no stand-in NIC for endpoint ID {ident}: {err}",
                      file=sys.stderr)


def add_stand_in_nic(ipr, name: str, mac: str | None, peer: str) -> None:
    """A dummy link; where the kernel has no dummy driver, a veth pair whose other end
    (`peer`, up, no address) stays in the namespace."""
    extra = {"address": mac} if mac else {}
    try:
        ipr.link("add", ifname=name, kind="dummy", **extra)
        return
    except Exception as err:   # noqa: BLE001 - EOPNOTSUPP: no dummy driver
        if getattr(err, "code", None) != 95:
            raise
    ipr.link("add", ifname=name, kind="veth", peer=peer, **extra)
    ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], state="up")


def loopback_up() -> None:
    """`ip link set lo up`, without netlink libraries (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    import fcntl
    import socket
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", ifreq)[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))   # IFF_UP


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def private_state_dir() -> str:
    """A directory for the agent's generated files that nothing outside the sandbox sees
    and that vanishes with its mount namespace, however the sandbox ends (a SIGKILL runs
    no cleanup): a tmpfs of its own over /dev/shm, which its new IPC namespace makes the
    right thing to have private anyway. Else a temporary directory, removed at exit."""
    from tether import system
    try:
        system.mount("tmpfs", "/dev/shm", "tmpfs", system.MS_NOSUID | system.MS_NODEV,
                     "mode=1777")
    except OSError:
        import tempfile
        return tempfile.mkdtemp(prefix="tether-sandbox-")
    os.mkdir("/dev/shm/tether", 0o755)
    return "/dev/shm/tether"


def share_root(rootfs: str) -> None:
    """The container root as a shared mount of its own, before the agent mounts anything
    in it: each session gets a mount namespace of its own (a bare chroot is left by any
    root process with CAP_SYS_CHROOT, into this machine's files), a slave copy of this
    one, so what the agent mounts in the root later (volumes, the /etc files) reaches the
    sessions already running."""
    from tether import system
    system.mount(rootfs, rootfs, None, system.MS_BIND | system.MS_REC)
    system.mount(None, rootfs, None, system.MS_REC | system.MS_SHARED)


def run_inside(args: argparse.Namespace, seed: dict[str, str],
               cgroup_paths: list[str] | None = None) -> int:
    """PID 1 of the new namespaces: private mounts, a fresh /proc, then the agent."""
    from extraconfig.transport import MapTransport
    from tether import system
    from tether.agent import Agent, Options, RunMode
    system.set_parent_death_signal(signal.SIGKILL)
    with_cgroups = enter_cgroups(cgroup_paths or [])
    system.make_mounts_private()
    system.mount("proc", "/proc", "proc", system.MS_NOSUID | system.MS_NODEV | system.MS_NOEXEC)
    setup_netns(seed, private=not args.netns)
    store = dict(seed)
    transport = MapTransport(store)
    if args.backdoor_sim:
        from extraconfig.backdoor import open_transport as open_backdoor
        from tether.log import get_logger
        transport = open_backdoor(get_logger("tether.guestinfo"),
                                  sim_socket=args.backdoor_sim)
        if transport is None:
            return 1

    def refresh_from_json() -> None:
        for key, value in load_seed(args.config).items():
            if "/" in key or key not in store:   # read-only, or new: the host's word
                store[key] = value

    state_dir = private_state_dir()
    rootfs = os.path.abspath(args.rootfs) if args.rootfs else None
    if rootfs:
        share_root(rootfs)
    options = Options(rootfs=rootfs,
                      output_log=args.output_log,
                      attach_endpoints=[f"unix:{args.attach_socket}"] if args.attach_socket
                      else [],
                      mode=RunMode.SANDBOX, state_dir=state_dir, stop_grace=args.stop_grace,
                      before_reload=refresh_from_json,
                      vic_attach=[f"unix:{args.vic_attach}"] if args.vic_attach else [],
                      vic_options={"handshake": args.vic_handshake, "auth": args.vic_auth},
                      cgroups=with_cgroups, keep_execs=args.keep_execs,
                      output_log_max=args.output_log_max)
    try:
        code = Agent(transport, options).run()
    finally:
        import shutil
        shutil.rmtree(state_dir, ignore_errors=True)
    write_guestinfo(store, args.out)
    return code


def write_guestinfo(store: dict[str, str], out: str | None) -> None:
    """The final map as VMX lines: to `out` in full (mode 0600: it holds the Key), or to
    stdout with the executor Key redacted. A failure is reported, not raised: the exit
    status stays the primary's."""
    from extraconfig.codec import calculate_key
    from extraconfig.transport import format_vmx
    from tether.agent import REDACTED
    from tether.config import ExecutorConfig
    try:
        if out:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(format_vmx(store))
            return
        key = calculate_key(ExecutorConfig, ["Key"])
        shown = {k: REDACTED if k.partition("@")[0] == key and v else v
                 for k, v in store.items()}
        sys.stdout.write(format_vmx(shown))
        sys.stdout.flush()
    except OSError as err:
        print(f"tether sandbox: cannot write the guestinfo map to {out or 'stdout'}: "
              f"{err.strerror or err}", file=sys.stderr)
