"""Runs NetworkManager inside a network namespace for tests/test_network.py and the benchmark.

Usage: python tests/test_network_child.py SPEC.json   (under `ip netns exec NS`)
SPEC: {"endpoints": [...], "root": dir, "state": dir, "hostname": str, "mtus": {...},
       "hold": seconds to keep running for DHCP renewals, "dhcp_timeout": seconds}
Prints one JSON line per publish, then {"event": "done"|"error", ...}. No tests here.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_config(spec):
    from extraconfig.types import IP, IPNet
    from tether.config import Common, ContainerNetwork, ExecutorConfig, NetworkEndpoint
    networks = {}
    for ep in spec["endpoints"]:
        network = ContainerNetwork(
            common=Common(name=ep.get("network_name", ep["name"])),
            default=ep.get("default", False),
            gateway=IPNet.parse(ep["gateway"]) if ep.get("gateway") else IPNet(),
            nameservers=[IP.parse(s) for s in ep["dns"]] if ep.get("dns") else None,
            destinations=[IPNet.parse(d) for d in ep["destinations"]]
            if ep.get("destinations") else None)
        networks[ep["key"]] = NetworkEndpoint(
            common=Common(id=ep["id"], name=ep["name"]),
            static=ep.get("static", False),
            ip=IPNet.parse(ep["ip"]) if ep.get("ip") else None,
            network=network)
    return ExecutorConfig(networks=networks)


def snapshot(config, root):
    out = {}
    for key, ep in config.networks.items():
        out[key] = {
            "assigned": str(ep.assigned),
            "gateway": str(ep.network.assigned.gateway),
            "dns": [str(ip) for ip in ep.network.assigned.nameservers or []],
        }
    files = {}
    for name in ("hosts", "resolv.conf", "hostname"):
        try:
            files[name] = open(os.path.join(root, "etc", name)).read()
        except OSError:
            files[name] = None
    return {"endpoints": out, "files": files}


def main():
    spec = json.load(open(sys.argv[1]))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from tether.etcfiles import EtcFiles
    from tether.network import NetworkError, NetworkManager
    config = build_config(spec)
    etc = EtcFiles(spec["root"], spec["state"])
    etc.set_hostname(spec.get("hostname", "testhost"))

    def publish():
        print(json.dumps({"event": "publish", "t": time.monotonic(),
                          **snapshot(config, spec["root"])}), flush=True)

    t0 = time.monotonic()
    manager = NetworkManager(config, etc, publish, logging.getLogger("net"),
                             hostname=spec.get("hostname", "testhost"),
                             mtus=spec.get("mtus"), dhcp_timeout=spec.get("dhcp_timeout", 30))
    try:
        manager.apply()
        applied = time.monotonic() - t0
        manager.apply()            # idempotent: nothing more happens
        if spec.get("change"):     # a reload that changes static addresses
            from extraconfig.types import IPNet
            for key, ip in spec["change"].items():
                config.networks[key].ip = IPNet.parse(ip)
            manager.apply()
        print(json.dumps({"event": "applied", "seconds": applied}), flush=True)
        deadline = time.monotonic() + spec.get("hold", 0)
        while time.monotonic() < deadline:
            if os.path.exists(spec.get("stop_file", "/nonexistent")):
                break
            time.sleep(0.2)
    except NetworkError as exc:
        print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        return
    finally:
        manager.stop()
    print(json.dumps({"event": "done"}), flush=True)


if __name__ == "__main__":
    main()
