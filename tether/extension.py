"""Our configuration extension: what VIC's ExecutorConfig cannot say, under keys of our own.

Per session: resource `limits`, a capability keep-list, `no_new_privileges`, a parent
death signal, and the structured exit records the agent writes back. Per executor: the
lifecycle `hooks` (the OCI runtime spec's points and names, docs/config.md) and whether
the agent scrubs secrets from guestinfo.

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

from extraconfig.record import record
from extraconfig.schema import vic

# The in-memory types are the config model's; the wire tree below carries them.
from tether.config import (HOOK_POINTS, ExecutorConfig, ExitRecord, Hook, Hooks,  # noqa: F401
                           Limits)

RO = "read-only"
RW = "read-write"

PREFIX = "tether"
ROOT = "guestinfo.vice./" + PREFIX        # the tree's root, as a codec prefix

# -- the wire tree -----------------------------------------------------------------------
@record
class SessionExtension:
    limits: Limits = vic("Limits", RO, "limits", default_factory=Limits)
    capabilities: list[str] | None = vic("Capabilities", RO, "capabilities", default=None)
    # An empty list writes no key, so "keep none" needs its own flag.
    no_capabilities: bool = vic("NoCapabilities", RO, "nocapabilities", default=False)
    no_new_privileges: bool = vic("NoNewPrivileges", RO, "nonewprivileges", default=False)
    parent_death_signal: str = vic("ParentDeathSignal", RO, "parentdeathsignal", default="")
    exit_records: list[ExitRecord] | None = vic("ExitRecords", RW, "exitrecords",
                                                   default=None)


@record
class Extension:
    hooks: Hooks = vic("Hooks", RO, "hooks", default_factory=Hooks)
    scrub_secrets: bool | None = vic("ScrubSecrets", RO, "scrubsecrets", default=None)
    sessions: dict[str, SessionExtension] | None = vic("Sessions", RO, "sessions",
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
    a GuestSource). The VIC part is decoded exactly as before, RunBlock from either of
    its keys (tether/config.py read_run_blocks); ours merges in."""
    from extraconfig.codec import decode
    from tether.config import read_run_blocks
    config = decode(source, ExecutorConfig)
    read_run_blocks(source, config)
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
    prefix = calculate_keys(ext, ["Sessions", session.common.id], prefix=ROOT)[0]
    encode_into(sink, ext.sessions[session.common.id], prefix=prefix)


def encode_into_sink(sink, config) -> None:
    """The whole extension tree into `sink` (a GuestSink drops the read-only keys)."""
    from extraconfig.codec import encode_into
    encode_into(sink, extension_of(config), prefix=ROOT)
