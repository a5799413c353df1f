"""Key construction: scopes, separators and suffixes
(vmware/vic pkg/vsphere/extraconfig/keys.go).

Scope flags use the bit values of the reference's HEAD constants, so filters written
as numbers there mean the same here.
"""
from __future__ import annotations

ROOT = "guestinfo.vice."
VISIBLE = "guestinfo."

INVALID = 1
HIDDEN = 2
READ_ONLY = 4
READ_WRITE = 8
WRITE_ONLY = 16
NON_PERSISTENT = 32
VOLATILE = 64
SECRET = 128

SECRET_SUFFIX = "@secret"
NP_SUFFIX = "@non-persistent"

_WORDS = {
    "hidden": HIDDEN,
    "read-only": READ_ONLY,
    "read-write": READ_WRITE,
    "volatile": VOLATILE,
    "non-persistent": NON_PERSISTENT,
    "secret": SECRET | READ_ONLY,
}


def scope_flags(scope: str) -> int:
    """Flags for a raw scope tag; INVALID for an unknown word (the field is then skipped)."""
    words = scope.split(",")
    if not any(words):                # no scope, or only empty words
        return HIDDEN | READ_ONLY
    flags = 0
    for word in words:
        bit = _WORDS.get(word)
        if bit is None:
            return INVALID
        flags |= bit
    return flags


def _suffix_words(key: str) -> int:
    flags = 0
    if "@" in key:
        words = key.split("@")[1:]
        if "secret" in words:
            flags |= SECRET | READ_ONLY
        if "non-persistent" in words:
            flags |= NON_PERSISTENT
    return flags


def flags_from_key(key: str) -> int:
    """The scope an untagged field inherits from its parent key (keys.go calculateScopeFromKey)."""
    flags = 0 if key.startswith(VISIBLE) else HIDDEN
    flags |= READ_ONLY if "/" in key else READ_WRITE
    return flags | _suffix_words(key)


def filter_flags(key: str) -> int:
    """The class ScopeFilterSink derives from a key string (encode.go ScopeFilterSink)."""
    flags = 0 if key.startswith(VISIBLE) else HIDDEN
    flags |= READ_ONLY if "/" in key else READ_WRITE
    return flags | _suffix_words(key)


def join_key(prefix: str, flags: int, name: str) -> str | None:
    """The key of field `name` with scope `flags` under `prefix`; None: the field is skipped."""
    if "@" in prefix:
        if NON_PERSISTENT & _suffix_words(prefix):
            flags |= NON_PERSISTENT
        base = prefix.split("@", 1)[0]
    else:
        base = prefix
    hide = flags & HIDDEN
    if flags & READ_WRITE and not hide:
        sep, other = ".", "/"
    else:
        sep, other = "/", "."
    visible = prefix.startswith(VISIBLE)
    path = name if base == "" else base + sep + name
    if flags & SECRET:
        path += SECRET_SUFFIX
    if flags & NON_PERSISTENT:
        if hide:
            return None
        path += NP_SUFFIX
    if hide:
        return path[len(ROOT) + 1:] if visible else path
    path = path.replace(other, sep)
    if not visible:
        return ROOT + sep + path
    return ROOT + path[len(ROOT):]


def append(prefix: str, part: str) -> str:
    """Map entries, slice elements and `~`: appended before any `@` suffix (HEAD)."""
    if "@" in prefix:
        base, suffix = prefix.split("@", 1)
        return base + part + "@" + suffix
    return prefix + part


def insert_prefix(key: str, prefix: str) -> str:
    """The `WithPrefix` transports' splice (keys.go addPrefixToKey), bug for hidden keys
    included."""
    if not prefix:
        return key
    rest = key[len(ROOT):] if key.startswith(ROOT) else key
    if not rest:
        return ROOT + prefix
    sep = rest[0]
    p = prefix.replace("/", ".") if sep == "." else prefix.replace(".", "/")
    return ROOT + sep + p + rest
