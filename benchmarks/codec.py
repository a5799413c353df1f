"""Codec speed against the json module on the same flat map.

For an ExecutorConfig with 1, 100, 1,000 and 10,000 sessions (10 arguments and 10
environment entries each, 4 networks), times `extraconfig.encode(cfg)` against
`json.dumps(encoded)` and `extraconfig.decode(encoded, ExecutorConfig)` against
`json.loads(json.dumps(encoded))`. Each round times every size and operation in turn;
times are medians over the rounds, a ratio is the median of the per-round ratios. The
last lines give how the per-session time grows from 1,000 to 10,000 sessions (median of
the per-round growths), next to the growth of merely building a dict of the same keys and
values (`dict(zip(keys, values))`, the "map" row), and of merely looking every key up in the
map once, in its order, with equal strings that are not the map's own objects (the
"lookups" row: the least work a decoder of that map does, as a decoder's keys are strings
it builds): what the machine's memory costs any code that makes or reads a map of that
size, before any codec work.

Run: .venv/bin/python benchmarks/codec.py [--rounds N] [--sizes 1,100,1000,10000]
(EXTRACONFIG_CODEGEN=0 in the environment measures the plan interpreter instead.)
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

import extraconfig  # noqa: E402
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
    """CPU seconds (user + system) per call, over `number` back-to-back calls: on a shared
    machine the wall clock also counts the time spent waiting for a CPU."""
    gc.collect()
    start = time.process_time()
    for _ in range(number):
        fn()
    return (time.process_time() - start) / number


class Case:
    """One size: the config, its map, the map's JSON text, and the timings so far."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self.cfg = build(sessions)
        self.encoded = encode(self.cfg)
        self.text = json.dumps(self.encoded)
        # equal to the map's keys, distinct objects (made after the map, as a decoder's are)
        self.lookup_keys = [("." + key)[1:] for key in self.encoded]
        back = decode(self.encoded, ExecutorConfig)
        assert back.sessions.keys() == self.cfg.sessions.keys() and encode(back) == self.encoded
        # enough calls per timing that one timing takes a few milliseconds
        self.number = max(1, int(0.005 / max(timed(self.ops()["decode"], 1), 1e-6)))
        self.times: dict[str, list[float]] = {name: [] for name in self.ops()}

    def ops(self) -> dict:
        cfg, encoded, text = self.cfg, self.encoded, self.text
        keys, values = list(encoded), list(encoded.values())
        get = encoded.get
        return {
            "encode": lambda: encode(cfg),
            "dumps": lambda: json.dumps(encoded),
            "decode": lambda: decode(encoded, ExecutorConfig),
            "loads": lambda: json.loads(text),
            "map": lambda: dict(zip(keys, values)),
            "lookups": lambda: list(map(get, self.lookup_keys)),
        }

    def round(self) -> None:
        for name, fn in self.ops().items():
            self.times[name].append(timed(fn, self.number))

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, ours: str, theirs: str) -> float:
        return statistics.median(a / b for a, b in zip(self.times[ours], self.times[theirs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", default="1,100,1000,10000")
    args = parser.parse_args()
    # steady state: the generated code from the first call (a process moving this many
    # keys switches to it after a few thousand anyway)
    if hasattr(extraconfig, "prepare"):
        extraconfig.prepare(ExecutorConfig)
    cases = [Case(int(s)) for s in args.sizes.split(",")]
    # every round times every size and operation, so that load on the machine falls on
    # all of them alike
    for _ in range(args.rounds):
        for case in cases:
            case.round()
    print(f"{'sessions':>8} {'keys':>7} | {'encode ms':>9} {'dumps ms':>9} {'ratio':>6} | "
          f"{'decode ms':>9} {'loads ms':>9} {'ratio':>6}")
    for c in cases:
        print(f"{c.sessions:>8} {len(c.encoded):>7} | {c.median('encode') * 1e3:>9.3f} "
              f"{c.median('dumps') * 1e3:>9.3f} {c.ratio('encode', 'dumps'):>5.2f}x | "
              f"{c.median('decode') * 1e3:>9.3f} {c.median('loads') * 1e3:>9.3f} "
              f"{c.ratio('decode', 'loads'):>5.2f}x")
    by_size = {c.sessions: c for c in cases}
    if 1000 in by_size and 10000 in by_size:
        small, big = by_size[1000], by_size[10000]
        for op in ("encode", "decode", "dumps", "loads", "map", "lookups"):
            growth = statistics.median((b / 10000) / (a / 1000)
                                       for a, b in zip(small.times[op], big.times[op]))
            what = {"map": "building the map alone (dict(zip))",
                    "lookups": "looking each key up once (map.get)"}.get(op, op)
            print(f"per-session {what} time, 10,000 vs 1,000 sessions: {growth:.2f}x")


if __name__ == "__main__":
    main()
