"""Our configuration extension: what VIC's ExecutorConfig cannot say, under keys of our own.

Per session: resource `limits`, a capability keep-list, `no_new_privileges`, a parent
death signal, and the structured exit records the agent writes back. Per executor: the
lifecycle `hooks` (seed 004's names) and whether the agent scrubs secrets from guestinfo.

In memory these are plain fields of `SessionConfig` and `ExecutorConfig` that the codec
skips (they carry no `vic` tag), so `extraconfig.encode(config)` stays byte for byte what
VIC's Go encoder writes. On the wire they live in a tree of their own, encoded with the
same codec under the key prefix `tether`, spliced in after `guestinfo.vice.` exactly as
VIC's `WithPrefix` sources and sinks do for vic-init's `init` prefix:

    guestinfo.vice./tether/sessions                         = "web|db"   (key list)
    guestinfo.vice./tether/sessions|web/limits/memory       = "33554432"
    guestinfo.vice./tether/hooks/prestart|0/path            = "/usr/local/bin/check"
    guestinfo.vice..tether.sessions|web.exitrecords|0.oomkilled = "true"  (read-write)

VIC's decoder asks only for the keys its struct names (`vmware/vic
pkg/vsphere/extraconfig/decode.go` pulls key by key; nothing enumerates), so it never
reads these; neither does our decoder of the VIC model. `encode_config`/`decode_config`
are the two halves together.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from extraconfig.gotime import GoTime
from extraconfig.schema import vic

RO = "read-only"
RW = "read-write"

PREFIX = "tether"
ROOT = "guestinfo.vice./" + PREFIX        # the tree's root, as a codec prefix

HOOK_POINTS = ("prestart", "create_runtime", "create_container", "start_container",
               "poststart", "poststop")

# Exit record reasons
EXITED, SIGNALLED, STOPPED, OOM = "exited", "signalled", "stopped", "oom"


@dataclasses.dataclass
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


@dataclasses.dataclass
class Hook:
    """One program the agent runs at a lifecycle point, the OCI state JSON on its stdin.
    `args` is the full argv (args[0] included, as in OCI); `timeout` in seconds, 0 for
    the default."""
    path: str = vic("Path", RO, "path", default="")
    args: Optional[list[str]] = vic("Args", RO, "args", default=None)
    env: Optional[list[str]] = vic("Env", RO, "env", default=None)
    timeout: int = vic("Timeout", RO, "timeout", default=0)


@dataclasses.dataclass
class Hooks:
    """Seed 004's hook points (libcontainer's `Hooks`), keyed by their seed names."""
    prestart: Optional[list[Hook]] = vic("Prestart", RO, "prestart", default=None)
    create_runtime: Optional[list[Hook]] = vic("CreateRuntime", RO, "createRuntime",
                                               default=None)
    create_container: Optional[list[Hook]] = vic("CreateContainer", RO, "createContainer",
                                                 default=None)
    start_container: Optional[list[Hook]] = vic("StartContainer", RO, "startContainer",
                                                default=None)
    poststart: Optional[list[Hook]] = vic("Poststart", RO, "poststart", default=None)
    poststop: Optional[list[Hook]] = vic("Poststop", RO, "poststop", default=None)

    def at(self, point: str) -> list[Hook]:
        return list(getattr(self, point) or [])

    def any(self) -> bool:
        return any(getattr(self, point) for point in HOOK_POINTS)


@dataclasses.dataclass
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


# -- the wire tree -----------------------------------------------------------------------
@dataclasses.dataclass
class SessionExtension:
    limits: Limits = vic("Limits", RO, "limits", default_factory=Limits)
    capabilities: Optional[list[str]] = vic("Capabilities", RO, "capabilities", default=None)
    # An empty list writes no key, so "keep none" needs its own flag.
    no_capabilities: bool = vic("NoCapabilities", RO, "nocapabilities", default=False)
    no_new_privileges: bool = vic("NoNewPrivileges", RO, "nonewprivileges", default=False)
    parent_death_signal: str = vic("ParentDeathSignal", RO, "parentdeathsignal", default="")
    exit_records: Optional[list[ExitRecord]] = vic("ExitRecords", RW, "exitrecords",
                                                   default=None)


@dataclasses.dataclass
class Extension:
    hooks: Hooks = vic("Hooks", RO, "hooks", default_factory=Hooks)
    scrub_secrets: Optional[bool] = vic("ScrubSecrets", RO, "scrubsecrets", default=None)
    sessions: Optional[dict[str, SessionExtension]] = vic("Sessions", RO, "sessions",
                                                          default=None)


def session_extension(session) -> SessionExtension:
    caps = session.capabilities
    return SessionExtension(limits=session.limits, capabilities=list(caps) if caps else None,
                            no_capabilities=caps is not None and not caps,
                            no_new_privileges=session.no_new_privileges,
                            parent_death_signal=session.parent_death_signal,
                            exit_records=session.exit_records)


def extension_of(config) -> Extension:
    """The wire tree of `config`'s extension fields: every session has an entry, so the
    agent's read-write records land under a map entry the host lists."""
    sessions = {sid: session_extension(s) for sid, s in (config.sessions or {}).items()
                if s is not None}
    return Extension(hooks=config.hooks, scrub_secrets=config.scrub_secrets,
                     sessions=sessions or None)


def apply_extension(config, ext: Extension) -> None:
    """Copy a decoded tree into `config`; entries for unknown sessions are ignored."""
    config.hooks = ext.hooks
    config.scrub_secrets = ext.scrub_secrets
    for sid, entry in (ext.sessions or {}).items():
        session = (config.sessions or {}).get(sid)
        if session is None or entry is None:
            continue
        session.limits = entry.limits
        # the decoder reads an absent list as empty: absent means the default set
        session.capabilities = [] if entry.no_capabilities else (entry.capabilities or None)
        session.no_new_privileges = entry.no_new_privileges
        session.parent_death_signal = entry.parent_death_signal
        session.exit_records = entry.exit_records


def take_host_extension(ours, fresh) -> None:
    """The reload rule (tether/config.py take_host_fields) for our fields: the host's
    read-only ones are taken (a known session gets them at its next launch: as with the
    port layer's SetLimits, a running process keeps what it was started with); the exit
    records are ours."""
    ours.hooks = fresh.hooks
    ours.scrub_secrets = fresh.scrub_secrets
    for sid, session in (ours.sessions or {}).items():
        theirs = (fresh.sessions or {}).get(sid)
        if session is None or theirs is None or theirs is session:
            continue
        session.limits = theirs.limits
        session.capabilities = theirs.capabilities
        session.no_new_privileges = theirs.no_new_privileges
        session.parent_death_signal = theirs.parent_death_signal


# -- the two halves together ---------------------------------------------------------------
def encode_config(config) -> dict[str, str]:
    """Every key of `config`: VIC's, exactly as its encoder writes them, then ours."""
    from extraconfig.codec import encode
    keys = encode(config)
    keys.update(encode(extension_of(config), prefix=ROOT))
    return keys


def decode_config(source):
    """An ExecutorConfig with its extension fields from `source` (a mapping, a callable or
    a GuestSource). The VIC part is decoded exactly as before; ours merges in."""
    from extraconfig.codec import decode
    from tether.config import ExecutorConfig
    config = decode(source, ExecutorConfig)
    decode_extension(source, config)
    return config


def decode_extension(source, config) -> None:
    """Merge the extension keys found in `source` into `config` (none found: defaults)."""
    from extraconfig.codec import decode
    apply_extension(config, decode(source, Extension(), prefix=ROOT))


def encode_session_into(sink, config, session) -> None:
    """One session's extension subtree (its read-write keys are the exit records)."""
    from extraconfig.codec import calculate_keys, encode_into
    ext = Extension(sessions={session.common.id: session_extension(session)})
    prefix = calculate_keys(ext, f"Sessions.{session.common.id}", prefix=ROOT)[0]
    encode_into(sink, ext.sessions[session.common.id], prefix=prefix)


def encode_into_sink(sink, config) -> None:
    """The whole extension tree into `sink` (a GuestSink drops the read-only keys)."""
    from extraconfig.codec import encode_into
    encode_into(sink, extension_of(config), prefix=ROOT)
