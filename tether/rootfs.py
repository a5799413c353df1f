"""Paths inside the container root, resolved the way a process chrooted there sees them.

An image's `/etc/resolv.conf -> /run/resolvconf/resolv.conf` must resolve inside the image,
never into the agent's own root: every caller that turns a container path into a host
path (the /etc files, volume mount points, copy in and out) goes through here.

The result is a path string: a process inside the container that swaps a component for a
symlink after we resolved it can still redirect a later call on that string. Callers that
face a hostile container must open what they resolve without following symlinks.
"""
from __future__ import annotations

import errno
import os

MAX_SYMLINKS = 40   # as the kernel's path walk (ELOOP after 40 links)


def resolve_in_root(root: str, path: str, follow_last: bool = True) -> str:
    """`root` joined with `path`, every symlink on the way followed as if `root` were `/`
    (`..` stops at the root). With `follow_last` false, a symlink in the last component is
    left as it is (to act on the link itself). Raises OSError(ELOOP) past 40 links."""
    root = os.path.abspath(root)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if (parts or follow_last) and os.path.islink(candidate):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)
