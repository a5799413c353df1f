"""Guestinfo transports (`info_get` / `info_set`) and the guest read/write rules.

A transport is any object with:

    info_get(key) -> str | None     # None: the key is not there
    info_set(key, value) -> None

`MapTransport` (in memory) and `VmxFileTransport` (a VMX-style file) live here; the
VMware backdoor and virtio-serial transports live in their own modules and plug into
`GuestSource` / `GuestSink` the same way.
"""
from __future__ import annotations

import os
from _collections_abc import Iterator, Mapping   # collections.abc's, already loaded by os

from .keys import insert_prefix

OVF_ENV = "guestinfo.ovfEnv"
NIL = "<nil>"

TYPE_CHECKING = False     # typing's constant without importing typing (PID 1's startup)
if TYPE_CHECKING:
    from typing import Protocol

    class Transport(Protocol):
        def info_get(self, key: str) -> str | None: ...
        def info_set(self, key: str, value: str) -> None: ...
        # optional: `info_delete(key)` removes a key (where the medium can; the guest
        # side of the VMware backdoor cannot)


class MapTransport:
    """A dict-backed transport: tests, sandboxes, and the host side of a fake VM."""

    def __init__(self, data: dict[str, str] | None = None) -> None:
        self.data = {} if data is None else data

    def info_get(self, key: str) -> str | None:
        return self.data.get(key)

    def info_set(self, key: str, value: str) -> None:
        self.data[key] = value

    def info_delete(self, key: str) -> None:
        self.data.pop(key, None)


def snapshot(transport, prefix: str = "guestinfo.") -> MapTransport | None:
    """Every key under `prefix` read in one request, as a MapTransport to decode from,
    where `transport` can (`info_dump`: the virtio port of extraconfig/virtio.py); None
    where it cannot (the VMware backdoor, a file, a host that does not know the request),
    and the caller reads key by key, as the reference does."""
    dump = getattr(transport, "info_dump", None)
    keys = dump(prefix) if dump is not None else None
    return None if keys is None else MapTransport(keys)


# ---------------------------------------------------------------------- VMX files

# VMX values are written between double quotes; '|' starts a two-hex-digit escape of
# one UTF-8 byte. Values escape '|', '"' and control characters. Keys stay readable
# (`sessions|web`): only what would break the line is escaped, plus a '|' that would
# otherwise read as an escape; so only those escapes are undone when reading a key.
# Reading takes no regular expression (re is not loaded when the agent reads its
# config); the writing patterns are compiled at the first write.
_ESCAPES: dict = {}
_KEY_ESCAPED = frozenset(list(range(0x21)) + [0x22, 0x23, 0x3D, 0x7C, 0x7F])
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def _escape(text: str, which: str) -> str:
    if not _ESCAPES:
        import re
        _ESCAPES["value"] = re.compile(r'[|"\x00-\x1f\x7f]')
        _ESCAPES["key"] = re.compile(
            r'[\x00-\x20"#=\x7f]|\|(?=[01][0-9A-Fa-f]|2[0-3]|3[dD]|7[cCfF])')
    return _ESCAPES[which].sub(lambda m: "".join(f"|{b:02X}" for b in m.group().encode()),
                               text)


def vmx_escape(value: str) -> str:
    return _escape(value, "value")


def vmx_escape_key(key: str) -> str:
    return _escape(key, "key")


def _unescape(text: str, only=None) -> str:
    """Each `|XX` (two hex digits) made the byte it stands for; with `only`, just those
    bytes, the other escapes left as they are."""
    pieces = text.encode("utf-8", errors="surrogateescape").split(b"|")
    out = [pieces[0]]
    for piece in pieces[1:]:
        code = piece[:2]
        if len(code) == 2 and code[0] in _HEX_DIGITS and code[1] in _HEX_DIGITS and (
                only is None or int(code, 16) in only):
            out.append(bytes([int(code, 16)]) + piece[2:])
        else:
            out.append(b"|" + piece)
    return b"".join(out).decode("utf-8", errors="surrogateescape")


def vmx_unescape(text: str) -> str:
    """Undo `|XX` escapes; they stand for bytes, so multi-byte UTF-8 comes back whole."""
    return _unescape(text) if "|" in text else text


def vmx_unescape_key(text: str) -> str:
    return _unescape(text, _KEY_ESCAPED) if "|" in text else text


def format_vmx(entries: Mapping[str, str]) -> str:
    """`key = "value"` lines, sorted by key, with VMX's `|XX` escapes."""
    return "".join(_vmx_line(k, v) for k, v in sorted(entries.items()))


def _vmx_line(key: str, value: str) -> str:
    return f'{vmx_escape_key(key)} = "{vmx_escape(value)}"\n'


def _split_line(line: str) -> tuple[str, str] | None:
    """(key, value) of `key = "value"` (blanks and tabs around the parts; the value runs to
    the last quote), else None: `[ \t]*([^ \t="]+)[ \t]*=[ \t]*"(.*)"[ \t]*`."""
    head, equals, rest = line.partition("=")
    key = head.strip(" \t")      # the key ends at the first blank, quote or '='
    if not equals or not key or " " in key or "\t" in key or '"' in key:
        return None
    quoted = rest.strip(" \t")
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        return None
    return key, quoted[1:-1]


def parse_vmx(text: str) -> dict[str, str]:
    """The entries of VMX text; blank lines and `#` comments are skipped."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pair = _split_line(line)
        if pair is None:
            raise ValueError(f"line {number}: expected key = \"value\", got {line[:80]!r}")
        out[vmx_unescape_key(pair[0])] = vmx_unescape(pair[1])
    return out


class VmxFileTransport:
    """A VMX-style file; every `info_set` rewrites it atomically (write, fsync, rename),
    or once at the end of a `batch()`. A set that changes nothing writes nothing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, str] = {}
        self._lines: dict[str, str] = {}   # key -> its line in the file, as _data holds it
        self._batching = 0
        self._unsaved = False

    def _load(self) -> dict[str, str]:
        if self._batching:
            return self._data       # ours until the batch is written (a host's write: lost)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._data = None, {}
            self._lines.clear()
            return self._data
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                self._data = parse_vmx(f.read())
            self._lines.clear()
            self._stamp = stamp
        return self._data

    def info_get(self, key: str) -> str | None:
        return self._load().get(key)

    def info_set(self, key: str, value: str) -> None:
        data = self._load()
        if data.get(key) == value:
            return
        data[key] = value
        self._lines.pop(key, None)
        self._changed()

    def info_delete(self, key: str) -> None:
        data = self._load()
        if data.pop(key, None) is not None:
            self._lines.pop(key, None)
            self._changed()

    def batch(self):
        """A context: the sets made in it reach the file in one rewrite, at its end. The
        agent's write-back of a session is one (a file rewritten per key made a config
        of many sessions quadratic: 300 sessions took 40 s to launch)."""
        import contextlib

        @contextlib.contextmanager
        def batched():
            self._load()
            self._batching += 1
            try:
                yield self
            finally:
                self._batching -= 1
                if not self._batching and self._unsaved:
                    self._store()
        return batched()

    def _changed(self) -> None:
        self._unsaved = True
        if not self._batching:
            self._store()

    def _store(self) -> None:
        import tempfile
        lines = self._lines
        for key in self._data.keys() - lines.keys():
            lines[key] = _vmx_line(key, self._data[key])
        directory = os.path.dirname(self.path) or "."
        fd, tmp = tempfile.mkstemp(prefix=".vmx-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write("".join(lines[key] for key in sorted(self._data)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            self._stamp = None      # the file holds what it held: read it again
            self._unsaved = False
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        # What we wrote is what the file holds: the next read need not parse it again
        # (the agent's write-back sets keys one by one, re-parsing made that quadratic).
        st = os.stat(self.path)
        self._stamp, self._unsaved = (st.st_mtime_ns, st.st_size), False


# ------------------------------------------------------------ guest semantics

def _guest_key(key: str) -> str:
    # rpcvmx puts "guestinfo." in front of any key not starting with "guestinfo"
    return key if key.startswith("guestinfo") else "guestinfo." + key


class GuestSource(Mapping[str, str]):
    """The reference's in-guest reader over any transport
    (vmware/vic pkg/vsphere/extraconfig/decode_linux.go, GuestInfoSource).

    `""` reads as missing and `<nil>` as the empty string; hidden keys are asked for as
    `guestinfo.<key>`; `prefix` is spliced in as vic-init's does. `guestinfo.ovfEnv` is
    read once at creation: when it holds a 32-byte key, `@secret` values are decrypted.
    """

    def __init__(self, transport: Transport, prefix: str = "") -> None:
        self.transport = transport
        self.prefix = prefix
        self._ovf_env = self._raw(OVF_ENV)   # read first, as the reference does
        self._secret_key: bytes | None = None

    @property
    def secret_key(self) -> bytes:
        """The key `guestinfo.ovfEnv` holds (extraconfig.secret, loaded when a secret
        value is first read: most configs have none)."""
        if self._secret_key is None:
            from .secret import key_from_text
            self._secret_key = key_from_text(self._ovf_env)
        return self._secret_key

    def _raw(self, key: str) -> str | None:
        if key != OVF_ENV:
            key = insert_prefix(key, self.prefix)
        value = self.transport.info_get(_guest_key(key))
        if value is None or value == "":
            return None
        return "" if value == NIL else value

    def __getitem__(self, key: str) -> str:
        value = self._raw(key)
        if value is None:
            raise KeyError(key)
        if "@secret" in key and "secret" in key.split("@")[1:]:
            from .secret import open_value
            value = open_value(self.secret_key, value, key)
            if value is None:
                raise KeyError(key)
        return value

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        raise TypeError("guestinfo cannot be listed, only read key by key")

    def __len__(self) -> int:
        raise TypeError("guestinfo cannot be listed, only read key by key")


class GuestSink:
    """The reference's in-guest writer as a sink `sink(key, value)`
    (vmware/vic pkg/vsphere/extraconfig/encode_linux.go, GuestInfoSink).

    Keys containing `/` (read-only ones) are dropped, `""` is sent as `<nil>`, and keys
    not starting with `guestinfo` get `guestinfo.` in front, as rpcvmx does.
    """

    def __init__(self, transport: Transport, prefix: str = "") -> None:
        self.transport = transport
        self.prefix = prefix

    def __call__(self, key: str, value: str) -> None:
        if "/" in key:
            return
        key = insert_prefix(key, self.prefix)
        self.transport.info_set(_guest_key(key), value if value != "" else NIL)


class ScopeFilterSink:
    """Forwards a pair only when the scope derived from its key meets `filter`, as
    vmware/vic pkg/vsphere/extraconfig/encode.go ScopeFilterSink."""

    def __init__(self, filter: int, sink) -> None:
        self.filter = filter
        self.sink = sink

    def __call__(self, key: str, value: str) -> None:
        from .keys import filter_flags
        if filter_flags(key) & self.filter:
            self.sink(key, value)
