"""The ExecutorConfig model, with VIC's tags so extraconfig keys match byte for byte
(`vmware/vic lib/config/executor/container_vm.go`), and the reload rule.

Attribute names are snake_case; the Go names live in the tags and make the keys.
Field order is Go declaration order, which is the order the codec writes keys in.

Only the agent's loop thread changes the config; other threads post their changes to
the loop. `enforce_loop_ownership` is the debug check that makes a violation raise.

The reload rule (SIGHUP), in one place, `take_host_fields`: read-only (and hidden)
fields are the host's, read-write fields are the agent's. The scope is the codec's own:
a field's `vic` tag, or, for an untagged field, its parent's.
"""
from __future__ import annotations

from extraconfig.gotime import GoTime
from extraconfig.keys import READ_ONLY, READ_WRITE, scope_flags
from extraconfig.record import field, fields, is_struct, record
from extraconfig.schema import tag_of, untagged, vic
from extraconfig.types import IP, URL, IPNet


RO = "read-only"
RW = "read-write"
HIDDEN = "hidden"


@record
class Common:
    execution_environment: str = untagged("ExecutionEnvironment", default="")
    id: str = vic("ID", RO, "id", default="")
    name: str = vic("Name", RO, "name", default="")
    notes: str = vic("Notes", HIDDEN, "notes", default="")


@record
class ExitLog:
    time: GoTime = untagged("Time", default_factory=GoTime)
    exit_status: int = untagged("ExitStatus", default=0)
    message: str = untagged("Message", default="")


@record
class Diagnostics:
    debug_level: int = vic("DebugLevel", RO, "debug", default=0)
    resurrection_count: int = vic("ResurrectionCount", RW, "resurrections", default=0)
    exit_logs: list[ExitLog] | None = vic("ExitLogs", RW, "exitlogs", default=None)


@record
class Detail:
    create_time: int = vic("CreateTime", RW, "createtime", default=0)
    start_time: int = vic("StartTime", RW, "starttime", default=0)
    stop_time: int = vic("StopTime", RW, "stoptime", default=0)


@record
class Cmd:
    path: str = vic("Path", RO, "Path", default="")
    args: list[str] | None = vic("Args", RO, "Args", default=None)
    env: list[str] | None = vic("Env", RO, "Env", default=None)
    dir: str = vic("Dir", RO, "Dir", default="")


# -- our extension's types (their keys: tether/extension.py, under guestinfo.vice./tether) --
HOOK_POINTS = ("prestart", "create_runtime", "create_container", "start_container",
               "poststart", "poststop")

# Exit record reasons
EXITED, SIGNALLED, STOPPED, OOM = "exited", "signalled", "stopped", "oom"


@record
class Limits:
    """A session's resources. Zero means no limit. `cpus` is a fraction of CPUs (0.5 = half
    of one CPU); `cpu_mhz` says the same in MHz of this machine's CPUs, like the port
    layer's SetLimits(memoryMb, cpuMhz); give one of the two."""
    memory_bytes: int = vic("MemoryBytes", RO, "memory", default=0)
    cpus: float = vic("CPUs", RO, "cpus", default=0.0)
    cpu_mhz: int = vic("CPUMhz", RO, "cpumhz", default=0)
    pids: int = vic("Pids", RO, "pids", default=0)

    def any(self) -> bool:
        return bool(self.memory_bytes > 0 or self.cpus > 0 or self.cpu_mhz > 0
                    or self.pids > 0)


@record
class Hook:
    """One program the agent runs at a lifecycle point, the OCI state JSON on its stdin.
    `args` is the full argv (args[0] included, as in OCI); `timeout` in seconds, 0 for
    the default."""
    path: str = vic("Path", RO, "path", default="")
    args: list[str] | None = vic("Args", RO, "args", default=None)
    env: list[str] | None = vic("Env", RO, "env", default=None)
    timeout: int = vic("Timeout", RO, "timeout", default=0)


@record
class Hooks:
    """The OCI runtime spec's hook points (config.json `hooks`), keyed by the spec's names;
    docs/config.md."""
    prestart: list[Hook] | None = vic("Prestart", RO, "prestart", default=None)
    create_runtime: list[Hook] | None = vic("CreateRuntime", RO, "createRuntime",
                                               default=None)
    create_container: list[Hook] | None = vic("CreateContainer", RO, "createContainer",
                                                 default=None)
    start_container: list[Hook] | None = vic("StartContainer", RO, "startContainer",
                                                default=None)
    poststart: list[Hook] | None = vic("Poststart", RO, "poststart", default=None)
    poststop: list[Hook] | None = vic("Poststop", RO, "poststop", default=None)

    def at(self, point: str) -> list[Hook]:
        return list(getattr(self, point) or [])

    def any(self) -> bool:
        return any(getattr(self, point) for point in HOOK_POINTS)


@record
class ExitRecord:
    """How one run of a session ended. `exit_code` is the exit status, or 128+N when
    signal N killed it; `signal` is N (0 when it exited); `reason` is `exited`,
    `signalled`, `stopped` (the agent stopped it) or `oom` (the kernel's OOM killer);
    `oom_killed` says an OOM kill happened in the session's group during the run;
    `message` carries failures of the poststart/poststop hooks."""
    time: GoTime = vic("Time", RW, "time", default_factory=GoTime)
    exit_code: int = vic("ExitCode", RW, "exitcode", default=0)
    signal: int = vic("Signal", RW, "signal", default=0)
    oom_killed: bool = vic("OOMKilled", RW, "oomkilled", default=False)
    reason: str = vic("Reason", RW, "reason", default="")
    message: str = vic("Message", RW, "message", default="")


@record
class SessionConfig:
    common: Common = vic("Common", RO, "common", default_factory=Common)
    detail: Detail = vic("Detail", RW, "detail", default_factory=Detail)
    cmd: Cmd = vic("Cmd", RO, "cmd", default_factory=Cmd)
    attach: bool = vic("Attach", RO, "attach", default=False)
    open_stdin: bool = vic("OpenStdin", RO, "openstdin", default=False)
    run_block: bool = vic("RunBlock", RO, "runblock", default=False)
    tty: bool = vic("Tty", RO, "tty", default=False)
    exit_status: int = vic("ExitStatus", RW, "status", default=0)
    started: str = vic("Started", RW, "started", default="")
    restart: bool = vic("Restart", RO, "restart", default=False)
    stop_signal: str = vic("StopSignal", RO, "stopSignal", default="")
    diagnostics: Diagnostics = vic("Diagnostics", RO, "diagnostics", default_factory=Diagnostics)
    user: str = vic("User", RO, "User", default="")
    group: str = vic("Group", RO, "Group", default="")
    # Our extension (tether/extension.py): no vic tag, so VIC's keys stay as they were;
    # the wire form lives under guestinfo.vice./tether/sessions|<id>/...
    limits: Limits = field(default_factory=Limits)
    capabilities: list[str] | None = None     # None: Docker's default set; []: none
    no_new_privileges: bool = False
    parent_death_signal: str = ""
    exit_records: list[ExitRecord] | None = None

    @property
    def id(self) -> str:
        return self.common.id


@record
class MountSpec:
    source: URL = vic("Source", RO, "source", default_factory=URL)
    path: str = vic("Path", RO, "dest", default="")
    mode: str = vic("Mode", RO, "mode", default="")


@record
class Range:
    """pkg/ip.Range: an IP pool."""
    first_ip: IP = vic("FirstIP", RO, "first", default_factory=lambda: IP(b""))
    last_ip: IP = vic("LastIP", RO, "last", default_factory=lambda: IP(b""))


@record
class AssignedNetwork:
    """ContainerNetwork.Assigned: an anonymous struct in the Go source."""
    gateway: IPNet = vic("Gateway", RW, "gateway", default_factory=IPNet)
    nameservers: list[IP] | None = vic("Nameservers", RW, "dns", default=None)


@record
class ContainerNetwork:
    common: Common = untagged("Common", default_factory=Common)
    type: str = vic("Type", RW, "type", default="")
    destinations: list[IPNet] | None = vic("Destinations", RO, "destinations", default=None)
    gateway: IPNet = vic("Gateway", RO, "gateway", default_factory=IPNet)
    default: bool = vic("Default", RO, "default", default=False)
    nameservers: list[IP] | None = vic("Nameservers", RO, "dns", default=None)
    pools: list[Range] | None = vic("Pools", RO, "pools", default=None)
    aliases: list[str] | None = vic("Aliases", HIDDEN, "aliases", default=None)
    # The reference's later revision embeds `TrustLevel` (an int, untagged): key
    # .../network/TrustLevel, value 0..5. Read it through `trust`.
    trust_level: int = untagged("TrustLevel", default=0)
    assigned: AssignedNetwork = vic("Assigned", RW, "assigned", default_factory=AssignedNetwork)

    @property
    def trust(self):
        """The trust level as a TrustLevel (tether.network.ports)."""
        from tether.network.ports import TrustLevel
        return TrustLevel.of(self.trust_level)


@record
class NetworkEndpoint:
    common: Common = untagged("Common", default_factory=Common)
    static: bool = vic("Static", RO, "static", default=False)
    ip: IPNet | None = vic("IP", RO, "ip", default=None)
    assigned: IPNet = vic("Assigned", RW, "assigned", default_factory=IPNet)
    network: ContainerNetwork = vic("Network", RO, "network", default_factory=ContainerNetwork)
    ports: list[str] | None = vic("Ports", RO, "ports", default=None)

    def port_specs(self, where: str = ""):
        """`ports` parsed into PortSpecs (tether.network.ports); PortSpecError if one is bad."""
        from tether.network.ports import parse_ports
        return parse_ports(self.ports, where)


@record
class ExecutorConfig:
    common: Common = vic("Common", RO, "common", default_factory=Common)
    create_time: int = vic("CreateTime", RW, "createtime", default=0)
    diagnostics: Diagnostics = vic("Diagnostics", RO, "diagnostics", default_factory=Diagnostics)
    sessions: dict[str, SessionConfig | None] | None = vic(
        "Sessions", RO, "sessions", default=None)
    mounts: dict[str, MountSpec] | None = vic("Mounts", RO, "mounts", default=None)
    networks: dict[str, NetworkEndpoint | None] | None = vic(
        "Networks", RO, "networks", default=None)
    key: bytes | None = vic("Key", RO, "key", default=None)
    layer_id: str = vic("LayerID", RO, "layerid", default="")
    annotations: dict[str, str] | None = vic("Annotations", HIDDEN, "annotations", default=None)
    repo_name: str = vic("RepoName", RO, "repo", default="")
    # Our extension (tether/extension.py), under guestinfo.vice./tether/...
    hooks: Hooks = field(default_factory=Hooks)
    scrub_secrets: bool | None = None   # None: on for the VMware backdoor, else off

    @property
    def id(self) -> str:
        return self.common.id


# -- RunBlock's two keys ---------------------------------------------------------------------
# `run_block` above carries the tag of VIC before v1.2: read-only, so a port layer of that
# age writes guestinfo.vice./sessions|<id>/runblock. vmware/vic 5ce6ef1f4 ("reset
# runblock in tether after process is launched") made SessionConfig.RunBlock read-write,
# so a port layer of v1.2 or later writes guestinfo.vice..sessions|<id>.runblock instead,
# and the agent clears it once the session is released. The agent reads both forms (the
# read-write one wins where present, being the one the agent itself writes) and writes
# the read-write one when an attach releases a session. These are the only two places
# that know the read-write form.
@record
class _ReadWriteRunBlock:
    run_block: bool | None = vic("RunBlock", RW, "runblock", default=None)   # None: absent


@record
class _ReadWriteRunBlocks:
    """The session map of ExecutorConfig, seen through HEAD's tag of RunBlock only."""
    sessions: dict[str, _ReadWriteRunBlock | None] | None = vic(
        "Sessions", RO, "sessions", default=None)


def read_run_blocks(source, config) -> None:
    """Take each session's RunBlock from the read-write key where `source` (anything the
    codec decodes from) has it; sessions without it keep the read-only key's value."""
    from extraconfig.codec import decode
    found = decode(source, _ReadWriteRunBlocks()).sessions or {}
    for name, entry in found.items():
        session = (config.sessions or {}).get(name)
        if session is not None and entry is not None and entry.run_block is not None:
            session.run_block = entry.run_block


def run_block_write_key(name: str) -> str:
    """The read-write RunBlock key of the session named `name` in the session map."""
    from extraconfig.codec import calculate_key
    return calculate_key(_ReadWriteRunBlocks, ["Sessions", name, "RunBlock"])


# -- the reload rule ------------------------------------------------------------------------
def _is_struct(value) -> bool:
    return is_struct(value) and not isinstance(value, type)


def take_host_fields(ours, fresh, inherited: int = READ_ONLY) -> None:
    """Merge a fresh decode of the host's keys into the live config, in place: every
    read-only or hidden field takes the host's value, every read-write field (what the
    agent writes back: started, status, times, exit logs, assigned addresses) keeps
    ours. Structs and maps of structs are merged member by member, so a read-write field
    inside a read-only struct (a network's `assigned`) stays ours and live objects keep
    their identity. Map entries the host no longer has are kept: a reload never takes
    a running session, a configured NIC or a mounted volume away."""
    for f in fields(ours):
        tag = tag_of(f)
        if tag is None:
            continue
        flags = scope_flags(tag.scope) if tag.tagged else inherited
        if flags & READ_WRITE:
            continue
        mine, theirs = getattr(ours, f.name), getattr(fresh, f.name)
        if _is_struct(mine) and type(mine) is type(theirs):
            take_host_fields(mine, theirs, flags)
        elif isinstance(mine, dict) and isinstance(theirs, dict) and \
                any(_is_struct(v) for v in (*mine.values(), *theirs.values())):
            for key, value in theirs.items():
                current = mine.get(key)
                if _is_struct(current) and type(current) is type(value):
                    take_host_fields(current, value, flags)
                elif value is not None or key not in mine:
                    mine[key] = value
        else:
            setattr(ours, f.name, theirs)


def keep_executor_id(ours, fresh) -> str | None:
    """The reload rule's one exception to "read-only fields from the host": the executor's
    ID stays the one the agent booted with. It names the primary session (whose exit is
    the agent's), the hostname and the attach identity; a reload that changed it would
    orphan them. A container's ID never changes (a rename changes its name). Sets fresh's
    ID back to ours; returns the warning when the host's differed."""
    theirs = fresh.common.id
    fresh.common.id = ours.common.id
    if theirs == ours.common.id:
        return None
    return (f"reload: the executor ID stays {ours.common.id!r}: the configuration now says "
            f"{theirs!r}, and an ID cannot change while the container runs")


# -- IDs ------------------------------------------------------------------------------------
ID_LIMIT = 255     # bytes: an output-log entry carries at most 255 bytes of its session's ID

_BAD_IN_IDS = {
    "|": "'|' separates the names in the key list",
    "/": "'/' in a read-write key stops the guest from writing it back",
    "@": "'@' starts a key suffix (@secret, @non-persistent)",
}


class InvalidID(ValueError):
    """A session ID (or a network or mount name) that guestinfo keys cannot carry."""


def check_id(name, what: str = "session ID") -> str:
    """`name` if it can be a session ID (or a network or mount name), else InvalidID
    saying why. The one check of IDs: the JSON form, the agent (the config's session
    names) and exec use it. IDs become parts of guestinfo keys: not empty, none of
    `|`, `/`, `@`, no whitespace or control characters (they split the guest's info-set
    request), at most ID_LIMIT bytes. A `.` is fine."""
    from tether.console import clip
    if not isinstance(name, str):
        raise InvalidID(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidID(f"{what} is empty (an empty name cannot be stored: the key list "
                        "drops it)")
    for ch, why in _BAD_IN_IDS.items():
        if ch in name:
            raise InvalidID(f"{what} {clip(name)} is invalid: {why}")
    if not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidID(f"{what} {clip(name)} is invalid: whitespace or control characters "
                        "split the guest's info-set request")
    if len(name.encode()) > ID_LIMIT:
        raise InvalidID(f"{what} {clip(name)} is invalid: longer than {ID_LIMIT} bytes")
    return name


def name_sessions(config) -> dict[str, str]:
    """Settle every session's identity on its map key: that is where the host wrote it
    and where its results go. A session without a common.id takes its key (the host may
    leave it empty); one whose common.id differs is known by its key too (so it is the
    primary when its key is the executor's ID, and two sessions with the same common.id
    are two sessions), with a warning. A key that cannot be an ID (check_id) takes the
    session out of the config: the returned {key: why} says which."""
    from tether.log import get_logger
    log = get_logger("tether.config")
    invalid: dict[str, str] = {}
    for key, session in list((config.sessions or {}).items()):
        if session is None:
            continue
        try:
            check_id(key)
        except InvalidID as err:
            invalid[key] = str(err)
            del config.sessions[key]
            continue
        if session.common.id and session.common.id != key:
            log.warning("session %s: its common.id %r differs from its map key; the "
                        "session is %s (its keys are there)", key, session.common.id, key)
        session.common.id = key
    return invalid


# -- who may change the config ----------------------------------------------------------------
class ConfigOwnershipError(RuntimeError):
    """A thread other than the loop's changed the config."""


_owner_thread: int | None = None


def _owned_setattr(self, name: str, value) -> None:
    import threading
    if _owner_thread is not None and threading.get_ident() != _owner_thread:
        raise ConfigOwnershipError(
            f"{type(self).__name__}.{name} set on thread {threading.current_thread().name}: "
            "only the loop thread changes the config (post the change to the loop)")
    object.__setattr__(self, name, value)


def enforce_loop_ownership(thread_id: int | None) -> None:
    """The debug check: from now on, setting a field of any config object from a thread
    other than `thread_id` raises ConfigOwnershipError; None turns the check off. It
    catches assignments, which is how the agent changes the config (lists and maps
    are replaced or extended on the loop, never edited from elsewhere)."""
    global _owner_thread
    _owner_thread = thread_id
    for cls in CONFIG_TYPES:
        if thread_id is not None:
            cls.__setattr__ = _owned_setattr
        elif "__setattr__" in vars(cls):
            del cls.__setattr__


CONFIG_TYPES = (Common, ExitLog, Diagnostics, Detail, Cmd, SessionConfig, MountSpec, Range,
                AssignedNetwork, ContainerNetwork, NetworkEndpoint, ExecutorConfig)
