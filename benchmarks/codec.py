"""Encode and decode times of an ExecutorConfig with 1, 100 and 1,000 sessions.

Each session has 10 arguments and 10 environment entries; the config has 4 networks.
Run: .venv/bin/python benchmarks/codec.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from extraconfig import decode, encode  # noqa: E402
from extraconfig.types import IP, IPNet  # noqa: E402
from tether.config import (Cmd, ContainerNetwork, ExecutorConfig, NetworkEndpoint,  # noqa: E402
                           SessionConfig)


def build(sessions: int) -> ExecutorConfig:
    cfg = ExecutorConfig()
    cfg.common.id = cfg.common.name = "bench"
    cfg.sessions = {}
    for i in range(sessions):
        sid = f"session-{i:04d}"
        s = SessionConfig(cmd=Cmd(path="/bin/worker",
                                  args=["/bin/worker"] + [f"--opt{j}=value {j}" for j in range(9)],
                                  env=[f"VAR{j}=value-{j}" for j in range(10)], dir="/work"))
        s.common.id = s.common.name = sid
        cfg.sessions[sid] = s
    cfg.networks = {}
    for n in range(4):
        ep = NetworkEndpoint(static=True, ip=IPNet.parse(f"10.{n}.0.2/16"), ports=["80/tcp"])
        ep.common.id = f"ep{n}"
        ep.network = ContainerNetwork(type="bridge", gateway=IPNet.parse(f"10.{n}.0.1/16"),
                                      nameservers=[IP.parse("8.8.8.8")],
                                      destinations=[IPNet.parse("10.0.0.0/8")])
        ep.network.common.name = f"net{n}"
        cfg.networks[f"net{n}"] = ep
    return cfg


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"{'sessions':>8} {'keys':>7} {'encode ms':>10} {'decode ms':>10}")
    for n in (1, 100, 1000):
        cfg = build(n)
        encoded = encode(cfg)
        repeat = 20 if n < 1000 else 5
        enc = best_of(lambda: encode(cfg), repeat)
        dec = best_of(lambda: decode(encoded, ExecutorConfig), repeat)
        assert decode(encoded, ExecutorConfig).sessions.keys() == cfg.sessions.keys()
        print(f"{n:>8} {len(encoded):>7} {enc * 1e3:>10.2f} {dec * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
