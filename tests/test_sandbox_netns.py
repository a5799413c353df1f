"""`tether sandbox` never touches the network of the namespace it is started from: it runs
the agent in a private network namespace (loopback, plus a stand-in NIC per endpoint
named by interface), or in the one `--netns NAME` names."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, require_root, require_tool

pytestmark = pytest.mark.root


def sh(*argv, check=True, timeout=60):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def outer_ns():
    """A namespace standing in for the user's machine: `eth0` (a veth) with an address and
    a default route, so there is something for a misbehaving sandbox to change."""
    require_root("network namespaces")
    require_tool("ip")
    tag = secrets.token_hex(3)
    outer, far = f"tso-{tag}", f"tsf-{tag}"
    made = []
    try:
        for ns in (outer, far):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        sh("ip", "link", "add", "eth0", "netns", outer, "type", "veth", "peer", "name", "far0",
           "netns", far)
        sh("ip", "-n", outer, "addr", "add", "192.168.77.5/24", "dev", "eth0")
        sh("ip", "-n", outer, "link", "set", "eth0", "up")
        sh("ip", "-n", outer, "route", "add", "default", "via", "192.168.77.1")
        yield outer
    finally:
        for ns in reversed(made):
            sh("ip", "netns", "del", ns, check=False)


def state(ns: str | None) -> tuple:
    prefix = ["ip", "-n", ns] if ns else ["ip"]
    addr = json.loads(sh(*prefix, "-j", "addr").stdout)
    route = json.loads(sh(*prefix, "-j", "route").stdout)
    for link in addr:   # counters and timers move on their own
        for a in link.get("addr_info", []):
            a.pop("valid_life_time", None)
            a.pop("preferred_life_time", None)
    return addr, route


def sandbox_cmd(*args: str, ns: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "tether", "sandbox", *args]
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def run(argv, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_static_network_applies_inside_and_leaves_the_outer_namespace_alone(outer_ns, tmp_path):
    ip = shutil.which("ip")
    config = {
        "common": {"id": "netstatic"},
        "sessions": {"netstatic": {"cmd": {"path": ip, "args": [ip, "-o", "addr"]}}},
        # the endpoint names the outer namespace's NIC: the old sandbox configured it
        "networks": {"public": {"common": {"id": "eth0"}, "static": True, "ip": "10.99.0.2/24",
                                "network": {"default": True, "gateway": "10.99.0.1/24"}}},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    before = state(outer_ns)
    result = run(sandbox_cmd(str(path), "--out", str(tmp_path / "out.vmx"), ns=outer_ns),
                 tmp_path)
    assert result.returncode == 0, result.stderr
    assert state(outer_ns) == before
    # inside, the session saw its static address on the stand-in NIC (renamed to "public")
    assert "inet 10.99.0.2/24" in result.stderr, result.stderr
    assert "192.168.77.5" not in result.stderr


def test_the_static_network_example_leaves_this_namespace_alone(tmp_path):
    """The acceptance check, literally: ip -j addr/route of the invoking namespace are the
    same before and after, and the session inside sees its static address."""
    require_root("network namespaces")
    require_tool("ip")
    before = state(None)
    result = run(sandbox_cmd(str(REPO / "examples" / "static-network.json"),
                             "--out", str(tmp_path / "out.vmx")), tmp_path)
    assert result.returncode == 0, result.stderr
    assert state(None) == before
    assert "inet 172.16.0.2/16" in result.stderr, result.stderr


def test_without_networks_only_loopback_is_up(tmp_path):
    require_root("network namespaces")
    require_tool("ip")
    ip = shutil.which("ip")
    config = {"common": {"id": "links"},
              "sessions": {"links": {"cmd": {"path": ip, "args": [ip, "-j", "link"]}}}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run(sandbox_cmd(str(path), "--out", str(tmp_path / "out.vmx")), tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith("[{"))
    links = json.loads(line)
    assert [(l["ifname"], "UP" in l["flags"]) for l in links] == [("lo", True)]


def test_netns_joins_a_named_namespace_and_refuses_a_missing_one(outer_ns, tmp_path):
    ip = shutil.which("ip")
    config = {"common": {"id": "links"},
              "sessions": {"links": {"cmd": {"path": ip, "args": [ip, "-o", "addr"]}}}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run(sandbox_cmd(str(path), "--netns", outer_ns, "--out", str(tmp_path / "o")),
                 tmp_path)
    assert result.returncode == 0, result.stderr
    assert "inet 192.168.77.5/24" in result.stderr     # the named namespace's own NIC
    missing = run(sandbox_cmd(str(path), "--netns", "no-such-ns-" + secrets.token_hex(3)),
                  tmp_path)
    assert missing.returncode == 2
    assert "no such network namespace" in missing.stderr
    assert "ip netns add" in missing.stderr
