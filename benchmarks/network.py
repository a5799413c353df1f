"""Time from config to an address being up: one static endpoint, and a DHCP lease from a real
dnsmasq, both inside network namespaces joined by a veth pair. Needs root.

    .venv/bin/python benchmarks/network.py [--runs N]

Figures are measured inside the agent-side process around NetworkManager.apply() (so they
include the lazy pyroute2 import, as the agent pays it), not around process start-up.
dnsmasq runs with --no-ping: its check that an address is free before offering it adds
about 3 s on the server side, which is not the agent's time.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "test_network_child.py"


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


class Namespaces:
    def __init__(self):
        tag = secrets.token_hex(3)
        self.agent, self.peer = f"bna-{tag}", f"bnp-{tag}"
        sh("ip", "netns", "add", self.agent)
        try:
            sh("ip", "netns", "add", self.peer)
            a, p = f"ba{tag}", f"bp{tag}"
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", p)
            sh("ip", "link", "set", a, "netns", self.agent)
            sh("ip", "link", "set", p, "netns", self.peer)
            sh("ip", "-n", self.agent, "link", "set", a, "name", "eth0")
            sh("ip", "-n", self.peer, "link", "set", p, "name", "peer0")
            sh("ip", "-n", self.peer, "addr", "add", "10.66.0.1/24", "dev", "peer0")
            sh("ip", "-n", self.peer, "link", "set", "peer0", "up")
        except Exception:
            self.close()
            raise

    def close(self):
        for ns in (self.agent, self.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_child(ns: Namespaces, workdir: Path, endpoint: dict) -> float:
    spec = {"endpoints": [endpoint], "root": str(workdir / "root"),
            "state": str(workdir / "state"), "hostname": "bench", "dhcp_timeout": 30}
    (workdir / "root" / "etc").mkdir(parents=True, exist_ok=True)
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run(["ip", "netns", "exec", ns.agent, sys.executable, str(CHILD), str(path)],
                         capture_output=True, text=True, timeout=120, cwd=str(REPO))
    events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    applied = [e for e in events if e["event"] == "applied"]
    if not applied:
        raise SystemExit(f"apply failed: {events} {out.stderr}")
    return applied[0]["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2

    t = subprocess.run([sys.executable, "-c", "import time;t=time.perf_counter();"
                        "import pyroute2.iproute;print(time.perf_counter()-t)"],
                       capture_output=True, text=True, check=True)
    print(f"pyroute2 import (paid once, only when a network is configured): "
          f"{float(t.stdout) * 1000:.0f} ms")

    static, dhcp = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            ns = Namespaces()
            try:
                static.append(run_child(ns, Path(tmp), {
                    "key": "n", "id": "eth0", "name": "n", "static": True,
                    "ip": "10.66.0.2/24", "gateway": "10.66.0.1/24", "default": True}))
            finally:
                ns.close()
        with tempfile.TemporaryDirectory() as tmp:
            ns = Namespaces()
            dnsmasq = subprocess.Popen(
                ["ip", "netns", "exec", ns.peer, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                 "--port=0", "--interface=peer0", "--bind-interfaces", "--dhcp-authoritative",
                 f"--dhcp-leasefile={tmp}/leases", "--pid-file",
                 "--dhcp-range=10.66.0.50,10.66.0.99,255.255.255.0,600", "--no-ping"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.3)
                dhcp.append(run_child(ns, Path(tmp), {"key": "n", "id": "eth0", "name": "n",
                                                      "default": True}))
            finally:
                dnsmasq.terminate()
                dnsmasq.wait(10)
                ns.close()

    def fmt(xs):
        return (f"median {statistics.median(xs) * 1000:.0f} ms, min {min(xs) * 1000:.0f} ms, "
                f"max {max(xs) * 1000:.0f} ms over {len(xs)} runs")
    print(f"static endpoint, config to address up: {fmt(static)}")
    print(f"DHCP endpoint, config to lease applied (dnsmasq): {fmt(dhcp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
