"""What a session's process may do: its capabilities, no_new_privileges, parent death signal.

`plan_for(config)` decides in the agent, before the fork, and raises PrivilegeError (the
`started` text) for a capability that is unknown or that the agent itself does not hold.
The child applies the plan around its setuid (`before_setuid`, `after_setuid`), with
python-prctl; python-prctl has no call for the ambient set, so that one prctl goes
through libc.

The keep-list becomes the bounding set. A root session gets it as its effective set at
exec. A non-root session gets no capabilities by default (as in Docker; a setuid binary
may still gain those in the bounding set unless `no_new_privileges`); when its config
names a keep-list explicitly, the list is raised as ambient capabilities so the
unprivileged program really has them. The inheritable set is left empty unless ambient
capabilities need it (as moby after CVE-2022-24769): otherwise a non-root session would
gain the keep-list from any program carrying file-inheritable capabilities.
"""
from __future__ import annotations

import os

from tether import signals

# Linux's capability numbers (include/uapi/linux/capability.h).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
NUMBER = {name: n for n, name in enumerate(CAPABILITIES)}

# Docker's default set (moby oci/caps/defaults.go).
DEFAULT = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
           "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
           "AUDIT_WRITE")
# `tether sandbox --rootfs`: no device cgroup stands in front of MKNOD there, so a root
# session could make a node for this machine's disk and open it. Given when asked for.
SANDBOX_DEFAULT = tuple(name for name in DEFAULT if name != "MKNOD")



class PrivilegeError(Exception):
    """The session's privileges cannot be set up as asked; the text goes into `started`."""


def cap_name(n: int) -> str:
    return "CAP_" + CAPABILITIES[n] if n < len(CAPABILITIES) else f"capability {n}"


def parse_capability(text: str) -> int:
    """'NET_RAW', 'cap_net_raw' or 'CAP_NET_RAW' -> 13. PrivilegeError otherwise."""
    name = text.strip().upper()
    if name.startswith("CAP_"):
        name = name[4:]
    if name not in NUMBER:
        raise PrivilegeError(f"capabilities: unknown capability {text!r}")
    return NUMBER[name]


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def own_bounding_set() -> set[int]:
    """The capabilities the agent could pass on: its bounding set ∩ its permitted set."""
    bounding = permitted = None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                bounding = int(line.split()[1], 16)
            elif line.startswith("CapPrm:"):
                permitted = int(line.split()[1], 16)
    mask = (bounding if bounding is not None else ~0) & (
        permitted if permitted is not None else ~0)
    return {n for n in range(last_cap() + 1) if mask >> n & 1}


# python-prctl's C extension, _prctl, is called directly: its Python wrapper, prctl, builds
# a hundred functions and classes on import, which PID 1 would pay for on every boot.
_CAP_FLAGS = ("CAP_EFFECTIVE", "CAP_INHERITABLE", "CAP_PERMITTED", "CAP_LAST_CAP")


_settable: list[int] = []   # python-prctl's capabilities, read once from _prctl


def _split(keep: list[int]) -> tuple[list[int], list[int]]:
    """(the keep-list, every other capability) among those python-prctl can set (its
    CAP_* constants, as prctl.ALL_CAPS lists them)."""
    if not _settable:
        import _prctl
        _settable.extend(sorted({number for name, number in vars(_prctl).items()
                                 if name.startswith("CAP_") and name not in _CAP_FLAGS}))
    wanted = set(keep)
    return [n for n in _settable if n in wanted], [n for n in _settable if n not in wanted]


class Plan:
    """Plain data for the child: everything decided before the fork. `settable` and
    `unsettable`: the keep-list and every other capability, among those python-prctl
    can set (worked out here, not in the child on its way to the exec)."""
    __slots__ = ("keep", "drop", "ambient", "no_new_privileges", "death_signal",
                 "settable", "unsettable")

    def __init__(self, keep: list[int], drop: list[int], ambient: bool,
                 no_new_privileges: bool, death_signal: int):
        self.keep = keep
        self.drop = drop
        self.ambient = ambient
        self.no_new_privileges = no_new_privileges
        self.death_signal = death_signal
        self.settable, self.unsettable = _split(keep)


def plan_for(config, uid: int, held: set[int] | None = None,
             default: tuple[str, ...] = DEFAULT) -> Plan:
    """The privileges of a session whose config is `config` and whose user is `uid`.
    `held`: what the agent has (default: read from /proc/self/status); `default`: the
    keep-list when the config names none."""
    # Loaded here, in the agent: the child runs after chroot into the container root,
    # where nothing can be imported. tether.system (ambient capabilities) is loaded below
    # when the plan raises them.
    import _prctl  # noqa: F401
    held = own_bounding_set() if held is None else held
    explicit = config.capabilities is not None
    if explicit:
        if any(c.strip().upper() == "ALL" for c in config.capabilities):
            wanted = set(held)
        else:
            wanted = {parse_capability(c) for c in config.capabilities}
        missing = sorted(wanted - held)
        if missing:
            raise PrivilegeError(
                "capabilities: the agent does not hold " + ", ".join(map(cap_name, missing))
                + " (not in its bounding set), so the session cannot be given "
                + ("it" if len(missing) == 1 else "them"))
    else:
        # Docker's set, less what the agent itself lacks (a restricted sandbox host).
        wanted = {NUMBER[name] for name in default} & held
    try:
        from tether.sessions import parse_signal
        death = parse_signal(config.parent_death_signal, 0) if config.parent_death_signal \
            else 0
    except ValueError as err:
        raise PrivilegeError(f"parent_death_signal: {err}") from None
    keep = sorted(wanted)
    drop = [n for n in range(last_cap() + 1) if n not in wanted]
    ambient = explicit and uid != 0 and bool(keep)
    if ambient:
        from tether import system  # noqa: F401 - the child raises the ambient set through it
    return Plan(keep, drop, ambient=ambient,
                no_new_privileges=bool(config.no_new_privileges), death_signal=death)


# -- the child side: only os-level calls --------------------------------------------------
def _set_caps(flags: tuple[str, ...], raise_: list[int], clear: list[int]) -> None:
    """Raise and clear capabilities in the sets named by `flags` (prctl.set_caps)."""
    import _prctl
    up = {flag: raise_ if flag in flags else [] for flag in ("E", "P", "I")}
    down = {flag: clear if flag in flags else [] for flag in ("E", "P", "I")}
    _prctl.set_caps(up["E"], up["P"], up["I"], down["E"], down["P"], down["I"])


def before_setuid(plan: Plan) -> None:
    """Still root: shrink the bounding set (exec gives a root process all of it), empty
    the inheritable set, or make it the keep-list when ambient capabilities are to be
    raised (they must be inheritable), and then keep the permitted set across the
    setuid."""
    import _prctl
    for n in plan.drop:
        try:
            _prctl.prctl(_prctl.PR_CAPBSET_DROP, n)
        except ValueError:
            pass   # a capability python-prctl does not know: the kernel's EINVAL
    if plan.ambient:
        _set_caps(("I",), plan.settable, plan.unsettable)
        _prctl.prctl(_prctl.PR_SET_KEEPCAPS, True)
    else:
        _set_caps(("I",), [], plan.settable + plan.unsettable)


def after_setuid(plan: Plan) -> None:
    """The final sets, no_new_privileges, and the parent death signal (which setuid
    clears, so it is set after it)."""
    import _prctl
    if plan.ambient:
        _set_caps(("E", "P", "I"), plan.settable, plan.unsettable)
        from tether import system
        for n in plan.settable:   # what python-prctl could not make inheritable cannot be ambient
            try:
                system.raise_ambient_capability(n)
            except OSError as err:
                raise OSError(err.errno, f"raise ambient {cap_name(n)}: "
                                         f"{os.strerror(err.errno)}") from None
        _prctl.prctl(_prctl.PR_SET_KEEPCAPS, False)
    if plan.no_new_privileges:
        _prctl.prctl(_prctl.PR_SET_NO_NEW_PRIVS, 1)
    if plan.death_signal:
        parent = os.getppid()
        _prctl.prctl(_prctl.PR_SET_PDEATHSIG, plan.death_signal)
        if os.getppid() != parent:   # the parent died before the signal was armed
            os.kill(os.getpid(), plan.death_signal)


def describe(plan: Plan) -> str:
    names = ",".join(CAPABILITIES[n] for n in plan.keep if n < len(CAPABILITIES)) or "none"
    extra = []
    if plan.ambient:
        extra.append("ambient")
    if plan.no_new_privileges:
        extra.append("no_new_privileges")
    if plan.death_signal:
        extra.append(f"pdeathsig {signals.name(plan.death_signal)}")
    return names + (f" ({', '.join(extra)})" if extra else "")
