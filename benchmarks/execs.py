"""Many execs against the real agent in `tether sandbox`: what they leave behind.

    python benchmarks/execs.py [--count N] [--keep-execs K]

Runs N execs of `echo` (each attached, each read to its exit) over the attach socket and
prints the agent's RSS and its number of sessions before and after, then the number of
guestinfo keys and of sessions with keys once the sandbox has stopped. With the default
--keep-execs the agent keeps the last 32 finished execs; give a larger K to see the
growth without a bound. Needs root (the sandbox makes namespaces).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.attach.client import Client  # noqa: E402

PATH_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def agent_pid(sandbox_pid: int) -> int:
    """The agent is the sandbox's only child (PID 1 of its namespaces)."""
    with open(f"/proc/{sandbox_pid}/task/{sandbox_pid}/children") as f:
        return int(f.read().split()[0])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--keep-execs", type=int, default=None)
    args = parser.parse_args()
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx, parse_vmx
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    directory = tempfile.mkdtemp(prefix="tether-execs-")
    main_session = SessionConfig(common=Common(id="main"),
                                 cmd=Cmd(path="sleep", args=["sleep", "100000"], env=PATH_ENV))
    config_path = os.path.join(directory, "config.vmx")
    with open(config_path, "w") as f:
        f.write(format_vmx(encode(ExecutorConfig(common=Common(id="main"),
                                                 sessions={"main": main_session}))))
    sock = f"/tmp/tether-execs-{uuid.uuid4().hex[:8]}.sock"
    out = os.path.join(directory, "out.vmx")
    extra = [] if args.keep_execs is None else ["--keep-execs", str(args.keep_execs)]
    proc = subprocess.Popen([sys.executable, "-m", "tether", "sandbox", config_path, "--out",
                             out, "--attach-socket", sock, "--stop-grace", "2", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client.connect("unix:" + sock, b"", timeout=60)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the sandbox did not come up")
                time.sleep(0.1)
        pid = agent_pid(proc.pid)
        before = rss_mib(pid), len(client.list())
        start = time.perf_counter()
        for i in range(args.count):
            stream = client.exec(["echo", f"exec {i}"], env=PATH_ENV)
            for kind, _ in stream.events(timeout=60):
                if kind == "exit":
                    break
        elapsed = time.perf_counter() - start
        after = rss_mib(pid), len(client.list())
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with open(out) as f:
        keys = parse_vmx(f.read())
    with_keys = {m.group(1) for k in keys
                 if (m := re.match(r"guestinfo\.vice\.\.sessions\|(.+?)\.", k))}
    print(f"{args.count} execs in {elapsed:.1f} s ({args.count / elapsed:.0f}/s)")
    print(f"agent RSS: {before[0]:.1f} MiB before, {after[0]:.1f} MiB after")
    print(f"sessions listed: {before[1]} before, {after[1]} after")
    print(f"guestinfo at the end: {len(keys)} keys, {len(with_keys)} sessions with keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
