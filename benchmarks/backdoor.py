"""Guestinfo requests through the backdoor message protocol, against the simulated
hypervisor: info-get of a short value and info-set of 64 KiB, over the high- and the
low-bandwidth path, in process and over the unix-socket bridge (the sandbox's path);
plus the number of backdoor calls each request takes (what costs a VM exit on vSphere).
Run: .venv/bin/python benchmarks/backdoor.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from extraconfig.backdoor.bridge import SocketPorts  # noqa: E402
from extraconfig.backdoor.rpci import RpciTransport  # noqa: E402
from extraconfig.backdoor.simulator import SimulatedHypervisor  # noqa: E402

BIG = "x" * 65536


def measure(label: str, transport: RpciTransport, sim: SimulatedHypervisor) -> None:
    transport.info_get("guestinfo.short")   # open the channel first
    for name, action, repeat in (
            ("info-get 20 B", lambda: transport.info_get("guestinfo.short"), 300),
            ("info-set 64 KiB", lambda: transport.info_set("guestinfo.big", BIG), 20)):
        before = sum(sim.counts.values())
        start = time.perf_counter()
        for _ in range(repeat):
            action()
        elapsed = time.perf_counter() - start
        calls = (sum(sim.counts.values()) - before) / repeat
        print(f"{label:32s} {name:16s} {elapsed / repeat * 1e6:10.0f} us/request "
              f"{calls:8.0f} backdoor calls/request")


def main() -> None:
    for high_bandwidth in (True, False):
        path_name = "high bandwidth" if high_bandwidth else "low bandwidth"
        sim = SimulatedHypervisor({"guestinfo.short": "a" * 20}, high_bandwidth=high_bandwidth)
        measure(f"in process, {path_name}", RpciTransport(sim), sim)
        with tempfile.TemporaryDirectory() as tmp:
            server = sim.serve_unix(os.path.join(tmp, "sim.sock"))
            ports = SocketPorts(server.path)
            try:
                measure(f"unix socket, {path_name}", RpciTransport(ports), sim)
            finally:
                ports.close()
                server.close()


if __name__ == "__main__":
    main()
