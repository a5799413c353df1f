"""Codec speed against the json module on the same flat map.

For an ExecutorConfig with 1, 100, 1,000 and 10,000 sessions (10 arguments and 10
environment entries each, 4 networks), times `extraconfig.encode(cfg)` against
`json.dumps(encoded)` and `extraconfig.decode(encoded, ExecutorConfig)` against
`json.loads(json.dumps(encoded))`, in interleaved rounds. Times are medians over the
rounds; a ratio is the median of the per-round ratios. The last lines give how the
per-session time grows from 1,000 to 10,000 sessions.

Run: .venv/bin/python benchmarks/codec.py [--rounds N] [--sizes 1,100,1000,10000]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
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


def timed(fn, number: int) -> float:
    """Seconds per call, over `number` back-to-back calls."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def measure(sessions: int, rounds: int) -> dict:
    cfg = build(sessions)
    encoded = encode(cfg)
    text = json.dumps(encoded)
    back = decode(encoded, ExecutorConfig)
    assert back.sessions.keys() == cfg.sessions.keys() and encode(back) == encoded
    # enough calls per timing that one timing takes a few milliseconds
    number = max(1, int(0.005 / max(timed(lambda: decode(encoded, ExecutorConfig), 1), 1e-6)))
    ops = {
        "encode": lambda: encode(cfg),
        "dumps": lambda: json.dumps(encoded),
        "decode": lambda: decode(encoded, ExecutorConfig),
        "loads": lambda: json.loads(text),
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, fn in ops.items():
            times[name].append(timed(fn, number))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "sessions": sessions, "keys": len(encoded), **med,
        "encode_ratio": statistics.median(e / j for e, j in zip(times["encode"], times["dumps"])),
        "decode_ratio": statistics.median(d / j for d, j in zip(times["decode"], times["loads"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", default="1,100,1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'sessions':>8} {'keys':>7} | {'encode ms':>9} {'dumps ms':>9} {'ratio':>6} | "
          f"{'decode ms':>9} {'loads ms':>9} {'ratio':>6}")
    rows = {}
    for n in sizes:
        r = rows[n] = measure(n, args.rounds if n < 10000 else max(3, args.rounds // 2))
        print(f"{n:>8} {r['keys']:>7} | {r['encode'] * 1e3:>9.3f} {r['dumps'] * 1e3:>9.3f} "
              f"{r['encode_ratio']:>5.2f}x | {r['decode'] * 1e3:>9.3f} {r['loads'] * 1e3:>9.3f} "
              f"{r['decode_ratio']:>5.2f}x", flush=True)
    if 1000 in rows and 10000 in rows:
        for op in ("encode", "decode", "dumps", "loads"):
            growth = (rows[10000][op] / 10000) / (rows[1000][op] / 1000)
            print(f"per-session {op} time, 10,000 vs 1,000 sessions: {growth:.2f}x")


if __name__ == "__main__":
    main()
