"""The generated encode/decode functions against the plan interpreter they unroll.

Same results, same order of lookups, same order of sink calls, same errors, the same
budget charged, for every shape the vectors use, under prefixes that take each path of
the key rules (empty, visible, hidden, `@` suffixes, map names with separators in them).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import subprocess
import sys
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extraconfig import codec, codegen
from extraconfig.codec import DecodeBudget, DecodeError, Spend, encode_generic
from extraconfig.gotime import GoTime
from extraconfig.schema import untagged, vic
from extraconfig.types import IP, IPNet
from test_extraconfig_properties import configs, nasty_values
from test_extraconfig_shapes import TYPES, from_raw, load_vectors
from tether.config import ExecutorConfig, ExitLog, SessionConfig

RO, RW, HID = "read-only", "read-write", "hidden"


@dataclasses.dataclass
class Leafy:
    a: str = vic("A", RO, "a.x", default="")
    b: int = vic("B", RW, "b/y", default=0)
    h: str = vic("H", HID, "h", default="")
    u: str = untagged("U", default="")
    net: IPNet = untagged("Net", default_factory=IPNet)
    when: Optional[GoTime] = vic("When", RW, "when", default=None)


@dataclasses.dataclass
class Holder:
    items: Optional[list[Leafy]] = vic("Items", RO, "items", default=None)
    by_name: Optional[dict[str, Leafy]] = vic("ByName", RW, "by.name", default=None)
    ptrs: Optional[dict[str, Optional[Leafy]]] = vic("Ptrs", RO, "ptrs", default=None)
    one: Leafy = vic("One", RW, "one/x", default_factory=Leafy)
    maybe: Optional[Leafy] = vic("Maybe", RO, "maybe", default=None)
    words: Optional[list[str]] = vic("Words", HID, "wo.rds", default=None)


@dataclasses.dataclass
class Awkward:
    """Key shapes no vector has: separators in key tags, struct slices under every scope."""
    holders: Optional[list[Holder]] = vic("Holders", RW, "hold.ers", default=None)
    hidden: Holder = vic("Hidden", HID, "hid.den", default_factory=Holder)
    hidden_list: Optional[list[Leafy]] = vic("HiddenList", HID, "hlist", default=None)
    plain: Holder = vic("Plain", RO, "pl/ain", default_factory=Holder)
    inherit: Holder = untagged("Inherit", default_factory=Holder)
    secret: Leafy = vic("Secret", "secret", "sec", default_factory=Leafy)
    np: Optional[list[Leafy]] = vic("NP", "read-only,non-persistent", "np", default=None)
    deep: Optional[Holder] = vic("Deep", RO, "deep", recurse="depth=2", default=None)
    shallow: Optional[list[Holder]] = vic("Shallow", RW, "sh", recurse="depth=3", default=None)


PREFIXES = ["", "guestinfo.vice.", "guestinfo.vice./sessions|a.b/c", "guestinfo.vice..m|x/y.z",
            "root", "root/a.b", "guestinfo.vice./s@secret", "guestinfo.vice..n@non-persistent",
            "guestinfo.other", "x@y", "guestinfo.vice./guestinfo.x"]
# the vectors' shapes (their ExecutorConfig is the reference's d1ef848e0 one), ours, and these
CLASSES = sorted({*TYPES.values(), ExecutorConfig, Leafy, Holder, Awkward},
                 key=lambda c: (c.__name__, c.__module__))


def class_id(cls) -> str:
    return cls.__name__ if cls.__module__ != "types" else cls.__name__ + "-vectors"
VALUES = [(TYPES[v["type"]], v[f]) for v in load_vectors()
          for f in ("value_raw", "decoded_raw", "initial_raw")
          if v.get(f) is not None and v.get("type") in TYPES]


def populated(node, depth: int = 0):
    """A value with every field of the plan set (two members in each map and slice)."""
    if depth > 6:
        return node.zero()
    if isinstance(node, codec.PointerNode):
        return populated(node.inner, depth + 1)
    if isinstance(node, codec.StructNode):
        obj = node.cls()
        for fp in node.fields:
            setattr(obj, fp.attr, populated(fp.node, depth + 1))
        return obj
    if isinstance(node, codec.MapNode):
        keys = {"string": ["a", "b.c"], "int": [1, -2]}.get(node.keynode.kind, [])
        return {k: populated(node.value, depth + 1) for k in keys}
    if isinstance(node, codec.SliceNode):
        return [populated(node.elem, depth + 1) for _ in range(2 if depth < 3 else 1)]
    if isinstance(node, codec.BytesNode):
        return node.cls(b"\n\x00\x00\x01")
    if isinstance(node, codec.TimeNode):
        return GoTime(1488391201, 5, -28800, "PST")
    return {"string": "s", "int": 7, "uint": 3, "bool": True, "float": 1.5,
            "float32": 0.5}.get(node.kind, node.zero())


def values_of(cls) -> list:
    """The vectors' values of `cls`, one with every field set, and its zero value."""
    return ([from_raw(cls, raw) for c, raw in VALUES if c is cls]
            + [populated(codec.struct_node(cls)), cls()])


def snapshot(value):
    """A comparable form of a decoded value: types, bytes and float texts kept, dict order
    kept (NaN breaks ==, IP's repr hides its bytes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,
                tuple(snapshot(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, list):
        return ("list", [snapshot(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(snapshot(k), snapshot(v)) for k, v in value.items()])
    if isinstance(value, bytes):
        return (type(value).__name__, bytes(value))
    if isinstance(value, float):
        return ("float", repr(value) if not math.isnan(value) else "nan")
    return (type(value).__name__, value)


class Recorder(dict):
    def __init__(self, data):
        super().__init__(data)
        self.lookups: list[str] = []

    def get(self, key, default=None):
        self.lookups.append(key)
        return super().get(key, default)


def run_decode(path: str, data: dict, cls, target, prefix: str, budget: DecodeBudget):
    """(outcome, lookups, spend left) of one decode through `path`."""
    source = Recorder(data)
    spend = Spend(budget)
    node = codec.struct_node(cls)
    try:
        spend.charge(prefix, 0, codec.static_lookups(node, -1, True))      # as decode() does
        if path == "generated":
            fn = codec._generated(codec._DECODERS, cls, "decode")
            found, value = fn(source.get, target, prefix, spend)
        else:
            found, value = node.dec(source.get, target, prefix, -1, True, spend)
        outcome = ("ok", found, snapshot(value))
    except DecodeError as e:
        outcome = ("error", type(e).__name__, str(e), e.key)
    except Exception as e:                 # noqa: BLE001 - compared, not hidden
        outcome = ("raised", type(e).__name__, str(e))
    return outcome, source.lookups, (spend.lookups, spend.entries)


@functools.lru_cache(maxsize=None)
def sample_keys(cls, prefix: str) -> list[str]:
    keys: set[str] = set()
    for value in values_of(cls):
        try:
            keys.update(encode_generic(value, prefix))
        except Exception:                  # noqa: BLE001 - some values do not encode
            pass
    return sorted(keys | {k + s for k in keys for s in ("|0", "|1", "~", "|a", "|")})


def assert_same_decode(data, cls, prefix, initial=None, budget=None):
    budget = budget or DecodeBudget()
    targets = [None, None]
    if initial is not None:
        targets = [copy.deepcopy(initial), copy.deepcopy(initial)]
    gen = run_decode("generated", data, cls, targets[0], prefix, budget)
    ref = run_decode("interpreter", data, cls, targets[1], prefix, budget)
    assert gen == ref
    if ref[0][0] == "ok":
        charged = budget.lookups - ref[2][0]
        assert len(ref[1]) <= charged, "a lookup the budget did not charge for"


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_vector_values_decode_and_encode_alike(cls, prefix):
    checked = 0
    for value in values_of(cls):
        try:
            expected = list(encode_generic(value, prefix).items())
        except Exception as e:             # noqa: BLE001 - compared, not hidden
            with pytest.raises(type(e)):
                codec.encode(value, prefix)
            continue
        assert list(codec.encode(value, prefix).items()) == expected
        calls: list = []
        codec.encode_into(lambda k, v: calls.append((k, v)), value, prefix)
        assert calls == expected
        assert_same_decode(dict(expected), cls, prefix)
        assert_same_decode(dict(expected), cls, prefix, initial=value)
        checked += 1
    assert checked


AWKWARD = ["", "0", "1", "-1", "2", "65536", "+5", " 1", "\u0663", "\u0967\u0968", "9" * 19,
           "true", "T", "|", "a|b", "||", "a|", "CgAAAg==", "===", "a", "NaN", "1e3",
           "2017-03-01 10:00:00 +0000 UTC", "2017-03-01 10:00:00 +0100 +0100"]


@pytest.mark.parametrize("prefix", ["", "guestinfo.vice./m|a.b"])
@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_each_key_alone_and_all_keys_alike_decode_alike(cls, prefix):
    """Deterministic sweeps: every sample key alone (with values in turn), then every
    key at once with one awkward value; fresh and merged into a value."""
    keys = sample_keys(cls, prefix)
    initial = values_of(cls)[0]
    for i, key in enumerate(keys):
        for value in (AWKWARD[i % len(AWKWARD)], "a"):
            assert_same_decode({key: value}, cls, prefix)
        if i % 4 == 0:
            assert_same_decode({key: AWKWARD[i // 4 % len(AWKWARD)]}, cls, prefix, initial)
    for value in AWKWARD:
        assert_same_decode(dict.fromkeys(keys, value), cls, prefix)
        assert_same_decode(dict.fromkeys(keys, value), cls, prefix, initial)


MAP_SETTINGS = settings(max_examples=150, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@MAP_SETTINGS
@given(st.data())
def test_arbitrary_maps_decode_alike(data):
    cls = data.draw(st.sampled_from(CLASSES), label="cls")
    prefix = data.draw(st.sampled_from(PREFIXES), label="prefix")
    keys = sample_keys(cls, prefix)
    entries = data.draw(st.dictionaries(st.sampled_from(keys) if keys else st.text(max_size=5),
                                        nasty_values, max_size=30), label="entries")
    initial = data.draw(st.sampled_from([None] + values_of(cls)), label="initial")
    assert_same_decode(entries, cls, prefix, initial)


@MAP_SETTINGS
@given(st.data())
def test_small_budgets_fail_alike(data):
    cls = data.draw(st.sampled_from(CLASSES), label="cls")
    encoded = encode_generic(data.draw(st.sampled_from(values_of(cls))))
    budget = DecodeBudget(lookups=data.draw(st.integers(0, 60)), entries=data.draw(st.integers(0, 8)))
    assert_same_decode(encoded, cls, "", budget=budget)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs(), st.sampled_from(PREFIXES))
def test_configs_encode_alike(cfg, prefix):
    expected = list(encode_generic(cfg, prefix).items())
    assert list(codec.encode(cfg, prefix).items()) == expected
    for session in (cfg.sessions or {}).values():
        calls: list = []
        codec.encode_into(lambda k, v: calls.append((k, v)), session, prefix)
        assert calls == list(encode_generic(session, prefix).items())
    assert_same_decode(dict(expected), ExecutorConfig, prefix)


def test_map_names_with_separators_and_suffixes_decode_alike():
    cfg = ExecutorConfig(sessions={n: SessionConfig() for n in
                                   ("a.b", "c/d", "e@secret", "guestinfo.x", "", "f|g")})
    for s in cfg.sessions.values():
        s.cmd.args = ["x", "y|z"]
        s.diagnostics.exit_logs = [ExitLog(time=GoTime(1, 2, 3600, "CET"), message="m|n")]
    cfg.networks = {"n.1": None}
    expected = encode_generic(cfg)
    assert list(codec.encode(cfg).items()) == list(expected.items())
    assert_same_decode(expected, ExecutorConfig, "")


def test_generated_source_is_inspectable():
    text = codegen.source(ExecutorConfig, "decode")
    assert "def d_ExecutorConfig_0(get, cur, P, sp):" in text
    assert "def d_SessionConfig_" in text          # map values get their own entry
    assert "'cmd/'" in text                         # nested structs inlined, keys precomputed
    assert "def e_ExecutorConfig_0(out, o, P):" in codegen.source(ExecutorConfig, "encode")
    assert "out(" in codegen.source(SessionConfig, "encode_sink")


def run_python(code: str, codegen_setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "EXTRACONFIG_CODEGEN"}
    if codegen_setting is not None:
        env["EXTRACONFIG_CODEGEN"] = codegen_setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


USES_GENERATED = (
    "import extraconfig, extraconfig.codec as C, tether.config as c;"
    "from extraconfig.transport import GuestSource, MapTransport;"
    "big = c.ExecutorConfig(sessions={str(i): c.SessionConfig() for i in range(200)});"
    "small = c.ExecutorConfig(sessions={'a': c.SessionConfig()});"
    "guest = GuestSource(MapTransport(extraconfig.encode(small)));"
    "extraconfig.decode(guest, c.ExecutorConfig);"
    "first = c.ExecutorConfig in C._DECODERS;"
    "[extraconfig.decode(guest, c.ExecutorConfig) for _ in range(200)];"
    "repeated = c.ExecutorConfig in C._DECODERS;"
    "C._DECODERS.clear(); C._INTERPRETED.clear();"
    "extraconfig.decode(extraconfig.encode(big), c.ExecutorConfig);"
    "print(first, repeated, c.ExecutorConfig in C._DECODERS)")


def test_small_work_is_interpreted_and_code_generated_once_it_pays():
    # the agent's one small decode at boot stays in the interpreter; repeated decodes, or
    # one of a dict big enough, switch the class to generated code
    assert run_python(USES_GENERATED, None) == "False True True"


def test_codegen_can_be_switched_off_or_forced():
    assert run_python(USES_GENERATED, "0") == "False False False"
    assert run_python(USES_GENERATED, "1") == "True True True"


def test_ip_elements_and_pointer_elements_decode_alike():
    data = {"guestinfo.vice./ips": "1", "guestinfo.vice./ips|0": "CgAAAQ==",
            "guestinfo.vice./ips|1": "not base64"}
    assert_same_decode(data, TYPES["Kinds"], "")
    assert codec.decode(data, TYPES["Kinds"]).ips == [IP(b"\n\x00\x00\x01"), IP(b"")]
    data = {"guestinfo.vice./p": "1", "guestinfo.vice./p~": "x|y", "guestinfo.vice./s": "v"}
    assert_same_decode(data, TYPES["KPtrSlice"], "")
