"""Copy throughput against the real agent in `tether sandbox`, next to `cat` through the
same attach socket.

    python benchmarks/copy.py [--size BYTES] [--rounds N]

Prints MiB/s, each transfer checked with SHA-256 at both ends:
  copy-to    SIZE bytes from this process into a file (the agent's checksum and the file's)
  copy-from  the file back out (our checksum of what arrived)
  cat        an exec'd `cat FILE`'s stdout, attached: the same bytes, socket and client
  tar out    copy-from of the file's directory as a tar stream
There is no `cat > FILE` figure: a session's stdin has no flow control back to the client
(input over the agent's 4 MiB stdin backlog is dropped), so it cannot carry 1 GiB.
Needs root (the sandbox makes namespaces); the file lives in a temporary directory.
"""
from __future__ import annotations

import argparse
import hashlib
import os
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
BLOCK = 16 << 20
MIB = 1 << 20


def make_config():
    from tether.config import Cmd, Common, ExecutorConfig, SessionConfig
    idle = SessionConfig(common=Common(id="idle"),
                         cmd=Cmd(path="sleep", args=["sleep", "100000"], env=PATH_ENV))
    return ExecutorConfig(common=Common(id="idle", name="bench"), key=KEY,
                          sessions={"idle": idle})


def start_sandbox(directory: str):
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx
    config_path = os.path.join(directory, "config.vmx")
    with open(config_path, "w") as f:
        f.write(format_vmx(encode(make_config())))
    sock = f"/tmp/tether-bench-{uuid.uuid4().hex[:8]}.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tether", "sandbox", config_path,
                             "--out", os.path.join(directory, "out.vmx"),
                             "--attach-socket", sock, "--stop-grace", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            client = Client.connect("unix:" + sock, KEY, timeout=300)
            if any(s["id"] == "idle" and s["running"] for s in client.list()):
                return proc, sock, client
            client.close()
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the sandbox did not come up (exit {proc.poll()})")
        time.sleep(0.1)


class Payload:
    """`size` bytes, a random block repeated, read like a file; its SHA-256 up front."""

    def __init__(self, size: int):
        self.block = os.urandom(BLOCK)
        self.size = size
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        self.sha256 = digest.hexdigest()

    def chunks(self, piece: int = BLOCK):
        view = memoryview(self.block)
        left = self.size
        while left:
            for i in range(0, BLOCK, piece):
                take = min(piece, left)
                yield view[i:i + take]
                left -= take
                if not left:
                    return

    def reader(self):
        payload = self

        class Reader:
            def __init__(self):
                self.pieces = payload.chunks(64 << 10)

            def read(self, _size=-1):
                return bytes(next(self.pieces, b""))
        return Reader()


class Sink:
    def __init__(self):
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def check(what: str, got: str, want: str) -> None:
    if got != want:
        raise SystemExit(f"{what}: checksum {got} is not {want}")


def copy_to(client: Client, payload: Payload, path: str) -> float:
    start = time.perf_counter()
    reply = client.copy_to(path, payload.reader(), mode=0o600)
    elapsed = time.perf_counter() - start
    check("copy-to (agent)", reply["sha256"], payload.sha256)
    check("copy-to (file)", file_sha256(path), payload.sha256)
    return payload.size / elapsed


def copy_from(client: Client, payload: Payload, path: str, *, tar: bool = False) -> float:
    sink = Sink()
    start = time.perf_counter()
    info = client.copy_from(os.path.dirname(path) if tar else path, sink)
    elapsed = time.perf_counter() - start
    if not tar:
        check("copy-from", sink.digest.hexdigest(), payload.sha256)
    elif info["kind"] != "tar" or sink.size < payload.size:
        raise SystemExit(f"tar out: {info}, {sink.size} bytes")
    return sink.size / elapsed


def cat_out(client: Client, payload: Payload, path: str) -> float:
    sink = Sink()
    start = time.perf_counter()
    stream = client.exec(["cat", path], env=PATH_ENV)
    for kind, value in stream.events(timeout=300):
        if kind == "stdout":
            sink.write(value)
    elapsed = time.perf_counter() - start
    check("cat out", sink.digest.hexdigest(), payload.sha256)
    return payload.size / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each; the best is kept (the machine is shared)")
    args = parser.parse_args()
    payload = Payload(args.size)
    rates: dict[str, list[float]] = {k: [] for k in ("copy-to", "copy-from", "cat", "tar out")}
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as directory:
        data = os.path.join(directory, "data")
        os.mkdir(data)
        target = os.path.join(data, "payload")
        proc, sock, client = start_sandbox(directory)
        try:
            for _ in range(args.rounds):
                rates["copy-to"].append(copy_to(client, payload, target))
                rates["copy-from"].append(copy_from(client, payload, target))
                rates["cat"].append(cat_out(client, payload, target))
                rates["tar out"].append(copy_from(client, payload, target, tar=True))
                os.unlink(target)
        finally:
            client.close()
            proc.kill()
            proc.wait()
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
    print(f"{args.size / MIB:.0f} MiB over the attach unix socket, SHA-256 checked, "
          f"best of {args.rounds} (MiB/s):")
    for name, label in (("copy-to", "copy-to"), ("copy-from", "copy-from"),
                        ("cat", "cat FILE (stdout)"), ("tar out", "copy-from as tar")):
        values = rates[name]
        print(f"  {label:20s} {max(values) / MIB:8.1f}   "
              f"({', '.join(f'{v / MIB:.0f}' for v in values)})")
    cat = max(rates["cat"])
    print(f"  copy-to / cat        {max(rates['copy-to']) / cat:8.2f}")
    print(f"  copy-from / cat      {max(rates['copy-from']) / cat:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
