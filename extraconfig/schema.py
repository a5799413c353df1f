"""How a dataclass field declares its place in the guestinfo key space.

Every field the codec should see is declared with `vic(...)` (a Go field with a
`vic` tag) or `untagged(...)` (an exported Go field without one). A dataclass
field declared any other way is treated like an unexported Go field: skipped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any

META = "extraconfig"


@dataclasses.dataclass(frozen=True)
class Tag:
    go_name: str           # the Go field name: the key segment when no key tag is given
    tagged: bool           # False: inherits scope from the parent key (keys.go)
    scope: str = ""        # the raw scope tag, e.g. "read-only" or "read-write,non-persistent"
    key: str = ""          # the raw key tag ("" means: use go_name)
    recurse: str = ""      # the raw recurse tag, e.g. "depth=1" or "nofollow"


def _field(tag: Tag, default: Any, default_factory: Any) -> Any:
    kw: dict[str, Any] = {"metadata": {META: tag}}
    if default_factory is not MISSING:
        kw["default_factory"] = default_factory
    elif default is not MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def vic(go_name: str, scope: str = "", key: str = "", *, recurse: str = "",
        default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A Go field carrying `vic:"0.1" scope:"<scope>" key:"<key>"`."""
    return _field(Tag(go_name, True, scope, key, recurse), default, default_factory)


def untagged(go_name: str, *, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """An exported Go field with no vic tag: keyed by its Go name, scope inherited."""
    return _field(Tag(go_name, False), default, default_factory)


def tag_of(field: dataclasses.Field) -> Tag | None:
    return field.metadata.get(META)
