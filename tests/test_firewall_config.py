"""The firewall's config: TrustLevel on the wire (tests/data/extraconfig-trustlevel.jsonl),
its JSON form, and port specs parsed with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from extraconfig import decode, encode, encode_into
from extraconfig.transport import GuestSink, MapTransport
from tether.config import ContainerNetwork, ExecutorConfig, NetworkEndpoint
from tether.jsonform import ConfigError, config_from_json, config_to_json
from tether.network.ports import PortSpec, PortSpecError, TrustLevel, parse_port
from test_extraconfig_shapes import from_raw, normalise, to_raw
from test_extraconfig_vectors import RecordingSource

DATA = Path(__file__).resolve().parent / "data" / "extraconfig-trustlevel.jsonl"
VECTORS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def by_kind(kind):
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] == kind]


# -- the wire ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vec", by_kind("encode"))
def test_trust_level_encode_vector(vec):
    value = from_raw(ExecutorConfig, vec["value_raw"])
    assert encode(value) == vec["encoded"]
    sent = MapTransport()
    encode_into(GuestSink(sent), value)
    assert sent.data == vec["guest_info_set"]
    back = decode(vec["encoded"], ExecutorConfig)
    assert normalise(to_raw(ExecutorConfig, back)) == normalise(vec["roundtrip_raw"])


@pytest.mark.parametrize("vec", by_kind("decode"))
def test_trust_level_decode_vector(vec):
    source = RecordingSource(vec["encoded"])
    result = decode(source, ExecutorConfig)
    assert normalise(to_raw(ExecutorConfig, result)) == normalise(vec["decoded_raw"])
    assert source.lookups == vec["lookups"]
    assert result.networks["n"].network.trust is TrustLevel.OUTBOUND


def test_trust_level_names_and_unknown_values():
    # the reference's String()/ParseTrustLevel: "" is unspecified, names case-insensitive
    assert [level.text for level in TrustLevel] == ["", "published", "open", "closed",
                                                    "outbound", "peers"]
    assert TrustLevel.parse("PEERS") is TrustLevel.PEERS
    assert TrustLevel.parse("") is TrustLevel.UNSPECIFIED
    with pytest.raises(ValueError, match="unknown trust level 'public'"):
        TrustLevel.parse("public")
    # an unknown number gets the published rules, as the reference's default case
    assert ContainerNetwork(trust_level=42).trust is TrustLevel.PUBLISHED
    assert ContainerNetwork().trust.effective() is TrustLevel.PUBLISHED


# -- JSON form ---------------------------------------------------------------------------------
def test_json_form_writes_trust_level_by_name():
    cfg = config_from_json({"networks": {"web": {
        "network": {"trust_level": "Outbound"}, "ports": ["8080/tcp", "9000:80/tcp"]}}})
    assert cfg.networks["web"].network.trust_level == 4
    assert config_to_json(cfg)["networks"]["web"] == {
        "network": {"trust_level": "outbound"}, "ports": ["8080/tcp", "9000:80/tcp"]}
    with pytest.raises(ConfigError, match=r"networks\.web\.network\.trust_level: unknown trust "
                                          r"level 'bogus' \(use one of: published, open"):
        config_from_json({"networks": {"web": {"network": {"trust_level": "bogus"}}}})


# -- port specs --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,parsed", [
    ("80/tcp", PortSpec("tcp", 80, 80, None, "80/tcp")),
    ("53/UDP", PortSpec("udp", 53, 53, None, "53/UDP")),
    ("8080", PortSpec("tcp", 8080, 8080, None, "8080")),
    ("5000-5010/udp", PortSpec("udp", 5000, 5010, None, "5000-5010/udp")),
    ("9000:80/tcp", PortSpec("tcp", 80, 80, 9000, "9000:80/tcp")),
    ("80:80/tcp", PortSpec("tcp", 80, 80, None, "80:80/tcp")),
    ("7000-7002:7000-7002/tcp", PortSpec("tcp", 7000, 7002, None, "7000-7002:7000-7002/tcp")),
])
def test_port_specs(spec, parsed):
    assert parse_port(spec) == parsed
    assert parse_port(str(parsed)) == PortSpec(parsed.proto, parsed.first, parsed.last,
                                               parsed.host, str(parsed))


@pytest.mark.parametrize("spec,message", [
    ("80/tcpx", "unknown protocol 'tcpx' (use tcp or udp)"),
    ("70000/tcp", "port 70000 is out of range (1-65535)"),
    ("0/tcp", "port 0 is out of range"),
    ("9-3/udp", "the range 9-3 runs backwards"),
    ("http/tcp", "'http' is not a port number"),
    ("", "empty"),
    ("1.2.3.4:80:80/tcp", "a host address cannot be given here"),
    ("9000-9001:80-81/tcp", "a redirect maps one port to one port, not a range"),
    ("-80/tcp", "'' is not a port number"),
])
def test_bad_port_specs_say_what_is_wrong(spec, message):
    with pytest.raises(PortSpecError) as err:
        parse_port(spec)
    assert message in str(err.value)
    assert repr(spec) in str(err.value)


def test_endpoint_port_specs_name_the_endpoint():
    endpoint = NetworkEndpoint(ports=["80/tcp", "80/tcpx"])
    with pytest.raises(PortSpecError, match=r"^network web: port spec '80/tcpx': unknown"):
        endpoint.port_specs("network web")
    assert NetworkEndpoint(ports=None).port_specs() == []


# -- tether ports ------------------------------------------------------------------------------
def test_tether_ports_lists_published_ports_from_json_and_guestinfo(tmp_path, capsys):
    from extraconfig import encode
    from extraconfig.transport import format_vmx
    from extraconfig.types import IPNet
    from tether.cli import main
    config = {"networks": {
        "public": {"ports": ["8080/tcp", "9000:80/tcp", "5000-5010/udp"]},
        "back": {"network": {"trust_level": "closed"}, "ports": ["22/tcp"]},
        "quiet": {}}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert main(["ports", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "back    -  closed     22/tcp",
        "public  -  published  8080/tcp",
        "public  -  published  9000/tcp -> 80/tcp",
        "public  -  published  5000-5010/udp",
    ]
    # the guestinfo a run leaves (VMX lines) adds the assigned address
    cfg = config_from_json(config)
    cfg.networks["public"].assigned = IPNet.parse("10.78.0.2/24")
    vmx = tmp_path / "out.vmx"
    vmx.write_text(format_vmx(encode(cfg)))
    assert main(["ports", str(vmx), "public"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == \
        "public  10.78.0.2  published  9000/tcp -> 80/tcp"


def test_tether_ports_reports_a_bad_spec_and_an_unknown_endpoint(tmp_path, capsys):
    from tether.cli import main
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"networks": {"public": {"ports": ["9-3/udp"]}}}))
    assert main(["ports", str(path)]) == 1
    assert capsys.readouterr().err.strip() == \
        "tether ports: network public: port spec '9-3/udp': the range 9-3 runs backwards"
    assert main(["ports", str(path), "nope"]) == 1
    assert "no network endpoint 'nope' (have: public)" in capsys.readouterr().err
