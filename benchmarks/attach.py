"""Attach throughput and keystroke latency against the real agent in `tether sandbox`.

    python benchmarks/attach.py [--size BYTES] [--keys N]

Prints: 1 GiB of session stdout to one client over the attach unix socket, next to
`cat` piping the same bytes through a plain unix socket to a reader in this process,
and their ratio; then the keystroke round trip (client -> agent -> `cat` -> agent ->
client) median and p99. Needs root (the sandbox makes namespaces).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.attach.client import Client  # noqa: E402

KEY = b"benchmark-key"
PATH_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def make_config():
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    cat = SessionConfig(common=Common(id="cat"), open_stdin=True,
                        cmd=Cmd(path="cat", args=["cat"], env=PATH_ENV))
    return ExecutorConfig(common=Common(id="cat", name="bench"), key=KEY,
                          sessions={"cat": cat})


def start_sandbox(directory: str):
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx
    config_path = os.path.join(directory, "config.vmx")
    with open(config_path, "w") as f:
        f.write(format_vmx(encode(make_config())))
    sock = f"/tmp/tether-bench-{uuid.uuid4().hex[:8]}.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The sandbox echoes session output to its console: send that to /dev/null.
    proc = subprocess.Popen([sys.executable, "-m", "tether", "sandbox", config_path,
                             "--out", os.path.join(directory, "out.vmx"),
                             "--attach-socket", sock, "--stop-grace", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            client = Client.connect("unix:" + sock, KEY, timeout=60)
            if any(s["id"] == "cat" and s["running"] for s in client.list()):
                return proc, sock, client
            client.close()
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the sandbox did not come up (exit {proc.poll()})")
        time.sleep(0.1)


def attach_throughput(client: Client, size: int) -> float:
    """A fresh session writing `size` bytes to stdout; exec attaches before it runs."""
    received = 0
    start = time.perf_counter()
    stream = client.exec(["head", "-c", str(size), "/dev/zero"], env=PATH_ENV)
    for kind, value in stream.events(timeout=120):
        if kind == "stdout":
            received += len(value)
    elapsed = time.perf_counter() - start
    if received != size:
        raise SystemExit(f"attach: got {received} of {size} bytes")
    return size / elapsed


def plain_socket_throughput(size: int) -> float:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    start = time.perf_counter()
    proc = subprocess.Popen(f"head -c {size} /dev/zero | cat", shell=True, stdout=theirs)
    theirs.close()
    buf = bytearray(256 << 10)
    received = 0
    while True:
        n = ours.recv_into(buf)
        if not n:
            break
        received += n
    elapsed = time.perf_counter() - start
    proc.wait()
    ours.close()
    if received != size:
        raise SystemExit(f"plain: got {received} of {size} bytes")
    return size / elapsed


def keystroke_latency(client: Client, count: int) -> list[float]:
    stream = client.attach("cat")
    times = []
    for i in range(count):
        key = bytes([97 + i % 26])
        start = time.perf_counter()
        stream.write(key)
        got = b""
        while key not in got:
            for kind, value in stream.events(timeout=10):
                got += value
                break
            else:
                raise SystemExit("no echo within 10 s")
        times.append(time.perf_counter() - start)
    stream.detach()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    parser.add_argument("--keys", type=int, default=2000, help="keystrokes to time")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate attach and plain runs this many times and keep the "
                        "best of each (the machine is shared; default 3)")
    args = parser.parse_args()
    attach_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as directory:
        proc, sock, client = start_sandbox(directory)
        try:
            times = keystroke_latency(client, args.keys)
            for _ in range(args.rounds):
                attach_rates.append(attach_throughput(client, args.size))
                plain_rates.append(plain_socket_throughput(args.size))
        finally:
            client.close()
            proc.kill()
            proc.wait()
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
    attach, plain = max(attach_rates), max(plain_rates)
    mib = 1 << 20
    print(f"session stdout over attach (unix): {attach / mib:8.1f} MiB/s "
          f"({args.size / mib:.0f} MiB, best of {args.rounds}: "
          f"{', '.join(f'{r / mib:.0f}' for r in attach_rates)})")
    print(f"cat through a plain unix socket:   {plain / mib:8.1f} MiB/s "
          f"({', '.join(f'{r / mib:.0f}' for r in plain_rates)})")
    print(f"ratio attach / plain:              {attach / plain:8.2f}")
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"keystroke round trip ({len(times)}): median {statistics.median(times) * 1e3:.3f} ms, "
          f"p99 {p99 * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
