"""Hypothesis properties: decode never fails other than with DecodeError; configs round-trip."""
from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extraconfig import DecodeError, decode, encode
from extraconfig.gotime import GoTime, format_go, parse_go
from extraconfig.scalars import format_float, parse_float
from extraconfig.transport import (GuestSink, GuestSource, MapTransport, format_vmx, parse_vmx)
from extraconfig.types import IP, IPNet
from test_extraconfig_shapes import codec_path  # noqa: F401 - autouse: both paths
from test_extraconfig_shapes import Inner, Kinds, KMapDots, KTimes, Mini
from tether.config import (Cmd, ContainerNetwork, Diagnostics, ExecutorConfig, ExitLog,
                           MountSpec, NetworkEndpoint, Range, SessionConfig)
from extraconfig.types import URL

CONFIG_SETTINGS = settings(max_examples=40, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ generators

tricky_text = st.text(
    alphabet=st.sampled_from(list("ab |=~@./\\\"'#\n\t\r:") + ["é", "☃", "日", "\x00", "\x7f"]),
    max_size=12)
any_text = st.one_of(tricky_text, st.text(max_size=20))
ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,11}", fullmatch=True)
int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
small_lists = lambda elems: st.lists(elems, max_size=5)  # noqa: E731

zones = st.sampled_from([("UTC", 0), ("PST", -28800), ("CEST", 7200), ("", 19800),
                         ("", -34200), ("GMT", 0), ("ChST", 36000)])


@st.composite
def go_times(draw):
    name, offset = draw(zones)
    unix = draw(st.integers(min_value=-62135596800, max_value=253402300799 - 86400))
    return GoTime(unix, draw(st.integers(0, 999_999_999)), offset, name)


ipv4 = st.binary(min_size=4, max_size=4).map(IP)
ipv6 = st.binary(min_size=16, max_size=16).map(IP)
ips = st.one_of(ipv4, ipv6)
ipnets = st.builds(lambda ip, bits: IPNet(ip, IPNet.parse(f"0.0.0.0/{bits}").mask), ipv4,
                   st.integers(0, 32))


@st.composite
def sessions(draw, sid):
    s = SessionConfig(
        cmd=Cmd(path=draw(any_text), args=draw(small_lists(any_text)),
                env=draw(small_lists(any_text)), dir=draw(any_text)),
        attach=draw(st.booleans()), tty=draw(st.booleans()), restart=draw(st.booleans()),
        exit_status=draw(int64), started=draw(any_text), stop_signal=draw(any_text),
        user=draw(any_text), group=draw(any_text),
        diagnostics=Diagnostics(debug_level=draw(int64), resurrection_count=draw(int64),
                                exit_logs=draw(small_lists(st.builds(
                                    ExitLog, time=go_times(), exit_status=int64,
                                    message=any_text)))))
    s.common.id = sid
    s.common.name = draw(any_text)
    s.detail.start_time = draw(int64)
    return s


@st.composite
def endpoints(draw):
    ep = NetworkEndpoint(static=draw(st.booleans()), ip=draw(st.none() | ipnets),
                         assigned=draw(ipnets), ports=draw(small_lists(any_text)))
    ep.common.id = draw(ids)
    ep.network = ContainerNetwork(
        type=draw(any_text), destinations=draw(small_lists(ipnets)), gateway=draw(ipnets),
        default=draw(st.booleans()), nameservers=draw(small_lists(ips)),
        pools=draw(small_lists(st.builds(Range, first_ip=ips, last_ip=ips))),
        aliases=draw(small_lists(any_text)))
    ep.network.assigned.nameservers = draw(small_lists(ips))
    return ep


@st.composite
def configs(draw):
    cfg = ExecutorConfig()
    cfg.common.id = draw(ids)
    cfg.common.name = draw(any_text)
    cfg.create_time = draw(int64)
    sids = draw(st.lists(ids, max_size=3, unique=True))
    cfg.sessions = {sid: draw(sessions(sid)) for sid in sids} or None
    names = draw(st.lists(ids, max_size=2, unique=True))
    cfg.networks = {n: draw(endpoints()) for n in names} or None
    mounts = draw(st.lists(ids, max_size=2, unique=True))
    cfg.mounts = {m: MountSpec(source=URL(scheme=draw(ids), host=draw(any_text),
                                          path=draw(any_text), raw_query=draw(any_text)),
                               path=draw(any_text), mode=draw(any_text)) for m in mounts} or None
    cfg.key = draw(st.none() | st.binary(min_size=1, max_size=40))
    cfg.annotations = draw(st.dictionaries(ids, any_text, max_size=3)) or None
    cfg.layer_id = draw(any_text)
    cfg.repo_name = draw(any_text)
    return cfg


def nil_to_empty(value):
    """What decode does to nil slices and maps, so configs can be compared."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.name in _SLICE_OR_MAP.get(type(value), ()):
                setattr(value, f.name, [] if f.name not in _MAPS else {})
            else:
                nil_to_empty(v)
    elif isinstance(value, list):
        for v in value:
            nil_to_empty(v)
    elif isinstance(value, dict):
        for v in value.values():
            nil_to_empty(v)
    return value


_MAPS = {"sessions", "mounts", "networks", "annotations"}
_SLICE_OR_MAP = {
    ExecutorConfig: {"sessions", "mounts", "networks", "annotations"},
    Diagnostics: {"exit_logs"}, Cmd: {"args", "env"},
    NetworkEndpoint: {"ports"},
    ContainerNetwork: {"destinations", "nameservers", "pools", "aliases"},
}


# ------------------------------------------------------------------ properties

@CONFIG_SETTINGS
@given(configs())
def test_configs_round_trip(cfg):
    encoded = encode(cfg)
    back = decode(encoded, ExecutorConfig)
    assert back == nil_to_empty(cfg)
    assert encode(back) == encoded


@CONFIG_SETTINGS
@given(configs())
def test_configs_round_trip_through_vmx_text(cfg):
    encoded = encode(cfg)
    assert parse_vmx(format_vmx(encoded)) == encoded


@SETTINGS
@given(st.lists(any_text, min_size=1, max_size=6))
def test_arguments_with_any_characters_round_trip(args):
    cfg = ExecutorConfig(sessions={"s": SessionConfig(cmd=Cmd(path="/bin/x", args=args))})
    encoded = encode(cfg)
    assert decode(encoded, ExecutorConfig).sessions["s"].cmd.args == args
    if not any("|" in a for a in args):
        # the reference's joined form, byte for byte
        assert encoded["guestinfo.vice./sessions|s/cmd/Args~"] == "|".join(args)
    else:
        assert "guestinfo.vice./sessions|s/cmd/Args~" not in encoded
        assert encoded["guestinfo.vice./sessions|s/cmd/Args|0"] == args[0]


def _sample_keys() -> list[str]:
    keys: set[str] = set()
    cfg = ExecutorConfig(sessions={"a": SessionConfig(cmd=Cmd(args=["x"], env=["y"]),
                                                      diagnostics=Diagnostics(exit_logs=[ExitLog()]))},
                         mounts={"m": MountSpec()},
                         networks={"n": NetworkEndpoint(ip=IPNet.parse("10.0.0.1/8"), ports=["p"],
                                                        network=ContainerNetwork(
                                                            destinations=[IPNet()], nameservers=[IP(b"1234")],
                                                            pools=[Range()], aliases=["q"]))},
                         key=b"k", annotations={"k": "v"})
    for obj in (cfg, Kinds(ints=[1], strs=["a"], ips=[IP(b"1234")], mis={1: "a"}, msl={"a": ["b"]},
                           msp={"a": None}, mrw={"a": Inner()}, tp=GoTime(), sp="", ipp=1),
                Mini(tags=["a"], ports={1: "a"}), KMapDots(m={"a": "b"}, l={"a": ["x"]}),
                KTimes(times=[GoTime()])):
        keys.update(encode(obj))
    extra = set()
    for k in keys:
        for suffix in ("|0", "|1", "|2", "~", "|a", "|b", "|"):
            extra.add(k + suffix)
    return sorted(keys | extra)


SAMPLE_KEYS = _sample_keys()
nasty_values = st.one_of(
    st.sampled_from(["", "0", "1", "-1", "-2", "2", "99999999999", "65536", "1e3", "+5", " 1",
                     "true", "T", "<nil>", "|", "a|b", "||", "a|", "CgAAAg==", "===", "a",
                     "2017-03-01 10:00:00 +0000 UTC", "2017-02-30 10:00:00 +0000 UTC",
                     "2017-03-01 10:00:00 +0100 +0100", "NaN", "-Inf", "1.5", "\u0663",
                     "१२", "9" * 40, "0x10", "1_000"]),
    st.text(max_size=30))


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.dictionaries(st.one_of(st.sampled_from(SAMPLE_KEYS), st.text(max_size=10)),
                       nasty_values, max_size=25),
       st.sampled_from([ExecutorConfig, Kinds, Mini, KMapDots, KTimes]))
def test_decode_of_arbitrary_maps_raises_only_decode_error(data, cls):
    try:
        decode(data, cls)
    except DecodeError:
        pass
    try:
        decode(GuestSource(MapTransport(dict(data))), cls)
    except DecodeError:
        pass


@SETTINGS
@given(go_times())
def test_time_text_round_trips(t):
    assert parse_go(format_go(t)) == t


@SETTINGS
@given(st.floats(allow_nan=False))
def test_float_text_round_trips(x):
    text = format_float(x)
    assert "E" in text or text in ("+Inf", "-Inf")
    assert parse_float(text) == x


@SETTINGS
@given(st.dictionaries(st.text(alphabet="abc./|", min_size=1, max_size=8), any_text, max_size=8))
def test_guest_sink_then_source(pairs):
    transport = MapTransport()
    sink = GuestSink(transport)
    for k, v in pairs.items():
        sink("guestinfo.vice.." + k, v)
    source = GuestSource(transport)
    for k, v in pairs.items():
        key = "guestinfo.vice.." + k
        if "/" in key:
            assert key not in transport.data
        else:
            assert "" not in transport.data.values()
            # `<nil>` is how the guest format writes "": that one value reads back empty
            assert source[key] == ("" if v == "<nil>" else v)


@SETTINGS
@given(st.dictionaries(st.one_of(st.text(min_size=1, max_size=15),
                                 st.text(alphabet="|0123456789abcdefABCDEF =#\"", min_size=1)),
                       st.one_of(st.text(max_size=20), tricky_text), max_size=8))
def test_any_keys_and_values_round_trip_through_vmx_lines(entries):
    text = format_vmx(entries)
    assert text.count("\n") == len(entries)
    assert parse_vmx(text) == entries
