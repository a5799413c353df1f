"""Codec rules the vectors state in prose: errors, merges, the '|' deviation, keys, transports."""
from __future__ import annotations

import base64
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extraconfig import DecodeError, calculate_key, calculate_keys, decode, encode, encode_into
from extraconfig import keys as K
from extraconfig.codec import _field_key, _struct_keys, struct_node
from extraconfig.gotime import GoTime, format_go, parse_go
from extraconfig.record import record
from extraconfig.scalars import format_float, parse_bool, parse_float, parse_int
from extraconfig.schema import vic
from extraconfig.transport import (GuestSink, GuestSource, MapTransport, ScopeFilterSink,
                                   VmxFileTransport, format_vmx, parse_vmx, vmx_escape,
                                   vmx_unescape)
from extraconfig.types import IPNet
from helpers import require_module
from test_extraconfig_shapes import codec_path  # noqa: F401 - autouse: both paths
from test_extraconfig_shapes import Inner, KArr, KF32, Kinds, KStrOnly, KVersion, Build
from tether.config import Cmd, ExecutorConfig, MountSpec, SessionConfig

ARGS = "guestinfo.vice./sessions|a/cmd/Args"


def one_session(args):
    return ExecutorConfig(sessions={"a": SessionConfig(cmd=Cmd(path="/bin/sh", args=args))})


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("data, key", [
    ({"guestinfo.vice./sessions": "a", ARGS: "3", ARGS + "~": "x|y"}, ARGS + "~"),
    ({"guestinfo.vice./sessions": "a", ARGS: "-5"}, ARGS),
    ({"guestinfo.vice./sessions": "a", ARGS: "99999999999"}, ARGS),
    ({"guestinfo.vice./sessions": "a",
      "guestinfo.vice..sessions|a.diagnostics.exitlogs": "123456789"},
     "guestinfo.vice..sessions|a.diagnostics.exitlogs"),
    ({"guestinfo.vice./sessions": "|".join(["a"] * 70000)}, "guestinfo.vice./sessions"),
])
def test_malformed_lengths_raise_decode_error_naming_the_key(data, key):
    with pytest.raises(DecodeError) as e:
        decode(data, ExecutorConfig)
    assert key in str(e.value)


def test_reference_panics_become_decode_errors():
    with pytest.raises(DecodeError, match="guestinfo.vice./f"):
        decode({"guestinfo.vice./f": "1E+00"}, KF32)
    with pytest.raises(DecodeError, match="KF32"):
        decode({}, KF32)                     # missing: no panic, but nothing found
    with pytest.raises(DecodeError, match="guestinfo.vice./a"):
        decode({"guestinfo.vice./a": "2", "guestinfo.vice./a~": "1|2|3"}, KArr)
    with pytest.raises(DecodeError, match="KStrOnly"):
        decode({}, KStrOnly)                 # a class decode that finds nothing
    with pytest.raises(DecodeError):
        decode({"guestinfo.vice./common/id": 5}, ExecutorConfig)   # not a string


def test_encoding_float32_and_arrays_still_works():
    assert encode(KF32(f=0.1)) == {"guestinfo.vice./f": "1.0000000149011612E-01"}
    assert encode(KArr(a=[1, 2, 3])) == {"guestinfo.vice./a": "2", "guestinfo.vice./a~": "1|2|3"}


def test_bad_scalars_read_as_go_reads_them():
    data = {"guestinfo.vice./sessions": "a",
            "guestinfo.vice..sessions|a.status": "1.0",
            "guestinfo.vice./sessions|a/tty": "yes",
            "guestinfo.vice./sessions|a/diagnostics/debug": "+5"}
    s = decode(data, ExecutorConfig).sessions["a"]
    assert (s.exit_status, s.tty, s.diagnostics.debug_level) == (0, False, 5)


# ------------------------------------------------------------- the deviation

def test_pipe_in_an_argument_switches_to_indexed_form():
    enc = encode(one_session(["/bin/sh", "-c", "echo a|wc"]))
    assert ARGS + "~" not in enc
    assert [enc[f"{ARGS}|{i}"] for i in range(3)] == ["/bin/sh", "-c", "echo a|wc"]
    assert enc[ARGS] == "2"
    assert decode(enc, ExecutorConfig).sessions["a"].cmd.args == ["/bin/sh", "-c", "echo a|wc"]


def test_joined_form_still_decodes_as_the_reference_does():
    data = {"guestinfo.vice./sessions": "a", ARGS: "2", ARGS + "~": "/bin/sh|-c|echo a|wc"}
    assert decode(data, ExecutorConfig).sessions["a"].cmd.args == ["/bin/sh", "-c", "echo a"]


def test_args_without_pipe_keep_the_reference_form():
    enc = encode(one_session(["/bin/echo", "a b", ""]))
    assert enc[ARGS + "~"] == "/bin/echo|a b|" and enc[ARGS] == "2"


# ------------------------------------------------------------------ merges

def test_decode_into_an_instance_merges_in_place():
    cfg = ExecutorConfig(sessions={"a": SessionConfig(user="kept")},
                         mounts={"m": MountSpec(path="/old", mode="ro")})
    cfg.common.name = "old-name"
    session = cfg.sessions["a"]
    data = {"guestinfo.vice./sessions": "a", "guestinfo.vice./sessions|a/tty": "true",
            "guestinfo.vice./mounts": "m", "guestinfo.vice./mounts|m/mode": "rw",
            "guestinfo.vice./common/id": "new"}
    assert decode(data, cfg) is cfg
    assert cfg.sessions["a"] is session and session.tty and session.user == "kept"
    assert cfg.common.name == "old-name" and cfg.common.id == "new"
    assert cfg.mounts["m"].mode == "rw" and cfg.mounts["m"].path == ""   # value entry rebuilt


def test_pointer_fields_appear_only_when_found():
    assert decode({"guestinfo.vice./s": "x"}, Kinds).in_p is None
    k = decode({"guestinfo.vice./inp/a": "x", "guestinfo.vice./ipp": "7"}, Kinds)
    assert k.in_p == Inner(a="x") and k.ipp == 7
    v = decode({"guestinfo.vice./version/PluginVersion": "3"}, KVersion)
    assert v.version == Build(plugin_version=3)


def test_encode_with_prefix_and_depth_rules():
    kinds = Kinds(depth0=Inner(a="x"), depth1=Inner(a="y"), depth2=Inner(a="z"),
                  no_follow=Inner(a="n"), u=5, iface="ignored")
    enc = encode(kinds)
    assert not any(k.startswith(("guestinfo.vice./depth0", "guestinfo.vice./depth1",
                                 "guestinfo.vice./nofollow", "guestinfo.vice./u")) for k in enc)
    assert enc["guestinfo.vice./depth2/a"] == "z"
    assert "guestinfo.vice./iface" not in enc


# --------------------------------------------------------------------- keys

def test_calculate_keys():
    cfg = one_session(["x"])
    assert calculate_key(cfg, "Sessions.a.Started") == "guestinfo.vice..sessions|a.started"
    assert calculate_keys(cfg, "Sessions.*.Cmd.Path") == ["guestinfo.vice./sessions|a/cmd/Path"]
    assert calculate_key(cfg, "Key") == "guestinfo.vice./key"
    with pytest.raises(DecodeError, match="NoSuchField"):
        calculate_keys(cfg, "Sessions.a.NoSuchField")
    assert calculate_keys(cfg, "Sessions.a.Cmd.Args.0") == [ARGS + "~"]
    assert calculate_keys(cfg, "Sessions.a.Cmd.*") == [
        "guestinfo.vice./sessions|a/cmd/Path", ARGS, "guestinfo.vice./sessions|a/cmd/Env",
        "guestinfo.vice./sessions|a/cmd/Dir"]
    for bad in ("Sessions.b.Started", "Sessions.a.Cmd.Args.1", "Sessions.a.Cmd.Args.x",
                "Sessions.a.Cmd.Path.x", "Networks.n"):
        with pytest.raises(DecodeError):
            calculate_keys(cfg, bad)


def test_tag_oddities_follow_go():
    from extraconfig.keys import HIDDEN, INVALID, READ_ONLY, scope_flags
    assert scope_flags("") == scope_flags(",") == HIDDEN | READ_ONLY
    assert scope_flags("read-only,") == INVALID and scope_flags("read-only, hidden") == INVALID


prefixes = st.one_of(st.just(""), st.text(alphabet="ab./|@~g", max_size=12),
                     st.sampled_from(["guestinfo.vice./a", "guestinfo.vice..a.b",
                                      "guestinfo.vice./m|x.y/z", "root/a", "guestinfo.x"]))


@settings(max_examples=300, deadline=None)
@given(prefixes, st.sampled_from([Kinds, ExecutorConfig, SessionConfig, IPNet, Inner]))
def test_struct_keys_equal_the_general_join(prefix, cls):
    fields = struct_node(cls).fields
    assert _struct_keys(prefix, fields) == [_field_key(prefix, fp) for fp in fields]


def test_join_key_examples():
    assert K.join_key("", K.READ_WRITE, "a") == "guestinfo.vice..a"
    assert K.join_key("guestinfo.vice./p|a.b", K.READ_ONLY, "x") == "guestinfo.vice./p|a/b/x"
    assert K.join_key("guestinfo.vice..mrw|r", K.HIDDEN, "h") == "mrw|r/h"
    assert K.join_key("root", K.READ_ONLY, "a") == "guestinfo.vice./root/a"
    assert K.join_key("", K.HIDDEN | K.NON_PERSISTENT, "x") is None
    assert K.join_key("", K.READ_ONLY | K.SECRET | K.NON_PERSISTENT, "s") == \
        "guestinfo.vice./s@secret@non-persistent"
    assert K.insert_prefix("guestinfo.vice..createtime", "init") == "guestinfo.vice..init.createtime"


# ------------------------------------------------------------------ scalars

def test_scalar_texts():
    assert [format_float(x) for x in (3.14, 0.25, 1e21, -0.0, 5e-324, float("inf"))] == \
        ["3.14E+00", "2.5E-01", "1E+21", "-0E+00", "5E-324", "+Inf"]
    assert parse_float("1e3") == 1000.0 and parse_float("1e999") == 0.0 and parse_float("x") == 0.0
    assert parse_int("+5") == 5 and parse_int(" 5") == 0 and parse_int("9" * 30) == 0
    assert parse_int("\u0663") == 0          # only ASCII digits, as Go
    assert [parse_bool(t) for t in ("1", "t", "True", "yes", "")] == [True, True, True, False, False]


def test_go_time_texts():
    t = parse_go("2017-03-01 10:00:01.123456789 -0800 PST")
    assert t == GoTime(1488391201, 123456789, -28800, "PST")
    assert format_go(t) == "2017-03-01 10:00:01.123456789 -0800 PST"
    assert format_go(GoTime()) == "0001-01-01 00:00:00 +0000 UTC"
    assert parse_go("2017-03-01T10:00:00Z") is None
    assert parse_go("2017-03-01 10:00:00 +0000 UTC m=+0.1") is None
    assert parse_go("2017-02-29 10:00:00 +0000 UTC") is None
    assert parse_go("2017-03-01 10:00:02.5 +0100 +0100") == GoTime(1488358802, 500000000, 3600, "")
    assert GoTime.from_rfc3339("2017-06-01T00:00:00+02:00", zone="CEST").format() == \
        "2017-06-01 00:00:00 +0200 CEST"


# --------------------------------------------------------------- transports

def test_guest_source_read_rules():
    t = MapTransport({"guestinfo.vice./common/id": "abc", "guestinfo.vice./common/name": "<nil>",
                      "guestinfo.vice./layerid": "", "guestinfo.common/notes": "seen"})
    src = GuestSource(t)
    assert src["guestinfo.vice./common/id"] == "abc"
    assert src["guestinfo.vice./common/name"] == ""
    assert "guestinfo.vice./layerid" not in src
    assert src.get("common/notes") == "seen"
    with pytest.raises(TypeError):
        list(src)


def test_guest_sink_write_rules():
    t = MapTransport()
    sink = GuestSink(t)
    sink("guestinfo.vice./common/id", "x")
    sink("guestinfo.vice..sessions|a.started", "")
    sink("annotations|k", "v")
    sink("guestinfo.vice..l|c/d~", "dropped")
    assert t.data == {"guestinfo.vice..sessions|a.started": "<nil>", "guestinfo.annotations|k": "v"}
    t2 = MapTransport()
    GuestSink(t2, prefix="init")("guestinfo.vice..createtime", "1")
    assert t2.data == {"guestinfo.vice..init.createtime": "1"}


def test_scope_filter_sink():
    out: dict = {}
    sink = ScopeFilterSink(K.NON_PERSISTENT | K.HIDDEN, out.__setitem__)
    for key in ("guestinfo.vice./a", "guestinfo.vice./b@non-persistent", "notes", "x/y"):
        sink(key, "v")
    assert sorted(out) == ["guestinfo.vice./b@non-persistent", "notes", "x/y"]


def test_vmx_escapes():
    assert vmx_escape('a|b"c\n#') == "a|7Cb|22c|0A#"
    assert format_vmx({"guestinfo.vice./sessions|c1/x y=|20": "v"}) == \
        'guestinfo.vice./sessions|c1/x|20y|3D|7C20 = "v"\n'
    assert parse_vmx('guestinfo.vice./sessions|c1/cmd/Path = "/bin/sh"') == \
        {"guestinfo.vice./sessions|c1/cmd/Path": "/bin/sh"}
    assert vmx_unescape("|E2|98|83 x|7C") == "☃ x|"
    entries = {"guestinfo.vice./sessions|a b/cmd/Args~": 'sh|-c|echo "hi"\n', "k": ""}
    assert parse_vmx(format_vmx(entries)) == entries
    assert parse_vmx('# comment\n\nkey = "v"\r\n') == {"key": "v"}
    with pytest.raises(ValueError, match="line 1"):
        parse_vmx("key value")


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=' \t="ab|\r#', max_size=12))
def test_a_vmx_line_splits_as_its_pattern_reads_it(line):
    """parse_vmx reads a line without re; what it takes is this pattern's match."""
    import re
    from extraconfig.transport import _split_line
    m = re.fullmatch(r'[ \t]*([^ \t="]+)[ \t]*=[ \t]*"(.*)"[ \t]*', line)
    assert _split_line(line) == (m.groups() if m else None)


def test_vmx_file_transport(tmp_path):
    path = tmp_path / "guest.vmx"
    path.write_text('guestinfo.vice./common/id = "abc"\nguestinfo.vice..createtime = "<nil>"\n')
    t = VmxFileTransport(path)
    cfg = decode(GuestSource(t), ExecutorConfig)
    assert cfg.common.id == "abc" and cfg.create_time == 0
    sink = GuestSink(t)
    sink("guestinfo.vice..sessions|a.started", "true")
    sink("guestinfo.vice..sessions|a.status", "")
    again = parse_vmx(path.read_text())
    assert again["guestinfo.vice..sessions|a.started"] == "true"
    assert again["guestinfo.vice..sessions|a.status"] == "<nil>"
    assert again["guestinfo.vice./common/id"] == "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["guest.vmx"]     # no temp files left
    # a writer elsewhere (the host) is seen on the next read
    path.write_text(path.read_text() + 'guestinfo.vice./repo = "r|7Cx"\n')
    os.utime(path, ns=(1, 1))
    assert t.info_get("guestinfo.vice./repo") == "r|x"


def test_vmx_file_writes_are_atomic_under_concurrent_readers(tmp_path):
    path = tmp_path / "g.vmx"
    t = VmxFileTransport(path)
    t.info_set("guestinfo.a", "0")
    errors = []

    def reader():
        for _ in range(200):
            try:
                data = parse_vmx(path.read_text())
                assert "guestinfo.a" in data
            except Exception as e:            # noqa: BLE001 - collected and asserted below
                errors.append(e)
    th = threading.Thread(target=reader)
    th.start()
    for i in range(200):
        t.info_set(f"guestinfo.k{i % 7}", "x" * i)
    th.join(timeout=120)
    assert not errors


# ------------------------------------------------------------------ secrets

def test_secret_scope_through_the_guest_source():
    require_module("nacl")
    from extraconfig.secret import SecretKey
    from test_extraconfig_shapes import SecretOnly
    key = SecretKey()
    host: dict = {}
    encode_into(key.sink(host.__setitem__), SecretOnly(token="tok", key=b"k"))
    assert host["guestinfo.ovfEnv"] == base64.b64encode(key.key).decode()
    assert "tok" not in host["guestinfo.vice./token@secret"]
    back = decode(GuestSource(MapTransport(host)), SecretOnly)
    assert (back.token, back.key) == ("tok", b"k")
    # a wrong key: the value fails authentication and reads as missing
    host["guestinfo.ovfEnv"] = base64.b64encode(bytes(32)).decode()
    with pytest.raises(DecodeError):
        decode(GuestSource(MapTransport(host)), SecretOnly)        # nothing found at all
    host["guestinfo.vice./token@secret"] = base64.b64encode(b"short").decode()
    with pytest.raises(DecodeError, match="token@secret"):
        decode(GuestSource(MapTransport(host)), SecretOnly)


def test_nacl_is_not_imported_without_secrets():
    import subprocess
    import sys
    code = ("import sys, extraconfig, tether.config as c; from extraconfig.transport import *;"
            "extraconfig.decode(GuestSource(MapTransport({'guestinfo.vice./common/id': 'x'})),"
            " c.ExecutorConfig); print('nacl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr


def test_slice_merge_follows_go_reuse_rules():
    from tether.config import Diagnostics, ExitLog
    old = [ExitLog(message="a", exit_status=1), ExitLog(message="b", exit_status=2)]
    cfg = ExecutorConfig(diagnostics=Diagnostics(exit_logs=list(old)))
    first = cfg.diagnostics.exit_logs[0]
    decode({"guestinfo.vice..diagnostics.exitlogs": "0",
            "guestinfo.vice..diagnostics.exitlogs|0.Message": "new"}, cfg)
    # shorter: the existing elements are merged in place
    assert cfg.diagnostics.exit_logs == [ExitLog(message="new", exit_status=1)]
    assert cfg.diagnostics.exit_logs[0] is first
    decode({"guestinfo.vice..diagnostics.exitlogs": "2",
            "guestinfo.vice..diagnostics.exitlogs|2.Message": "c"}, cfg)
    # longer than before: a new slice from zero values
    assert cfg.diagnostics.exit_logs == [ExitLog(), ExitLog(), ExitLog(message="c")]
    # a primitive slice whose joined values are missing keeps what fits of the old one
    s = SessionConfig(cmd=Cmd(args=["x", "y", "z"]))
    decode({"guestinfo.vice./cmd/Args": "1"}, s)
    assert s.cmd.args == ["x", "y"]
    decode({}, s)
    assert s.cmd.args == []


# What the agent's boot does with the codec, run as the image runs it (python -S): decode
# a one-session config from guestinfo. It prints the modules of `NOT_AT_BOOT` it loaded.
BOOT_DECODE = """if True:
    import sys
    from extraconfig.codec import encode
    from extraconfig.transport import GuestSource, MapTransport
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    from tether.extension import decode_config, encode_config
    s = SessionConfig(common=Common(id="a"), cmd=Cmd(path="/x", args=["/x"]))
    keys = encode_config(ExecutorConfig(common=Common(id="a"), sessions={"a": s}))
    config = decode_config(GuestSource(MapTransport(keys)))
    assert config.sessions["a"].cmd.args == ["/x"], config
    print(sorted(m for m in sys.argv[1:] if m in sys.modules))
"""
NOT_AT_BOOT = ["binascii"]     # base64: loaded at the first []byte value


def test_the_boot_decode_loads_only_what_the_config_uses():
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-S", "-c", BOOT_DECODE, *NOT_AT_BOOT],
                          capture_output=True, text=True, timeout=120, cwd=repo,
                          env=dict(os.environ, PYTHONPATH=repo))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]


# A struct's plan is compiled when a decode or encode first meets it.
@record
class _Unmet:
    name: str = vic("Name", "read-only", "name", default="")


@record
class _Faulty:
    broken: NoSuchType = vic("Broken", "read-only", "broken", default=None)  # noqa: F821


@record
class _Holder:
    id: str = vic("ID", "read-only", "id", default="")
    unmet: dict[str, _Unmet] | None = vic("Unmet", "read-only", "unmet", default=None)
    faulty: dict[str, _Faulty] | None = vic("Faulty", "read-only", "faulty", default=None)


def test_a_struct_plan_is_compiled_when_first_met(codec_path):
    from extraconfig import codec
    if codec_path == "interpreted":       # (generated code compiles every plan it reaches)
        struct_node(_Holder).fields                   # the holder's own fields, not theirs
        assert "fields" not in vars(struct_node(_Unmet))
        assert decode({"guestinfo.vice./id": "x"}, _Holder).id == "x"
        assert "fields" not in vars(struct_node(_Unmet))
        held = decode({"guestinfo.vice./id": "x", "guestinfo.vice./unmet": "a",
                       "guestinfo.vice./unmet|a/name": "n"}, _Holder)
        assert held.unmet["a"].name == "n" and "fields" in vars(struct_node(_Unmet))
    # a model's fault is not reported as malformed data, whenever its plan is compiled
    with pytest.raises(codec.PlanError, match="_Faulty: .*NoSuchType"):
        decode({"guestinfo.vice./id": "x", "guestinfo.vice./faulty": "a"}, _Holder)
