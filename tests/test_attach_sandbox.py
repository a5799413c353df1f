"""Attach acceptance: the real agent in `tether sandbox`, driven over its unix socket."""
from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import threading
import time

import pytest

from helpers import executor_config, session_config, sid, socket_paths
from tether.attach import protocol as p
from tether.attach.client import Client, ClientError

KEY = b"attach-test-key\x00\xff"


@pytest.fixture
def agent(sandbox):
    """start(primary, *others, key=KEY) -> (box, endpoint); sockets removed afterwards."""
    with socket_paths("tether-attach") as socket_path:
        def start(primary, *others, key=KEY, **kw):
            cfg = executor_config(primary, *others)
            cfg.key = key
            path = socket_path()
            box = sandbox.start(cfg, attach_socket=path, **kw)
            box.wait_for_log(r"serving \d+ session")
            return box, "unix:" + path
        yield start


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cat_session(**fields):
    return session_config(sid(), ["cat"], open_stdin=True, **fields)


def test_echo_through_cat_and_1000_attach_detach_cycles_do_not_leak(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    pid = box.agent_pid()

    def cycle(i: int) -> None:
        with Client.connect(endpoint, KEY) as client:
            stream = client.attach(cat.id)
            line = f"line {i}\n".encode()
            stream.write(line)
            assert stream.read_until(line, timeout=30).endswith(line)
            stream.detach()

    for i in range(100):          # warm up: imports, allocator pools
        cycle(i)
    time.sleep(0.5)               # let the agent see the last client's hang-up
    fds_before, rss_before = fd_count(pid), rss(pid)
    for i in range(100, 1100):
        cycle(i)
    time.sleep(0.5)
    fds_after, rss_after = fd_count(pid), rss(pid)
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert rss_after - rss_before < 4 << 20, (rss_before, rss_after)
    # Detach left the process running with stdin open.
    with Client.connect(endpoint, KEY) as client:
        (state,) = client.list()
        assert state["running"] and state["id"] == cat.id
        stream = client.attach(cat.id)
        stream.write(b"still here\n")
        stream.read_until(b"still here\n")


def test_three_clients_share_output_and_input(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    clients = [Client.connect(endpoint, KEY) for _ in range(3)]
    try:
        streams = [c.attach(cat.id) for c in clients]
        for i, stream in enumerate(streams):
            stream.write(f"from client {i}\n".encode())
            for other in streams:   # every client sees every client's input echoed
                other.read_until(f"from client {i}\n".encode())
    finally:
        for c in clients:
            c.close()


def test_a_stalled_client_is_dropped_and_does_not_hold_up_the_others(agent):
    size = 24 << 20
    script = f"read go; head -c {size} /dev/zero | tr '\\0' z; echo; echo end-of-output"
    session = session_config(sid(), ["sh", "-c", script], open_stdin=True)
    box, endpoint = agent(session)
    stalled = Client.connect(endpoint, KEY)
    stalled.attach(session.id)          # ... and then never reads again
    stalled.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    good = [Client.connect(endpoint, KEY) for _ in range(2)]
    try:
        streams = [c.attach(session.id) for c in good]
        streams[0].write(b"go\n")
        results: dict[int, object] = {}

        def read_all(i: int) -> None:   # each good client reads at its own pace
            try:
                results[i] = streams[i].collect(timeout=240)
            except Exception as err:   # noqa: BLE001 - reported by the assert below
                results[i] = err
        threads = [threading.Thread(target=read_all, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i, stream in enumerate(streams):
            out = results[i]
            assert isinstance(out, dict), (out, [line for line in box.log_text().splitlines()
                                                 if "tether.attach" in line])
            assert stream.exit["code"] == 0
            assert out["stdout"].count(b"z") == size
            assert out["stdout"].endswith(b"end-of-output\n")
        box.wait_for_log(r"closed: dropped: \d+ bytes of output queued")
    finally:
        stalled.close()
        for c in good:
            c.close()


def test_runblock_releases_after_attach_and_the_first_client_sees_hello(agent):
    echo = session_config(sid(), ["echo", "hello"], run_block=True)
    box, endpoint = agent(echo)
    with Client.connect(endpoint, KEY) as client:
        (state,) = client.list()
        assert state["blocked"] and not state["running"] and state["pid"] is None
        stream = client.attach(echo.id)
        client.unblock(echo.id)
        out = stream.collect(timeout=60)
    assert out["stdout"] == b"hello\n"
    assert stream.exit["code"] == 0
    assert box.wait().returncode == 0


def test_replay_gives_output_written_before_the_attach(agent):
    early = session_config(sid(), ["sh", "-c", "echo early-out; echo early-err >&2; exec cat"],
                           open_stdin=True)
    box, endpoint = agent(early)
    box.wait_for_log("early-err")
    with Client.connect(endpoint, KEY) as client:
        plain = client.attach(early.id)
        replayed = client.attach(early.id, replay=True)
        got = {"stdout": b"", "stderr": b""}
        for kind, value in replayed.events(timeout=2):
            got[kind] += value
        assert got == {"stdout": b"early-out\n", "stderr": b"early-err\n"}
        assert plain.pending() == []
        # A short-lived exec: its whole output and its exit come back after it ended.
        reply = client.exec(["sh", "-c", "echo gone-before-attach; exit 4"], attach=False)
        deadline = time.monotonic() + 60
        while any(s["running"] or not s["stoptime"] for s in client.list()
                  if s["id"] == reply["id"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        late = client.attach(reply["id"], replay=True)
        out = late.collect(timeout=30)
        assert out["stdout"] == b"gone-before-attach\n" and late.exit["code"] == 4


def test_close_stdin_on_a_pipe_gives_eof(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    with Client.connect(endpoint, KEY) as client:
        stream = client.attach(cat.id)
        stream.write(b"last words\n")
        stream.read_until(b"last words\n")
        stream.close_stdin()
        out = stream.collect(timeout=60)
        assert stream.exit["code"] == 0 and stream.exit["status"] == 0
    assert box.wait().returncode == 0


def test_close_stdin_on_a_tty_sends_eot(agent):
    cat = cat_session(tty=True)
    box, endpoint = agent(cat)
    with Client.connect(endpoint, KEY) as client:
        stream = client.attach(cat.id)
        assert stream.tty
        stream.write(b"typed\r")
        stream.read_until(b"typed\r\n")
        stream.close_stdin()
        stream.collect(timeout=60)
        assert stream.exit["code"] == 0
    assert box.wait().returncode == 0


def test_signals_by_name_and_number_reach_the_process_group(agent):
    script = ("trap 'echo got-usr1' USR1; trap 'echo got-usr2' USR2; echo ready; "
              "while :; do sleep 0.2; done")
    session = session_config(sid(), ["sh", "-c", script])
    box, endpoint = agent(session)
    with Client.connect(endpoint, KEY) as client:
        stream = client.attach(session.id, replay=True)
        stream.read_until(b"ready\n")
        assert client.signal(session.id, "USR1") == 10
        stream.read_until(b"got-usr1\n")
        assert client.signal(session.id, 12) == 12
        stream.read_until(b"got-usr2\n")
        assert client.signal(session.id, "sigusr1") == 10
        stream.read_until(b"got-usr1\n")
        with pytest.raises(ClientError, match="unknown signal"):
            client.signal(session.id, "NOPE")
        assert client.signal(session.id, 9) == 9
        stream.collect(timeout=60)
        assert stream.exit["code"] == 128 + 9 and stream.exit["status"] == -1
        assert stream.exit["signal"] == 9


def test_exec_a_second_process_with_a_tty(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    with Client.connect(endpoint, KEY) as client:
        stream = client.exec(["sh"], tty=True, env=["PATH=/usr/bin:/bin", "PS1=$ "])
        assert stream.tty and stream.pid
        stream.resize(33, 101)
        stream.write(b"tty; stty size\r")
        stream.read_until(b"33 101")
        stream.write(b"exit 5\r")
        stream.collect(timeout=60)
        assert stream.exit["code"] == 5
        states = {s["id"]: s for s in client.list()}
        assert states[stream.session]["status"] == 5 and states[cat.id]["running"]
    box.signal(15)
    result = box.wait()
    # Written back like a session: the exec's status is in the guestinfo.
    status_keys = {k: v for k, v in result.guestinfo.items()
                   if stream.session in k and k.endswith(".status")}
    assert list(status_keys.values()) == ["5"], status_keys


def test_copy_to_and_from_a_10_mb_file(agent, tmp_path):
    cat = cat_session()
    box, endpoint = agent(cat)
    data = os.urandom(10 << 20)
    digest = hashlib.sha256(data).hexdigest()
    target = tmp_path / "inside" / "big.bin"
    target.parent.mkdir()
    with Client.connect(endpoint, KEY) as client:
        reply = client.copy_to(str(target), data, mode=0o640)
        assert reply["sha256"] == digest and reply["size"] == len(data)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
        assert target.stat().st_mode & 0o777 == 0o640
        sink = io.BytesIO()
        info = client.copy_from(str(target), sink)
        assert info["kind"] == "file" and info["sha256"] == digest
        assert hashlib.sha256(sink.getvalue()).hexdigest() == digest
        with pytest.raises(ClientError, match="No such file"):
            client.copy_from(str(tmp_path / "missing"), io.BytesIO())
        # A directory comes out as a tar stream.
        tar = io.BytesIO()
        info = client.copy_from(str(target.parent), tar)
        assert info["kind"] == "tar"
        import tarfile
        tar.seek(0)
        with tarfile.open(fileobj=tar) as archive:
            member = archive.getmember("inside/big.bin")
            assert hashlib.sha256(archive.extractfile(member).read()).hexdigest() == digest


def test_wrong_hmac_is_rejected(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    with pytest.raises(ClientError, match="authentication failed"):
        Client.connect(endpoint, b"not the key")
    with pytest.raises(ClientError, match="authentication failed"):
        Client.connect(endpoint, b"")
    with Client.connect(endpoint, KEY) as client:
        assert client.ping("x")["data"] == "x"


def test_empty_key_needs_the_empty_key_hmac(agent):
    cat = cat_session()
    box, endpoint = agent(cat, key=None)
    with Client.connect(endpoint, b"") as client:
        assert client.list()[0]["id"] == cat.id
    with pytest.raises(ClientError, match="authentication failed"):
        Client.connect(endpoint, b"some key")


def _raw(endpoint: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(endpoint[len("unix:"):])
    return sock


def test_random_bytes_and_truncated_frames_do_not_harm_the_agent(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    pid = box.agent_pid()
    for _ in range(5):
        with _raw(endpoint) as sock:
            try:
                sock.sendall(os.urandom(256 << 10))
            except (BrokenPipeError, ConnectionResetError):
                pass   # dropped: past the budget of a client that has not authenticated
    with _raw(endpoint) as sock:   # a truncated frame, then hang up
        frame = p.encode({"t": "connect", "v": 1, "pad": b"x" * 5000})
        sock.sendall(frame[:len(frame) // 2])
    with _raw(endpoint) as sock:   # a well-formed frame of nonsense, then requests unauthenticated
        payload = b"\x93\x01\x02\x03"
        sock.sendall(p.HEADER.pack(p.MAGIC, len(payload), len(payload) ^ 0xFFFFFFFF, 0)
                     + payload + p.encode({"t": "list", "ch": 1}))
        reply = p.FrameDecoder().feed(sock.recv(65536))
        assert reply[0]["t"] == "error" and "before authentication" in reply[0]["msg"]
    with _raw(endpoint) as sock:   # a header promising more than it sends, left open
        sock.sendall(p.MAGIC + struct.pack(">III", 5000, 5000 ^ 0xFFFFFFFF, 0) + b"abc")
        with Client.connect(endpoint, KEY) as client:   # others are served meanwhile
            stream = client.attach(cat.id)
            stream.write(b"alive\n")
            stream.read_until(b"alive\n")
            assert client.list()[0]["running"]
    with Client.connect(endpoint, KEY) as client:   # garbage inside an authenticated stream
        client._send(os.urandom(100_000))
        assert client.ping(1)["data"] == 1
        client.send({"t": "bogus", "ch": 99})
        client.send({"t": "attach", "ch": 98, "session": 12})
        assert client.ping(2)["data"] == 2
    assert os.path.exists(f"/proc/{pid}") and box.proc.poll() is None
    assert "Traceback" not in box.log_text()


def test_stats_and_ps_per_session(agent):
    cat = cat_session()
    box, endpoint = agent(cat)
    with Client.connect(endpoint, KEY) as client:
        stats = client.stats()
        entry = stats["sessions"][cat.id]
        assert entry["pids"] == 1 and entry["rss"] > 0 and entry["running"]
        assert stats["memory"]["total"] > 0 and stats["cpus"] >= 1
        (state,) = client.list()
        assert state["started"] == "true" and state["pid"] and state["starttime"] > 0
        assert state["stoptime"] == 0
        run = state["run_state"]
        assert run["ProcessID"] == cat.id and run["Status"] == "running"
        assert run["GuestPid"] == state["pid"] and run["FinishedAt"] == "0001-01-01T00:00:00Z"
        ended = client.exec(["sh", "-c", "exit 6"])
        ended.collect(timeout=60)
        run = next(s["run_state"] for s in client.list() if s["id"] == ended.session)
        assert run["Status"] == "exited" and run["ExitCode"] == 6
        assert run["ExitMsg"] == "exited 6" and run["FinishedAt"] >= run["StartedAt"]


def test_write_waits_while_the_agent_holds_stdin_and_nothing_is_lost(agent, tmp_path):
    """Stream.write to a process that reads nothing yet: past 1 MiB of backlog the agent
    says `hold`, and write waits for its `go` (output and other replies still read)."""
    flag = tmp_path / "read-now"
    counter = session_config(sid(), ["/bin/sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; "
                                     "done; exec wc -c"], open_stdin=True)
    box, endpoint = agent(counter)
    size = 12 << 20
    with Client.connect(endpoint, KEY) as client:
        stream = client.attach(counter.id)
        releaser = threading.Timer(3.0, flag.touch)   # the process reads from then on
        releaser.start()
        try:
            for _ in range(size >> 20):
                stream.write(b"y" * (1 << 20))
        finally:
            releaser.cancel()
        assert flag.exists()           # the writes had to wait for the process
        stream.close_stdin()
        out = stream.collect(timeout=120)
    assert out["stdout"].strip() == str(size).encode()
    assert "dropping input" not in box.log_text()
