"""Runs NetworkManager inside a network namespace for tests/test_network.py and the benchmark.

Usage: python tests/test_network_child.py SPEC.json   (under `ip netns exec NS`)
SPEC: {"endpoints": [...], "root": dir, "state": dir, "hostname": str, "mtus": {...},
       "hold": seconds to keep running for DHCP renewals, "dhcp_timeout": seconds,
       "race": N renewals fed from DHCP's worker thread while the loop writes back}
Prints one JSON line per publish, then {"event": "done"|"error", ...}. No tests here.
As in the agent, the NetworkManager lives on a tether Loop (this process's main thread)
and DHCP events reach it through the loop.
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


def triple(config, key):
    """What a write-back says about an endpoint: address, gateway, DNS servers."""
    ep = config.networks[key]
    return [str(ep.assigned), str(ep.network.assigned.gateway),
            [str(ip) for ip in ep.network.assigned.nameservers or []]]


def race(manager, config, loop, spec):
    """DHCP renewals, alternating between two leases, delivered on DHCP's own worker
    thread while the loop writes the config back again and again; every write-back is
    read back as the host would and must show one lease, never a mix of two."""
    import threading
    from extraconfig.codec import decode, encode
    from extraconfig.transport import GuestSource, MapTransport
    from tether.config import ExecutorConfig
    from tether.network.dhcp import LeaseInfo
    from tether.writeback import WriteBack
    sys.setswitchinterval(1e-5)              # switch threads often: make a race show
    key = spec["endpoints"][0]["key"]
    leases = [LeaseInfo("10.77.0.60", 24, ("10.77.0.1",), ("10.77.0.53",), None, None, 120),
              LeaseInfo("10.77.0.61", 24, ("10.77.0.2",), ("10.77.0.54",), None, None, 120)]
    allowed = [triple(config, key)] + [[f"{lease.ip}/24", f"{lease.routers[0]}/24",
                                        list(lease.dns)] for lease in leases]
    store = encode(config)                   # what the host wrote; the write-back adds ours
    writeback = WriteBack(MapTransport(store))
    service = manager._dhcp
    handle = next(iter(service.handles.values()))
    fed = threading.Event()
    seen, mixed = [], []

    def feed():
        for i in range(spec["race"]):        # the path a renewal takes: DHCP's worker pool
            service._pool.submit(service._deliver, handle, leases[i % 2], "renewed").result()
            turned = threading.Event()       # one at a time: the loop turns in between
            loop.call_soon_threadsafe(turned.set)
            turned.wait(30)
        loop.call_soon_threadsafe(fed.set)

    def tick():
        writeback.everything(config)
        got = triple(decode(GuestSource(MapTransport(dict(store))), ExecutorConfig), key)
        seen.append(got)
        if got not in allowed:
            mixed.append(got)
        if not fed.is_set():
            loop.call_soon(tick)

    feeder = threading.Thread(target=feed)
    feeder.start()
    loop.call_soon(tick)
    loop.run_until(fed.is_set, timeout=300)
    feeder.join(30)
    print(json.dumps({"event": "race", "writebacks": len(seen), "mixed_count": len(mixed),
                      "mixed": mixed[:5], "final": triple(config, key),
                      "expected_final": allowed[1 + (spec["race"] - 1) % 2]}), flush=True)


def main():
    spec = json.load(open(sys.argv[1]))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from tether.etcfiles import EtcFiles
    from tether.loop import Loop
    from tether.network import NetworkError, NetworkManager
    from tether.config import enforce_loop_ownership
    config = build_config(spec)
    loop = Loop()
    enforce_loop_ownership(loop.thread_id)   # as the agent does at debug level 1
    etc = EtcFiles(spec["root"], spec["state"])
    etc.set_hostname(spec.get("hostname", "testhost"))

    def publish():
        print(json.dumps({"event": "publish", "t": time.monotonic(),
                          **snapshot(config, spec["root"])}), flush=True)

    t0 = time.monotonic()
    manager = NetworkManager(config, etc, publish, logging.getLogger("net"),
                             hostname=spec.get("hostname", "testhost"),
                             mtus=spec.get("mtus"), dhcp_timeout=spec.get("dhcp_timeout", 30),
                             post=loop.call_soon_threadsafe)
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
        if spec.get("race"):
            race(manager, config, loop, spec)
        deadline = time.monotonic() + spec.get("hold", 0)
        stop_file = spec.get("stop_file", "/nonexistent")

        def poll():   # wake the loop now and then to look at the clock and the stop file
            loop.call_later(0.2, poll)
        poll()
        loop.run_until(lambda: time.monotonic() >= deadline or os.path.exists(stop_file))
    except NetworkError as exc:
        print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        return
    finally:
        manager.stop()
    print(json.dumps({"event": "done"}), flush=True)


if __name__ == "__main__":
    main()
