"""Agent startup: median time from exec of the agent to exec of the primary session.

One command: `python benchmarks/startup.py [--runs 20]`. No network, no attach. The
primary prints the wall clock in ns as its first act, and the agent's RSS (its parent's
VmRSS) at that moment. The floor is the same measurement for a bare interpreter that
execs the same primary: `python3 -c 'import os; os.execv(...)'` (python3 -c pass + exec).
Also shown: the whole `tether sandbox` (unshare, fork, agent as PID 1), when root.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

def primary(stamp_file: str) -> list[str]:
    return ["/bin/sh", "-c", f"date +%s%N > {stamp_file}; grep VmRSS /proc/$PPID/status "
            f">> {stamp_file}"]


def write_config(directory: str, argv: list[str]) -> tuple[str, str]:
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    ident = uuid.uuid4().hex
    session = SessionConfig(common=Common(id=ident),
                            cmd=Cmd(path=argv[0], args=argv, env=["PATH=/usr/bin:/bin"]))
    config = ExecutorConfig(common=Common(id=ident), sessions={ident: session})
    vmx = os.path.join(directory, "guestinfo.vmx")
    text = format_vmx(encode(config))
    with open(vmx, "w") as f:
        f.write(text)
    return vmx, text


# As deployed, bytecode is compiled once (the image build does it). This machine sets
# PYTHONDONTWRITEBYTECODE, which would make every run compile every module: cache the
# bytecode under a private prefix instead, for the floor and the agent alike.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def measure(argv: list[str], stamp_file: str, reset=None) -> tuple[float, int | None]:
    """Seconds from just before exec to the primary's first act; the RSS it reported."""
    if reset:
        reset()
    if os.path.exists(stamp_file):
        os.unlink(stamp_file)
    start = time.time_ns()
    run = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    try:
        with open(stamp_file) as f:
            lines = f.read().split()
    except FileNotFoundError:
        lines = []
    stamp = next((int(w) for w in lines if w.isdigit() and len(w) >= 18), None)
    if stamp is None:
        raise RuntimeError(f"{argv[:4]}... printed no timestamp (exit {run.returncode}):\n"
                           f"{run.stdout}\n{run.stderr[-2000:]}")
    rss = None
    for i, word in enumerate(lines):
        if word == "VmRSS:":
            rss = int(lines[i + 1])
    return (stamp - start) / 1e9, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        ENV["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
        stamp = os.path.join(tmp, "stamp")
        argv = primary(stamp)
        vmx, text = write_config(tmp, argv)

        def reset() -> None:   # the agent writes back into the file: start clean each run
            with open(vmx, "w") as f:
                f.write(text)

        floor_argv = [python, "-c", f"import os; os.execv({argv[0]!r}, {argv!r})"]
        agent_argv = [python, "-m", "tether", "agent", "--guestinfo-file", vmx,
                      "--no-power-off", "--no-attach"]
        sandbox_argv = [python, "-m", "tether", "sandbox", vmx + ".sandbox.vmx"]
        with open(vmx + ".sandbox.vmx", "w") as f:
            f.write(text)
        measure(floor_argv, stamp)   # warm the page cache
        measure(agent_argv, stamp, reset)
        if os.geteuid() == 0:
            measure(sandbox_argv, stamp)
        rows = [("floor: python3 -c + exec", floor_argv, None), ("tether agent", agent_argv, reset)]
        if os.geteuid() == 0:
            rows.append(("tether sandbox (namespaces)", sandbox_argv, None))
        results = {}
        for name, run_argv, rst in rows:
            samples = [measure(run_argv, stamp, rst) for _ in range(args.runs)]
            times = sorted(s[0] for s in samples)
            rss = [s[1] for s in samples if s[1] is not None]
            results[name] = (statistics.median(times), times[0], times[-1],
                             statistics.median(rss) if rss else None)
    floor = results["floor: python3 -c + exec"][0]
    print(f"startup, exec -> exec of the primary, {args.runs} runs (median, min, max):")
    for name, (median, low, high, rss) in results.items():
        ratio = f"{median / floor:4.2f}x floor" if floor else ""
        rss_text = f"  RSS after launch {rss / 1024:5.1f} MiB" if rss and name != next(
            iter(results)) else ""
        print(f"  {name:<28} {median * 1000:7.1f} ms  ({low * 1000:.1f}..{high * 1000:.1f})"
              f"  {ratio}{rss_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
