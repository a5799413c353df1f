"""The JSON form of ExecutorConfig and the `tether config` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from extraconfig import decode, encode
from extraconfig.types import IP, IPNet
from tether.config import ExecutorConfig
from tether.jsonform import (ConfigError, config_from_json, config_to_json, load_config,
                             url_from_text, url_to_text)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.json"))


def tether(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether", *args], input=stdin, cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_hello_example_shape():
    cfg = load_config(str(REPO / "examples" / "hello.json"))
    assert cfg.common.id == "hello"
    session = cfg.sessions["hello"]
    assert session.common.id == "hello"          # filled from the key
    assert session.cmd.path == "/bin/echo"
    assert session.cmd.args == ["/bin/echo", "hello"]
    assert session.cmd.env == ["PATH=/usr/bin:/bin"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_round_trip_through_guestinfo(path):
    original = json.loads(path.read_text())
    cfg = config_from_json(original)
    assert config_to_json(cfg) == original
    assert config_to_json(decode(encode(cfg), ExecutorConfig)) == original


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_cli_encode_decode_round_trip(path):
    encoded = tether("config", "encode", str(path))
    assert encoded.returncode == 0, encoded.stderr
    assert 'guestinfo.vice./common/id = "' in encoded.stdout
    assert 'common/notes = "<nil>"' in encoded.stdout          # vSphere's empty value
    decoded = tether("config", "decode", "-", stdin=encoded.stdout)
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout) == json.loads(path.read_text())


def test_cli_decode_file_and_escapes(tmp_path):
    cfg = {"common": {"id": "x"}, "sessions": {"x": {"cmd": {
        "path": "/bin/sh", "args": ["/bin/sh", "-c", 'echo "a|b" # not a comment\n\tdone']}}}}
    src = tmp_path / "x.json"
    src.write_text(json.dumps(cfg))
    encoded = tether("config", "encode", str(src))
    assert encoded.returncode == 0, encoded.stderr
    for line in encoded.stdout.splitlines():
        assert line.count('"') == 2 and "\n" not in line and "\t" not in line
    vmx = tmp_path / "x.vmx"
    vmx.write_text(encoded.stdout)
    decoded = tether("config", "decode", str(vmx))
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout) == cfg


def test_cli_output_serves_as_a_guest_vmx_file(tmp_path):
    from extraconfig.transport import GuestSource, VmxFileTransport
    vmx = tmp_path / "guest.vmx"
    r = tether("config", "encode", str(REPO / "examples" / "hello.json"))
    vmx.write_text(r.stdout)
    cfg = decode(GuestSource(VmxFileTransport(vmx)), ExecutorConfig)
    assert cfg.sessions["hello"].cmd.args == ["/bin/echo", "hello"]
    assert cfg.sessions["hello"].started == ""


def test_cli_decode_reads_a_json_map_of_keys(tmp_path):
    """A JSON object of guestinfo keys (what a script or an older `tether vm --out` keeps)
    decodes like VMX lines; the format is told by the content, not the file name."""
    cfg = config_from_json({"common": {"id": "x"}, "sessions": {"x": {"cmd": {
        "path": "/bin/true", "args": ["/bin/true"]}}}})
    cfg.sessions["x"].started = "true"
    keys = {k: (v if v != "" else "<nil>") for k, v in encode(cfg).items()}
    src = tmp_path / "final.vmx"            # the name says VMX; the content is JSON
    src.write_text(json.dumps(keys, indent=1))
    decoded = tether("config", "decode", str(src))
    assert decoded.returncode == 0, decoded.stderr
    out = json.loads(decoded.stdout)
    assert out["sessions"]["x"]["started"] == "true"
    assert out == config_to_json(decode(encode(cfg), ExecutorConfig))
    bad = tether("config", "decode", "-", stdin='{"guestinfo.vice./common/id": 5}')
    assert bad.returncode == 1
    assert "JSON map" in bad.stderr and "guestinfo.vice./common/id" in bad.stderr


def test_cli_errors_are_actionable(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"sessions": {"a": {"cmd": {"argv": []}}}}')
    r = tether("config", "encode", str(bad))
    assert r.returncode == 1
    assert "sessions.a.cmd.argv: unknown field" in r.stderr and str(bad) in r.stderr
    r = tether("config", "decode", "-", stdin="not a vmx line\n")
    assert r.returncode == 1 and "line 1" in r.stderr
    r = tether("config", "encode", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "No such file" in r.stderr
    r = tether("config")
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("doc, where", [
    ({"sessions": {"a": {"bogus": 1}}}, "sessions.a.bogus"),
    ({"networks": {"n": {"ip": "10.0.0.300/24"}}}, "networks.n.ip"),
    ({"networks": {"n": {"network": {"nameservers": ["8.8.8.8", 5]}}}}, "networks.n.network.nameservers[1]"),
    ({"create_time": "now"}, "create_time"),
    ({"sessions": {"a": {"tty": 1}}}, "sessions.a.tty"),
    ({"key": "***"}, "key"),
    ({"sessions": {"a|b": {}}}, "sessions.a|b"),
    ({"sessions": {"a/b": {}}}, "sessions.a/b"),
    ({"networks": {"n@secret": {}}}, "networks.n@secret"),
    ({"mounts": {"my vol": {}}}, "mounts.my vol"),
    ({"annotations": {"": "x"}}, "annotations"),
    ({"diagnostics": {"exit_logs": [{"time": "yesterday"}]}}, "diagnostics.exit_logs[0].time"),
])
def test_json_errors_name_the_path(doc, where):
    with pytest.raises(ConfigError) as e:
        config_from_json(doc)
    assert str(e.value).startswith(where + ":")


def test_addresses_times_and_key():
    cfg = config_from_json({
        "key": "AAEC",
        "networks": {"br": {"ip": "10.0.0.2/24", "network": {
            "nameservers": ["8.8.8.8", "2001:db8::1"], "gateway": "10.0.0.1/24"}}},
        "diagnostics": {"exit_logs": [{"time": "2017-03-01T10:00:01.5-08:00", "exit_status": 1}]},
    })
    ep = cfg.networks["br"]
    assert ep.common.id == "br" and ep.network.common.name == "br"
    assert bytes(ep.ip.ip) == bytes([10, 0, 0, 2]) and bytes(ep.ip.mask) == bytes([255, 255, 255, 0])
    assert [len(ip) for ip in ep.network.nameservers] == [4, 16]
    assert cfg.key == b"\x00\x01\x02"
    enc = encode(cfg)
    assert enc["guestinfo.vice./networks|br/ip/IP"] == "CgAAAg=="
    assert enc["guestinfo.vice./key"] == "AAEC"
    assert enc["guestinfo.vice..diagnostics.exitlogs|0.Time"] == "2017-03-01 10:00:01.5 -0800 -0800"
    out = config_to_json(cfg)
    assert out["networks"]["br"]["ip"] == "10.0.0.2/24"
    assert out["diagnostics"]["exit_logs"][0]["time"] == "2017-03-01T10:00:01.5-08:00"


def test_sixteen_byte_v4_is_shown_as_v4():
    net = IPNet(IP.parse("10.0.0.2", v4_in_16=True), IPNet.parse("10.0.0.2/24").mask)
    cfg = ExecutorConfig()
    cfg.networks = {"n": None}
    from tether.config import NetworkEndpoint
    cfg.networks["n"] = NetworkEndpoint(ip=net)
    assert config_to_json(cfg)["networks"]["n"]["ip"] == "10.0.0.2/24"


@pytest.mark.parametrize("text, fields", [
    ("label://data", {"scheme": "label", "host": "data", "path": ""}),
    ("nfs://host:2049/exports/a", {"scheme": "nfs", "host": "host:2049", "path": "/exports/a"}),
    ("tmpfs://", {"scheme": "tmpfs", "host": "", "path": ""}),
    ("bind:///src/dir", {"scheme": "bind", "host": "", "path": "/src/dir"}),
    ("nfs://h/p%20q?vers=4#frag", {"path": "/p q", "raw_query": "vers=4", "fragment": "frag"}),
    ("mailto:someone", {"scheme": "mailto", "opaque": "someone"}),
])
def test_mount_source_urls(text, fields):
    u = url_from_text(text, "mounts.x.source")
    for name, value in fields.items():
        assert getattr(u, name) == value, name
    assert url_to_text(u) == text


def test_load_config_reports_json_syntax(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"common": ')
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and "line 1" in str(e.value)
