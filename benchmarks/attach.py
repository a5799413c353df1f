"""Attach throughput and keystroke latency against the real agent.

    python benchmarks/attach.py [--size BYTES] [--rounds N] [--keys N]

The agent runs as `tether agent` (a plain process: no namespaces, no console echo, as a
VM's agent at debug level 0) serving a unix socket. Each round, in alternating order:

  attach  an exec'd `head -c SIZE /dev/zero` streaming its stdout over the attach
          socket to the client library in this process (attached from its first byte)
  plain   the same `head` writing straight into a unix socket whose ends have the attach
          socket's buffers, read by this process with recv_into into a buffer of the
          client's read size: the machine's own rate for the same bytes, no extra
          process, no relay

Printed: the median of each path's rates and of the per-round ratios, CPU seconds per
GiB of the agent (utime+stime from /proc) and of the reader in this process for both
paths, then the keystroke round trip (client -> agent -> `cat` -> agent -> client),
median and p99, once as the machine is and once with --busy CPU-bound processes
spinning. The machine is shared: the load is printed before and after.
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

from tether.attach import client as client_module  # noqa: E402
from tether.attach.client import Client  # noqa: E402
from tether.attach.transports import SOCKET_BUFFER  # noqa: E402

KEY = b"benchmark-key"
PATH_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
GIB = 1 << 30
MIB = 1 << 20


def make_config():
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    cat = SessionConfig(common=Common(id="cat"), open_stdin=True,
                        cmd=Cmd(path="/bin/cat", args=["cat"], env=PATH_ENV))
    return ExecutorConfig(common=Common(id="cat", name="bench"), key=KEY,
                          sessions={"cat": cat})


def start_agent(directory: str):
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx
    config_path = os.path.join(directory, "config.vmx")
    with open(config_path, "w") as f:
        f.write(format_vmx(encode(make_config())))
    sock = os.path.join(directory, "attach.sock")
    env = {k: v for k, v in os.environ.items() if k != "TETHER_DEBUG"}
    env["PYTHONPATH"] = str(REPO)
    log = open(os.path.join(directory, "agent.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "tether", "agent", "--guestinfo-file",
                             config_path, "--attach", "unix:" + sock, "--no-power-off",
                             "--stop-grace", "2"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
                            env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            client = Client.connect("unix:" + sock, KEY, timeout=60)
            if any(s["id"] == "cat" and s["running"] for s in client.list()):
                return proc, client
            client.close()
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the agent did not come up (exit {proc.poll()}); see "
                             f"{log.name}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not of its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attach_round(client: Client, agent_pid: int, size: int) -> tuple[float, float, float,
                                                                     float]:
    """(seconds, agent CPU seconds, client CPU seconds, agent CPU seconds while the bytes
    streamed) for `size` bytes of a fresh session's stdout; exec attaches before the
    process runs. The first is the whole round: the exec, the session's write-back of
    its keys (per exec, not per byte: a VMX file rewritten per key here), its exit. The
    last runs from the first byte's arrival to the last's."""
    received = 0
    agent_before, ours_before = cpu_seconds(agent_pid), time.process_time()
    start = time.perf_counter()
    stream = client.exec(["head", "-c", str(size), "/dev/zero"], env=PATH_ENV)
    first = last = None
    for kind, value in stream.events(timeout=120):
        if kind == "stdout":
            if first is None:
                first = cpu_seconds(agent_pid)
            received += len(value)
            if received == size:
                last = cpu_seconds(agent_pid)
    elapsed = time.perf_counter() - start
    ours = time.process_time() - ours_before
    agent = cpu_seconds(agent_pid) - agent_before
    if received != size:
        raise SystemExit(f"attach: got {received} of {size} bytes")
    return elapsed, agent, ours, last - first


def plain_round(size: int) -> tuple[float, float]:
    """(seconds, reader CPU seconds): `head` straight into a unix socket with the attach
    socket's buffers, read as the client reads."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    buf = bytearray(client_module.READ_SIZE)
    received = 0
    cpu_before = time.process_time()
    start = time.perf_counter()
    proc = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=theirs)
    theirs.close()
    while True:
        n = ours.recv_into(buf)
        if not n:
            break
        received += n
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    proc.wait()
    ours.close()
    if received != size:
        raise SystemExit(f"plain: got {received} of {size} bytes")
    return elapsed, cpu


def keystroke_latency(client: Client, count: int) -> list[float]:
    stream = client.attach("cat")
    times = []
    for i in range(count):
        key = bytes([97 + i % 26])
        start = time.perf_counter()
        stream.write(key)
        got = b""
        while key not in got:
            for _, value in stream.events(timeout=10):
                got += bytes(value)
                break
            else:
                raise SystemExit("no echo within 10 s")
        times.append(time.perf_counter() - start)
    stream.detach()
    return times


BUSY = "while True: pass"


def keystrokes_under_load(client: Client, count: int, busy: int) -> list[float]:
    """The keystroke round trip while `busy` processes spin on the CPUs (at the agent's
    priority): the machine under load, as a container busy with its own work."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5)   # let them take their share
        return keystroke_latency(client, count)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=GIB, help="bytes a round (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved attach/plain rounds (default 5)")
    parser.add_argument("--keys", type=int, default=2000, help="keystrokes to time")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2,
                        help="CPU-bound processes for the loaded keystroke run (default: "
                             "one per CPU; 0: none)")
    args = parser.parse_args()
    load_before = load()
    attach, plain = [], []
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as directory:
        proc, client = start_agent(directory)
        try:
            attach_round(client, proc.pid, min(args.size, 64 * MIB))   # warm up
            quiet_load = load()
            times = keystroke_latency(client, args.keys)
            loaded = keystrokes_under_load(client, args.keys, args.busy) if args.busy else []
            for i in range(args.rounds):
                if i % 2:
                    plain.append(plain_round(args.size))
                    attach.append(attach_round(client, proc.pid, args.size))
                else:
                    attach.append(attach_round(client, proc.pid, args.size))
                    plain.append(plain_round(args.size))
        finally:
            client.close()
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    gib = args.size / GIB
    attach_rates = [args.size / a[0] / MIB for a in attach]
    plain_rates = [args.size / p[0] / MIB for p in plain]
    ratios = [a / p for a, p in zip(attach_rates, plain_rates)]
    print(f"{args.size / MIB:.0f} MiB a round, {args.rounds} interleaved rounds; "
          f"load {load_before} -> {load()}")
    print(f"  attach (session stdout over the attach socket): median "
          f"{statistics.median(attach_rates):7.1f} MiB/s  "
          f"({', '.join(f'{r:.0f}' for r in attach_rates)})")
    print(f"  plain (head into a unix socket, same buffers):  median "
          f"{statistics.median(plain_rates):7.1f} MiB/s  "
          f"({', '.join(f'{r:.0f}' for r in plain_rates)})")
    print(f"  ratio attach / plain: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"  CPU s/GiB: agent {statistics.median(a[3] for a in attach) / gib:.3f} while "
          f"the bytes stream ({statistics.median(a[1] for a in attach) / gib:.3f} for the "
          f"whole round, exec and write-back included), attach client "
          f"{statistics.median(a[2] for a in attach) / gib:.3f}, plain reader "
          f"{statistics.median(p[1] for p in plain) / gib:.3f}")
    print(f"  keystroke round trip ({len(times)}, load {quiet_load}): median "
          f"{statistics.median(times) * 1e3:.3f} ms, p99 {p99(times) * 1e3:.3f} ms")
    if loaded:
        print(f"  keystroke round trip ({len(loaded)}, {args.busy} busy loops on "
              f"{os.cpu_count()} CPUs): median {statistics.median(loaded) * 1e3:.3f} ms, "
              f"p99 {p99(loaded) * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
