"""How a field of a record or dataclass declares its place in the guestinfo key space.

Every field the codec should see is declared with `vic(...)` (a Go field with a
`vic` tag) or `untagged(...)` (an exported Go field without one). A field declared any
other way is treated like an unexported Go field: skipped. Both work in a `@record`
(extraconfig/record.py) and in a `@dataclasses.dataclass`.
"""
from __future__ import annotations

from .record import MISSING, field, record

META = "extraconfig"


@record(frozen=True)
class Tag:
    go_name: str           # the Go field name: the key segment when no key tag is given
    tagged: bool           # False: inherits scope from the parent key (keys.go)
    scope: str = ""        # the raw scope tag, e.g. "read-only" or "read-write,non-persistent"
    key: str = ""          # the raw key tag ("" means: use go_name)
    recurse: str = ""      # the raw recurse tag, e.g. "depth=1" or "nofollow"


def vic(go_name: str, scope: str = "", key: str = "", *, recurse: str = "",
        default=MISSING, default_factory=MISSING):
    """A Go field carrying `vic:"0.1" scope:"<scope>" key:"<key>"`."""
    return field(default=default, default_factory=default_factory,
                 metadata={META: Tag(go_name, True, scope, key, recurse)})


def untagged(go_name: str, *, default=MISSING, default_factory=MISSING):
    """An exported Go field with no vic tag: keyed by its Go name, scope inherited."""
    return field(default=default, default_factory=default_factory,
                 metadata={META: Tag(go_name, False)})


def tag_of(field) -> Tag | None:
    return field.metadata.get(META)
