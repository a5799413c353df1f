"""Every public reference vector, run against the extraconfig API."""
from __future__ import annotations

import base64

import pytest

from test_extraconfig_shapes import ExecutorConfigD1 as ExecutorConfig  # the vectors' shape
from extraconfig import DecodeError, calculate_keys, decode, encode, encode_into
from extraconfig.transport import GuestSink, GuestSource, MapTransport, ScopeFilterSink
from helpers import require_module
from test_extraconfig_shapes import codec_path  # noqa: F401 - autouse: both paths
from test_extraconfig_shapes import (TYPES, from_raw, load_vectors, normalise, to_raw,
                                     with_unnamed_zones)

VECTORS = load_vectors()


def by_kind(*kinds: str) -> list:
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] in kinds]


class RecordingSource(dict):
    """A MapSource that records the keys asked for, in the vectors' notation."""

    def __init__(self, data: dict, missing: str = "MISSING") -> None:
        super().__init__(data)
        self.lookups: list[str] = []
        self.missing = missing

    def get(self, key, default=None):
        if key in self:
            self.lookups.append(key)
            return self[key]
        self.lookups.append(f"{key} -> {self.missing}")
        return default


class RecordingTransport(MapTransport):
    def __init__(self, data: dict) -> None:
        super().__init__(dict(data))
        self.requests: list[str] = []

    def info_get(self, key):
        value = super().info_get(key)
        self.requests.append(f"info-get {key}" + (" -> MISSING" if value is None or value == "" else ""))
        return value


def guest_store(encoded: dict) -> dict:
    """What a guest can see of a VM configured with `encoded` (vmomi turns "" into <nil>)."""
    return {k: (v if v != "" else "<nil>") for k, v in encoded.items() if k.startswith("guestinfo.")}


def split_suffix(key: str) -> tuple[str, str]:
    base, at, suffix = key.partition("@")
    return base, at + suffix


def has_surplus_pieces(encoded: dict) -> bool:
    """True when a joined list holds more '|'-pieces than its length key says."""
    for key, value in encoded.items():
        base, suffix = split_suffix(key)
        if base.endswith("~") and base[:-1] + suffix in encoded:
            if len(value.split("|")) > int(encoded[base[:-1] + suffix]) + 1:
                return True
    return False


def assert_only_pipe_deviation(ours: dict, theirs: dict) -> None:
    """Our encoding differs from the reference only where a slice element holds '|':
    that slice is written indexed (`K|i`) instead of joined (`K~`)."""
    joined = set()
    for k in set(theirs) - set(ours):
        base, suffix = split_suffix(k)
        assert base.endswith("~"), f"{k} is missing for another reason than the '|' deviation"
        joined.add((base[:-1], suffix))
    assert joined, "the maps differ by more than the '|' deviation"
    for k in set(ours) - set(theirs):
        base, suffix = split_suffix(k)
        stem, _, index = base.rpartition("|")
        assert (stem, suffix) in joined and index.isdigit(), k
    for k in set(ours) & set(theirs):
        assert ours[k] == theirs[k], k
    for stem, suffix in joined:
        count = int(ours[stem + suffix]) + 1
        assert "|" in "".join(ours[f"{stem}|{i}{suffix}"] for i in range(count))


def without_deviation_probe(lookups: list[str]) -> list[str]:
    """Drop the one extra probe our decoder makes for the indexed form: `K|0` right after
    a missing `K~` (the `|` deviation in docs/config.md)."""
    out: list[str] = []
    for entry in lookups:
        if out and entry.endswith(" -> MISSING") and out[-1].endswith(" -> MISSING"):
            prev = split_suffix(out[-1][:-len(" -> MISSING")])
            this = split_suffix(entry[:-len(" -> MISSING")])
            if prev[0].endswith("~") and this == (prev[0][:-1] + "|0", prev[1]):
                continue
        out.append(entry)
    return out


def test_vectors_present():
    assert len(VECTORS) > 40, "the public vectors are missing"


@pytest.mark.parametrize("vec", by_kind("encode"))
def test_encode_vector(vec):
    cls = TYPES[vec["type"]]
    value = from_raw(cls, vec["value_raw"])
    if "roundtrip_panic" not in vec:
        again = encode(decode(vec["encoded"], cls))
        if cls is not ExecutorConfig:
            # test shapes have fields the reference itself does not read back (skip-decode,
            # depth, nofollow): compare with what its decode gave, encoded
            expected = with_unnamed_zones(vec["roundtrip_raw"], vec["value_raw"])
            assert again == encode(from_raw(cls, expected))
        elif has_surplus_pieces(vec["encoded"]):
            # the reference's own data lost the tail of a '|'-split list: only the
            # decodable part can come back, and it must come back exactly
            assert again == encode(decode(again, cls))
            assert set(again) == set(vec["encoded"])
        else:
            assert again == vec["encoded"]
    ours = encode(value)
    if ours != vec["encoded"]:
        assert_only_pipe_deviation(ours, vec["encoded"])
        # the deviation's point: what we write decodes back to the same arguments
        assert encode(decode(ours, cls)) == ours
        return

    sent = MapTransport()
    encode_into(GuestSink(sent), value)
    assert sent.data == vec["guest_info_set"]
    sent_init = MapTransport()
    encode_into(GuestSink(sent_init, prefix="init"), value)
    assert sent_init.data == vec["guest_info_set_init"]

    if "roundtrip_panic" in vec:
        with pytest.raises(DecodeError):
            decode(vec["encoded"], cls)
    else:
        back = decode(vec["encoded"], cls)
        expected = with_unnamed_zones(vec["roundtrip_raw"], vec["value_raw"])
        assert normalise(to_raw(cls, back)) == normalise(expected)
        # decoding what we wrote and encoding it again gives the same map
        assert encode(back) == vec["encoded"]

    store = guest_store(vec["encoded"])
    if "guest_decode_panic" in vec:
        with pytest.raises(DecodeError):
            decode(GuestSource(MapTransport(store)), cls)
    elif "guest_decoded_raw" in vec:
        seen = decode(GuestSource(MapTransport(store)), cls)
        expected = with_unnamed_zones(vec["guest_decoded_raw"], vec["value_raw"])
        assert normalise(to_raw(cls, seen)) == normalise(expected)


@pytest.mark.parametrize("vec", by_kind("decode"))
def test_decode_vector(vec):
    cls = TYPES[vec["type"]]
    source = RecordingSource(vec["encoded"])
    if vec.get("initial_raw") is not None:
        target = from_raw(cls, vec["initial_raw"])
        if "decode_panic" in vec:
            with pytest.raises(DecodeError):
                decode(source, target)
            return
        result = decode(source, target)
        assert result is target, "decoding into an instance merges in place"
    elif "decode_panic" in vec:
        with pytest.raises(DecodeError):
            decode(source, cls)
        assert without_deviation_probe(source.lookups) == vec["lookups"]
        return
    else:
        result = decode(source, cls)
    assert normalise(to_raw(cls, result)) == normalise(vec["decoded_raw"])
    assert without_deviation_probe(source.lookups) == vec["lookups"]


@pytest.mark.parametrize("vec", by_kind("decode_nonpointer"))
def test_decode_nonpointer_vector(vec):
    cls = TYPES[vec["type"]]
    if "decode_panic" in vec:
        with pytest.raises(DecodeError):
            decode(vec["encoded"], cls)
        return
    result = decode(vec["encoded"], cls)
    assert isinstance(result, cls)
    assert normalise(to_raw(cls, result)) == normalise(vec["decoded_raw"])


@pytest.mark.parametrize("vec", by_kind("guest_decode"))
def test_guest_decode_vector(vec):
    cls = TYPES[vec["type"]]
    transport = RecordingTransport(vec["guestinfo_store"])
    result = decode(GuestSource(transport, prefix=vec["prefix"]), cls)
    assert normalise(to_raw(cls, result)) == normalise(vec["decoded_raw"])
    assert without_deviation_probe(transport.requests) == vec["info_get"]


@pytest.mark.parametrize("vec", by_kind("encode_with_prefix"))
def test_encode_with_prefix_vector(vec):
    cls = TYPES[vec["type"]]
    value = from_raw(cls, vec["value_raw"])
    assert encode(value, prefix=vec["prefix"]) == vec["encoded"]
    sent = MapTransport()
    encode_into(GuestSink(sent), value, prefix=vec["prefix"])
    assert sent.data == vec["guest_info_set"]


def calc_fixture():
    """An ExecutorConfig with the members the calculate_keys vectors address."""
    from tether.config import Cmd, ContainerNetwork, Diagnostics, ExecutorConfig, ExitLog
    from tether.config import NetworkEndpoint, SessionConfig
    from extraconfig.types import IPNet
    session = SessionConfig(cmd=Cmd(path="/bin/sh", args=["/bin/sh", "-c", "true"]),
                            diagnostics=Diagnostics(exit_logs=[ExitLog(), ExitLog()]))
    session.common.id = "abc"
    endpoint = NetworkEndpoint(network=ContainerNetwork(destinations=[IPNet.parse("10.0.0.0/8")]))
    cfg = ExecutorConfig(sessions={"abc": session}, networks={"br": endpoint},
                         annotations={"k": "v"})
    cfg.common.id = "abc"
    return cfg


def materialise(node, value, segs):
    """`value` with every member the field path names present (map entries, slice
    elements, pointees), so a path into the reference's fixed config resolves here too."""
    from extraconfig.codec import MapNode, PointerNode, SliceNode, StructNode
    if isinstance(node, PointerNode):
        if value is None and segs:
            value = node.inner.zero()
        return materialise(node.inner, value, segs) if value is not None else None
    if not segs:
        return node.zero() if value is None and isinstance(node, StructNode) else value
    seg, rest = segs[0], segs[1:]
    if isinstance(node, StructNode):
        value = node.zero() if value is None else value
        for fp in node.fields:
            if seg in ("*", fp.go_name):
                setattr(value, fp.attr, materialise(fp.node, getattr(value, fp.attr), rest))
    elif isinstance(node, MapNode):
        value = {} if value is None else value
        names = list(value) if seg == "*" else [node.keynode.parse(seg, "")]
        for k in names:
            entry = value.get(k)
            if entry is None and not rest and not isinstance(node.value, (PointerNode, StructNode)):
                entry = node.value.zero() if node.value.zero() is not None else ""
            value[k] = materialise(node.value, entry, rest)
    elif isinstance(node, SliceNode) and seg.isdigit():
        value = list(value or [])
        while len(value) <= int(seg):
            value.append(node.elem.zero() if node.elem.zero() is not None else "")
        value[int(seg)] = materialise(node.elem, value[int(seg)], rest)
    return value


@pytest.mark.parametrize("vec", by_kind("calculate_keys"))
def test_calculate_keys_vector(vec):
    from extraconfig.codec import struct_node
    cfg = calc_fixture()
    if "panic" in vec:
        with pytest.raises(DecodeError):
            calculate_keys(cfg, vec["field"], "")
        return
    segs = vec["field"].split(".") if vec["field"] else []
    cfg = materialise(struct_node(type(cfg)), cfg, segs)
    assert calculate_keys(cfg, vec["field"], "") == vec["keys"]


@pytest.mark.parametrize("vec", by_kind("scope_filter"))
def test_scope_filter_vector(vec):
    cls = TYPES[vec["type"]]
    value = from_raw(cls, vec["value_raw"])
    out: dict = {}
    encode_into(ScopeFilterSink(vec["filter"], out.__setitem__), value)
    assert out == vec["encoded"]


@pytest.mark.parametrize("vec", by_kind("secret_decode"))
def test_secret_decode_vector(vec):
    require_module("nacl")
    from extraconfig.secret import SecretSource
    cls = TYPES[vec["type"]]
    inner = RecordingSource(vec["encoded"], missing="key not found")
    result = decode(SecretSource(inner), cls)
    raw = to_raw(cls, result)
    for go_name, expected in vec["decoded_fields"].items():
        assert normalise(raw[go_name]) == normalise(expected), go_name
    got = [x.replace(" -> key not found", " -> MISSING") for x in inner.lookups[1:]]  # [0]: ovfEnv
    want = [x.replace(" -> key not found", " -> MISSING") for x in vec["lookups"]]
    assert without_deviation_probe(got) == want


@pytest.mark.parametrize("vec", by_kind("secret_encode_shape"))
def test_secret_encode_shape_vector(vec):
    require_module("nacl")
    from extraconfig.secret import SecretKey, SecretSource
    cls = TYPES[vec["type"]]
    value = from_raw(cls, vec["roundtrip"])
    key = SecretKey(base64.b64decode(vec["encoded_shape"]["guestinfo.ovfEnv"]))
    out: dict = {}
    encode_into(key.sink(out.__setitem__), value)
    # the recorded shape also holds a plain key the driver wrote beside the struct
    assert set(out) <= set(vec["encoded_shape"])
    assert {k for k in vec["encoded_shape"] if "@secret" in k} <= set(out)
    assert out["guestinfo.ovfEnv"] == vec["encoded_shape"]["guestinfo.ovfEnv"]
    for k, shape in vec["encoded_shape"].items():
        if "@secret" in k:
            n = int(shape.split("base64 of ")[1].split(" bytes")[0])
            assert len(base64.b64decode(out[k])) == n, k
    back = decode(SecretSource(out), cls)
    assert to_raw(cls, back) == vec["roundtrip"]
