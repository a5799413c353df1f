"""IPNet owns its text forms: the JSON form, the network code and str() agree."""
from __future__ import annotations

from extraconfig.types import IP, IPMask, IPNet
from tether.config import Common, ExecutorConfig, NetworkEndpoint
from tether.jsonform import config_from_json, config_to_json
from tether.network import _cidr

# Go keeps an IPv4 address in 16 bytes (::ffff:a.b.c.d) with a 16-byte mask after
# net.ParseCIDR of a v4-in-v6 text, and VIC writes such values back.
V4_IN_16 = IPNet(IP.parse("10.0.0.2", v4_in_16=True), IPMask(b"\xff" * 15 + b"\x00"))


def test_v4_in_16_bytes_prints_an_ipv4_prefix_everywhere():
    assert str(V4_IN_16) == "10.0.0.2/24"          # was /120, as the mask's bit count
    assert V4_IN_16.prefixlen() == 24
    assert str(V4_IN_16.interface()) == "10.0.0.2/24"
    assert _cidr(V4_IN_16) == "10.0.0.2/24"
    config = ExecutorConfig(networks={"n": NetworkEndpoint(common=Common(id="eth0"),
                                                           assigned=V4_IN_16)})
    assert config_to_json(config)["networks"]["n"]["assigned"] == "10.0.0.2/24"


def test_text_forms_round_trip():
    for text in ("10.0.0.2/24", "fd00::5/64", "192.168.1.1/32"):
        assert str(IPNet.parse(text)) == text
        assert _cidr(IPNet.parse(text)) == text
    bare = IPNet.parse("10.0.0.9")                  # a bare address gets the full mask
    assert (str(bare), bare.prefixlen()) == ("10.0.0.9/32", 32)
    maskless = IPNet(IP.parse("10.0.0.9"), IPMask(b""))
    assert str(maskless) == "10.0.0.9" and _cidr(maskless) == "10.0.0.9/32"
    assert str(IPNet()) == "" and _cidr(IPNet()) is None and IPNet().interface() is None
    loaded = config_from_json({"networks": {"n": {"common": {"id": "eth0"},
                                                  "ip": "10.1.2.3/16"}}})
    assert str(loaded.networks["n"].ip) == "10.1.2.3/16"
