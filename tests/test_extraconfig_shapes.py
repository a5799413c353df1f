"""The Go shapes of the reference vectors as tagged dataclasses, and `value_raw` converters.

This module holds no tests of its own; the vector and property tests import it.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from extraconfig.gotime import GoTime
from extraconfig.schema import tag_of, untagged, vic
from extraconfig.types import (ARRAY, FLOAT32, INTERFACE, IP, UINT, URL, Array, Duration, Float32,
                               Interface, IPMask, IPNet, Uint, Userinfo)
from tether import config as executor

@pytest.fixture(autouse=True, params=["interpreted", "generated"])
def codec_path(request, monkeypatch):
    """Tests importing this fixture run twice: through the plan interpreter only, and
    through generated code from the first call (extraconfig/codegen.py)."""
    from extraconfig import codec
    monkeypatch.setattr(codec, "CODEGEN", "0" if request.param == "interpreted" else "1")
    return request.param


VECTORS = Path(__file__).resolve().parent / "data"   # see data/README.md
RO, RW, HID = "read-only", "read-write", "hidden"


def load_vectors() -> list[dict]:
    path = VECTORS / "extraconfig-public.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Inner:
    a: str = vic("A", RO, "a", default="")
    b: int = vic("B", RW, "b", default=0)
    h: str = vic("H", HID, "h", default="")


@dataclasses.dataclass
class Mini:
    n: int = vic("N", RW, "n", default=0)
    f: float = vic("F", RO, "f", default=0.0)
    on: bool = vic("On", RO, "on", default=False)
    when: GoTime = vic("When", RO, "when", default_factory=GoTime)
    blob: Optional[bytes] = vic("Blob", RO, "blob", default=None)
    tags: Optional[list[str]] = vic("Tags", RO, "tags", default=None)
    ports: Optional[dict[int, str]] = vic("Ports", RO, "ports", default=None)
    net: IPNet = vic("Net", RW, "net", default_factory=IPNet)
    note: str = vic("Note", HID, "note", default="")
    extra: str = untagged("Extra", default="")


@dataclasses.dataclass
class HiddenPair:
    ro: Inner = vic("RO", RO, "ro", default_factory=Inner)
    h: Inner = vic("H", HID, "hid", default_factory=Inner)


@dataclasses.dataclass
class KHiddenRoot:
    root: Inner = vic("Root", HID, "root", default_factory=Inner)
    rw: HiddenPair = vic("RW", RW, "rw", default_factory=HiddenPair)


@dataclasses.dataclass
class KMapDots:
    m: Optional[dict[str, str]] = vic("M", RO, "m", default=None)
    p: Optional[dict[str, Inner]] = vic("P", RO, "p", default=None)
    l: Optional[dict[str, Optional[list[str]]]] = vic("L", RW, "l", default=None)
    u: Optional[dict[str, executor.ExitLog]] = vic("U", RW, "u", default=None)


@dataclasses.dataclass
class KTimes:
    times: Optional[list[GoTime]] = vic("Times", RO, "times", default=None)
    t: GoTime = vic("T", RW, "t", default_factory=GoTime)


@dataclasses.dataclass
class KFloats:
    f: Optional[list[float]] = vic("F", RW, "f", default=None)
    g: float = vic("G", RW, "g", default=0.0)


@dataclasses.dataclass
class KF32:
    f: Float32 = vic("F", RO, "f", default=0.0)


@dataclasses.dataclass
class KArr:
    a: Array(int) = vic("A", RO, "a", default_factory=lambda: [0, 0, 0])


@dataclasses.dataclass
class KPtrSlice:
    p: Optional[list[Optional[Inner]]] = vic("P", RO, "p", default=None)
    s: str = vic("S", RO, "s", default="")


@dataclasses.dataclass
class KStrOnly:
    a: str = vic("A", RO, "a", default="")


@dataclasses.dataclass
class URL119:
    scheme: str = untagged("Scheme", default="")
    opaque: str = untagged("Opaque", default="")
    user: Optional[Userinfo] = untagged("User", default=None)
    host: str = untagged("Host", default="")
    path: str = untagged("Path", default="")
    raw_path: str = untagged("RawPath", default="")
    omit_host: bool = untagged("OmitHost", default=False)
    force_query: bool = untagged("ForceQuery", default=False)
    raw_query: str = untagged("RawQuery", default="")
    fragment: str = untagged("Fragment", default="")
    raw_fragment: str = untagged("RawFragment", default="")


@dataclasses.dataclass
class MountSpec119:
    source: URL119 = vic("Source", RO, "source", default_factory=URL119)
    path: str = vic("Path", RO, "dest", default="")
    mode: str = vic("Mode", RO, "mode", default="")


@dataclasses.dataclass
class KMount119:
    mounts: Optional[dict[str, MountSpec119]] = vic("Mounts", RO, "mounts", default=None)


@dataclasses.dataclass
class SecretOnly:
    token: str = vic("Token", "secret", "token", default="")
    key: Optional[bytes] = vic("Key", "secret", default=None)


@dataclasses.dataclass
class Build:
    version: str = untagged("Version", default="")
    git_commit: str = untagged("GitCommit", default="")
    build_date: str = untagged("BuildDate", default="")
    build_number: str = untagged("BuildNumber", default="")
    state: str = untagged("State", default="")
    plugin_version: int = untagged("PluginVersion", default=0)


@dataclasses.dataclass
class KVersion:
    version: Optional[Build] = vic("Version", RO, "version", default=None)


@dataclasses.dataclass
class Kinds:
    i: int = vic("I", RO, "i", default=0)
    i8: int = vic("I8", RO, "i8", default=0)
    i16: int = vic("I16", RO, "i16", default=0)
    i32: int = vic("I32", RO, "i32", default=0)
    i64: int = vic("I64", RO, "i64", default=0)
    u: Uint = vic("U", RO, "u", default=0)
    u8: Uint = vic("U8", RO, "u8", default=0)
    u64: Uint = vic("U64", RO, "u64", default=0)
    b: bool = vic("B", RO, "b", default=False)
    f64: float = vic("F64", RO, "f64", default=0.0)
    s: str = vic("S", RO, "s", default="")
    d: Duration = vic("D", RO, "d", default=0)
    t: GoTime = vic("T", RO, "t", default_factory=GoTime)
    tp: Optional[GoTime] = vic("TP", RO, "tp", default=None)
    sp: Optional[str] = vic("SP", RO, "sp", default=None)
    ipp: Optional[int] = vic("IPP", RO, "ipp", default=None)
    ints: Optional[list[int]] = vic("Ints", RO, "ints", default=None)
    bls: Optional[list[bool]] = vic("Bls", RO, "bools", default=None)
    fls: Optional[list[float]] = vic("Fls", RO, "floats", default=None)
    u16s: Optional[list[Uint]] = vic("U16s", RO, "u16s", default=None)
    strs: Optional[list[str]] = vic("Strs", RO, "strs", default=None)
    ips: Optional[list[IP]] = vic("IPs", RO, "ips", default=None)
    byts: Optional[bytes] = vic("Byts", RO, "bytes", default=None)
    mis: Optional[dict[int, str]] = vic("MIS", RO, "mis", default=None)
    msl: Optional[dict[str, Optional[list[str]]]] = vic("MSL", RO, "msl", default=None)
    msp: Optional[dict[str, Optional[Inner]]] = vic("MSP", RO, "msp", default=None)
    mrw: Optional[dict[str, Inner]] = vic("MRW", RW, "mrw", default=None)
    in_ro: Inner = vic("InRO", RO, "inro", default_factory=Inner)
    in_rw: Inner = vic("InRW", RW, "inrw", default_factory=Inner)
    in_hid: Inner = vic("InHid", HID, "inhid", default_factory=Inner)
    in_p: Optional[Inner] = vic("InP", RO, "inp", default=None)
    in_nil: Optional[Inner] = vic("InNil", RO, "innil", default=None)
    untagged_inner: Inner = untagged("Untagged", default_factory=Inner)
    untagged_str: str = untagged("UntaggedStr", default="")
    iface: Interface = vic("Iface", RO, "iface", default=None)
    no_scope: str = vic("NoScope", "", "noscope", default="")
    no_key: str = vic("NoKey", RO, default="")
    bad_scope: str = vic("BadScope", "bogus", "bad", default="")
    spaced: str = vic("Spaced", RO, "  spaced  ", default="")
    omit_nested: str = vic("OmitNested", RO, "on,omitnested", default="")
    depth0: Inner = vic("Depth0", RO, "depth0", recurse="depth=0", default_factory=Inner)
    depth1: Inner = vic("Depth1", RO, "depth1", recurse="depth=1", default_factory=Inner)
    depth2: Inner = vic("Depth2", RO, "depth2", recurse="depth=2", default_factory=Inner)
    no_follow: Optional[Inner] = vic("NoFollow", RO, "nofollow", recurse="nofollow", default=None)
    volatile: str = vic("Volatile", "read-only,volatile", "volatile", default="")
    np_str: str = vic("NPStr", "read-only,non-persistent", "npstr", default="")
    np_hidden: str = vic("NPHidden", "hidden,non-persistent", "nphidden", default="")
    np_inner: Inner = vic("NPInner", "read-write,non-persistent", "npinner", default_factory=Inner)
    np_strs: Optional[list[str]] = vic("NPStrs", "read-only,non-persistent", "npstrs", default=None)
    np_map: Optional[dict[str, Inner]] = vic("NPMap", "read-only,non-persistent", "npmap", default=None)
    secret: str = vic("Secret", "secret", "secret", default="")
    secret_rw: str = vic("SecretRW", "read-write,secret", "secretrw", default="")
    secret_hid: str = vic("SecretHid", "hidden,secret", "secrethid", default="")
    secret_key: Optional[bytes] = vic("SecretKey", "secret", default=None)
    secret_strs: Optional[list[str]] = vic("SecretStrs", "secret", "secretstrs", default=None)
    skip_enc: str = vic("SkipEnc", RO, "skipenc", recurse="skip-encode", default="")
    skip_dec: str = vic("SkipDec", RO, "skipdec", recurse="skip-decode", default="")


def _shape_without(cls: type, name: str, drop: tuple[str, ...] = (),
                   retype: dict[str, tuple[Any, Any]] | None = None) -> type:
    """A copy of dataclass `cls` without the fields in `drop`; `retype` maps a field to
    (new type, new default factory)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        tp, factory = (retype or {}).get(f.name, (hints[f.name], f.default_factory))
        kw: dict[str, Any] = {"metadata": f.metadata}
        if factory is not dataclasses.MISSING:
            kw["default_factory"] = factory
        else:
            kw["default"] = f.default
        fields.append((f.name, tp, dataclasses.field(**kw)))
    return dataclasses.make_dataclass(name, fields)


# The vectors use lib/config/executor as of d1ef848e0, before ContainerNetwork gained the
# embedded TrustLevel; tether.config has it (its own vector: tests/data/extraconfig-trustlevel.jsonl).
ContainerNetworkD1 = _shape_without(executor.ContainerNetwork, "ContainerNetwork",
                                    drop=("trust_level",))
NetworkEndpointD1 = _shape_without(executor.NetworkEndpoint, "NetworkEndpoint", retype={
    "network": (ContainerNetworkD1, ContainerNetworkD1)})
ExecutorConfigD1 = _shape_without(executor.ExecutorConfig, "ExecutorConfig", retype={
    "networks": (Optional[dict[str, Optional[NetworkEndpointD1]]], dataclasses.MISSING)})

TYPES: dict[str, type] = {
    "ExecutorConfig": ExecutorConfigD1, "SessionConfig": executor.SessionConfig,
    "Mini": Mini, "Inner": Inner, "KHiddenRoot": KHiddenRoot, "KMapDots": KMapDots,
    "KTimes": KTimes, "KFloats": KFloats, "KF32": KF32, "KArr": KArr, "KPtrSlice": KPtrSlice,
    "KStrOnly": KStrOnly, "KMount119": KMount119, "SecretOnly": SecretOnly, "Build": Build,
    "KVersion": KVersion, "Kinds": Kinds,
}


# ------------------------------------------------------------------- raw <-> value

def _strip(tp: Any) -> tuple[Any, Any]:
    """(base type, GoKind marker or None), with Optional unwrapped into ('optional', X)."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return base, next((m for m in meta if m in (UINT, FLOAT32, INTERFACE, ARRAY)), None)
    return tp, None


def _optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _fields(cls: type) -> list[tuple[str, str, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        tag = tag_of(f)
        if tag is not None:
            out.append((f.name, tag.go_name, hints[f.name]))
    return out


def from_raw(tp: Any, raw: Any) -> Any:
    """A Python value of type `tp` from a vector's `value_raw` notation."""
    tp, marker = _strip(tp)
    if marker is INTERFACE:
        return raw
    if marker is FLOAT32:
        return float(raw["$float32"])
    inner = _optional(tp)
    if inner is not None:
        if raw is None:
            return None
        return from_raw(inner, raw)
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp)
        return [from_raw(elem, r) for r in raw] if raw is not None else None
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if raw is None:
            return None
        return {(int(k) if kt is int else k): from_raw(vt, v) for k, v in raw.items()}
    if tp is GoTime:
        return GoTime.from_rfc3339(raw["$time"], zone=raw["zone"])
    if tp is Userinfo:
        return Userinfo(raw["$userinfo"], raw.get("password") if raw.get("password_set") else None)
    if isinstance(tp, type) and issubclass(tp, bytes):
        return tp(base64.b64decode(raw)) if raw is not None else tp(b"")
    if tp is float:
        if isinstance(raw, dict):
            return float(raw["$float"].replace("+Inf", "inf").replace("-Inf", "-inf"))
        return float(raw)
    if dataclasses.is_dataclass(tp):
        obj = tp()
        names = {go: (attr, ftp) for attr, go, ftp in _fields(tp)}
        for go_name, value in raw.items():
            if go_name not in names:
                raise KeyError(f"{tp.__name__} has no Go field {go_name}")
            attr, ftp = names[go_name]
            setattr(obj, attr, from_raw(ftp, value))
        return obj
    return raw


def to_raw(tp: Any, value: Any) -> Any:
    """The vector notation of a Python value (the inverse of from_raw)."""
    tp, marker = _strip(tp)
    if marker is INTERFACE:
        return value
    if marker is FLOAT32:
        return {"$float32": repr(value)}
    inner = _optional(tp)
    if inner is not None:
        if value is None:
            return None
        if isinstance(inner, type) and issubclass(inner, bytes):
            return base64.b64encode(value).decode()
        return to_raw(inner, value)
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp)
        return None if value is None else [to_raw(elem, v) for v in value]
    if origin is dict:
        _, vt = typing.get_args(tp)
        return None if value is None else {str(k): to_raw(vt, v) for k, v in value.items()}
    if tp is GoTime:
        return {"$time": value.to_rfc3339(), "offset": value.offset, "zone": value.zone}
    if tp is Userinfo:
        return {"$userinfo": value.username, "password": value.password or "",
                "password_set": value.password is not None}
    if isinstance(tp, type) and issubclass(tp, bytes):
        return base64.b64encode(value).decode() if value else None
    if tp is float:
        if math.isnan(value):
            return {"$float": "NaN"}
        if math.isinf(value):
            return {"$float": "+Inf" if value > 0 else "-Inf"}
        return value
    if dataclasses.is_dataclass(tp):
        return {go: to_raw(ftp, getattr(value, attr)) for attr, go, ftp in _fields(tp)}
    return value


def normalise(raw: Any) -> Any:
    """Vector raw values compared loosely where Python cannot differ: floats vs ints."""
    if isinstance(raw, dict):
        return {k: normalise(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [normalise(v) for v in raw]
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if raw == "":
        return None        # Python keeps no difference between nil and empty []byte
    return raw


ZERO_TIME_RAW = {"$time": "0001-01-01T00:00:00Z", "offset": 0, "zone": "UTC"}


def with_unnamed_zones(expected: Any, value_raw: Any) -> Any:
    """The reference reads times in an unnamed zone back as the zero time; we deviate and
    read them as written. Patch `expected` (a reference result) with those times."""
    if isinstance(expected, dict) and isinstance(value_raw, dict):
        if expected == ZERO_TIME_RAW and value_raw.get("zone") == "":
            return value_raw
        return {k: with_unnamed_zones(v, value_raw.get(k)) for k, v in expected.items()}
    if isinstance(expected, list) and isinstance(value_raw, list):
        return [with_unnamed_zones(v, value_raw[i] if i < len(value_raw) else None)
                for i, v in enumerate(expected)]
    return expected


def test_raw_converters_are_inverse_on_every_vector_value():
    """The helpers the vector tests rely on read and write value_raw without loss."""
    checked = 0
    for vec in load_vectors():
        cls = TYPES.get(vec.get("type", ""))
        for field in ("value_raw", "decoded_raw", "roundtrip_raw", "initial_raw"):
            raw = vec.get(field)
            if cls is None or raw is None:
                continue
            assert normalise(to_raw(cls, from_raw(cls, raw))) == normalise(raw), (vec["name"], field)
            checked += 1
    assert checked > 40
