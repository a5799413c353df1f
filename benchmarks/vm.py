"""VM boot figures under QEMU TCG: `python benchmarks/vm.py [--image build/] [--runs 5]`.

Boots examples/hello.json RUNS times, one VM at a time, and prints the median (and the
range) of, all measured on the host's monotonic clock:

  QEMU start -> agent start     the agent's first guestinfo request on org.tether.guestinfo
  agent start -> primary exec   until the agent writes the primary's `started` (it does so
                                right after the exec; TCG makes the gap to exec negligible)
  start -> started=true         QEMU spawn until the host holds started=true
  total wall per VM             QEMU spawn until QEMU exited after the guest powered off

and the sizes of the ISO and its parts. Builds the image first if it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_run(image: str, config_path: str) -> dict[str, float]:
    from tether.jsonform import load_config
    from tether.vm import VmRun
    run = VmRun(load_config(config_path), image)
    try:
        run.start()
        result = run.finish(300)
    finally:
        run.close()
    if result.exit_code != 0:
        raise SystemExit(f"benchmark VM failed: {result.message}\n{result.console[-3000:]}")
    m = result.marks
    return {
        "QEMU start -> agent start": m["agent_start"] - m["qemu_start"],
        "agent start -> primary exec": m["started"] - m["agent_start"],
        "start -> started=true": m["started"] - m["qemu_start"],
        "total wall per VM": m["qemu_exit"] - m["qemu_start"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(REPO / "build"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default=str(REPO / "examples" / "hello.json"))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.image, "bootstrap.iso")):
        subprocess.run([str(REPO / "init" / "build"), "--out", args.image], check=True)
    samples: dict[str, list[float]] = {}
    for i in range(args.runs):
        started = time.monotonic()
        for name, value in one_run(args.image, args.config).items():
            samples.setdefault(name, []).append(value)
        print(f"run {i + 1}/{args.runs}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(f"VM boot under QEMU TCG, examples/hello.json, median of {args.runs} "
          f"(min-max), load average {os.getloadavg()[0]:.2f}:")
    for name, values in samples.items():
        print(f"  {name:<30} {statistics.median(values):6.2f} s   "
              f"({min(values):.2f}-{max(values):.2f})")
    print("sizes:")
    manifest = Path(args.image) / "manifest.json"
    names = ["bootstrap.iso", "root.sqfs", "tether.sqfs", "stage0.cpio.gz", "vmlinuz", "containerfs.img"]
    for name in names:
        path = Path(args.image) / name
        if path.exists():
            size = path.stat().st_blocks * 512 if name == "containerfs.img" else path.stat().st_size
            print(f"  {name:<30} {size / 1048576:6.1f} MiB")
    if manifest.exists():
        print(f"  kernel {json.loads(manifest.read_text())['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
