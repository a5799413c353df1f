"""A session's output spliced to its only attach client (sessions.py, server.py): whole
and in order, the replay ring still the output's last 64 KiB, a client that stops taking
a spliced frame dropped so the session goes on, and nothing lost when the process exits
while a frame is on its way.

The agent runs as `tether agent`, a plain process: the sandbox echoes session output to
its console, and output with a second consumer is never spliced.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, executor_config, session_config, write_config
from tether.attach.client import Client, ClientError

KEY = b"splice-test-key"
PATH_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
RING = 64 << 10


@pytest.fixture
def agent(tmp_path):
    """(client factory, agent log path) for an agent serving a `sleep` and unix:SOCK."""
    primary = session_config("main", ["sleep", "1000"])
    config = executor_config(primary)
    config.key = KEY
    vmx = write_config(config, str(tmp_path))
    sock = tmp_path / "attach.sock"
    log_path = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k != "TETHER_DEBUG"}
    env["PYTHONPATH"] = str(REPO)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tether", "agent", "--guestinfo-file",
                                 vmx, "--attach", f"unix:{sock}", "--no-power-off",
                                 "--stop-grace", "1"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, cwd=REPO, env=env)
    clients = []

    def connect() -> Client:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = Client.connect(f"unix:{sock}", KEY, timeout=60)
                clients.append(client)
                return client
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    try:
        yield connect, log_path
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def numbers(count: int) -> bytes:
    return b"".join(b"%d\n" % i for i in range(1, count + 1))


def spliced(client: Client, session: str) -> tuple[int, int]:
    entry = client.stats()["sessions"][session]
    return entry["output_bytes"], entry["spliced_bytes"]


def test_a_big_burst_reaches_its_only_client_whole_in_order_and_spliced(agent):
    connect, _ = agent
    client = connect()
    expected = numbers(3_000_000)                                  # 20.9 MB
    stream = client.exec(["seq", "1", "3000000"], env=PATH_ENV, id="burst")
    out = stream.collect(timeout=120)
    assert out["stdout"] == expected and stream.exit["code"] == 0
    total, by_splice = spliced(client, "burst")
    assert total == len(expected)
    assert by_splice > len(expected) // 2, (total, by_splice)    # the path this tests


def test_the_replay_after_spliced_bursts_is_the_outputs_last_64_kib(agent):
    connect, _ = agent
    first, second = connect(), connect()
    expected = numbers(1_000_000)                                   # 6.9 MB
    stream = first.exec(["sh", "-c", "seq 1 1000000; exec sleep 1000"], env=PATH_ENV,
                        id="ring")
    got = stream.read_until(b"\n1000000\n", timeout=120)
    assert got == expected
    assert spliced(first, "ring")[1] > 0
    replayed = second.attach("ring", replay=True, stdin=False)
    seen = bytearray()
    while len(seen) < RING:
        for kind, value in replayed.events(timeout=10):
            seen += value
            break
        else:
            break
    assert bytes(seen) == expected[-RING:]


def test_a_client_that_stops_taking_a_spliced_frame_is_dropped_and_the_session_goes_on(
        agent):
    connect, log_path = agent
    idle, watcher = connect(), connect()
    stream = idle.exec(["head", "-c", str(256 << 20), "/dev/zero"], env=PATH_ENV, id="stuck")
    assert stream.running is not None     # then never read again: the socket fills
    deadline = time.monotonic() + 60
    state = None
    while time.monotonic() < deadline:
        state = next(s for s in watcher.list() if s["id"] == "stuck")
        if not state["running"]:
            break
        time.sleep(0.2)
    assert state is not None and not state["running"], "the session is still held up"
    assert state["status"] == 0
    assert "did not take a spliced frame" in log_path.read_text()
    assert spliced(watcher, "stuck")[1] > 0


def test_nothing_is_lost_when_the_process_exits_while_its_frame_is_spliced(agent):
    connect, _ = agent
    client = connect()
    expected = numbers(2_000_000)                                   # 14.9 MB
    stream = client.exec(["seq", "1", "2000000"], env=PATH_ENV, id="exits")
    time.sleep(1.0)     # not reading: frames wait while the process writes and exits
    try:
        out = stream.collect(timeout=120)
    except ClientError as err:
        pytest.fail(f"the agent dropped the client: {err}")
    assert out["stdout"] == expected
    assert spliced(client, "exits")[1] > 0


OWED = """
import json, sys
from tether.loop import Loop
from tether.reaper import Reaper
from tether.sessions import Phase, Session
from helpers import session_config

loop = Loop()
reaper = Reaper(loop)
reaper.start()


class Owed:
    '''A client owed spliced bytes it never takes: it holds the session's pipes.'''
    def __init__(self):
        self.owed = 0
        self.after = 0      # bytes taken from the pipe otherwise while we were owed some
    def can_splice(self):
        return True
    def splice_output(self, stream, fd, count, session, tail=0, on_tail=None):
        if self.owed:
            self.after += count
        self.owed += count
        session.hold_pipes(self)
        return count, False
    def on_output(self, stream, data):
        if self.owed:
            self.after += len(data)
    def on_close(self):
        pass


owed = Owed()
cfg = session_config("s", ["sh", "-c", "head -c 400000 /dev/zero; sleep 0.3; "
                                       "head -c 500000 /dev/zero"])
session = Session(cfg, loop=loop, reaper=reaper)
session.output.subscribe(owed)
session.start()
loop.run_until(lambda: session.phase is not Phase.RUNNING, timeout=60)
loop.run_until(lambda: False, timeout=0.5)
print(json.dumps({"owed": owed.owed, "after": owed.after, "phase": session.phase.value}))
"""


def test_the_exit_drain_leaves_bytes_owed_to_a_client_in_the_pipe():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    run = subprocess.run([sys.executable, "-c", OWED], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    import json
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["owed"] > 0, result         # a splice was owed when the process ended...
    assert result["phase"] == "finishing"     # ...its exit seen, its output not finished...
    assert result["after"] == 0, result       # ...and nothing else taken from the pipe


# -- the ring's tail, kept by tee(2) (sessions.OutputFanout), without an agent ----------------
def _pipe(size: int = 1 << 20) -> tuple[int, int]:
    import fcntl
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, size)
    return r, w


def test_a_tail_kept_by_tee_is_the_ring_trimmed_and_replayed_like_bytes():
    from tether.sessions import OutputFanout
    fanout = OutputFanout("s")
    r, w = _pipe()
    try:
        burst = os.urandom(200 << 10)
        os.write(w, burst)
        os.read(r, len(burst) - RING)                   # as the splice before the tail
        assert fanout.keep_tail("stdout", r, RING)
        assert os.read(r, 1 << 20) == burst[-RING:]     # tee left them for the splice
        fanout.publish("stderr", b"e" * 1000)
        assert fanout.replay() == [("stdout", burst[-RING + 1000:]), ("stderr", b"e" * 1000)]
        for i in range(40):     # many tails: the tail pipe fills, obsolete ones are drained
            tail = os.urandom(RING)
            os.write(w, tail)
            assert fanout.keep_tail("stdout", r, RING)
            assert os.read(r, 1 << 20) == tail
            if i % 7 == 0:
                fanout.publish("stdout", b"%d" % i)     # a small write read as usual
                tail = tail[len(b"%d" % i):] + b"%d" % i
                assert b"".join(d for _, d in fanout.replay()) == tail
        assert b"".join(d for _, d in fanout.replay()) == tail
        fanout.close()                                   # the ring outlives the run
        assert b"".join(d for _, d in fanout.replay()) == tail
    finally:
        os.close(r)
        os.close(w)
        fanout.close()


def test_output_written_a_byte_at_a_time_replays_as_one_entry_a_stream_run():
    """A replay is one data frame per entry: 64 KiB written a byte at a time (a progress
    bar, a terminal app) must not replay as 64 Ki frames."""
    from tether.sessions import OutputFanout
    fanout = OutputFanout("s")
    try:
        for i in range(3000):
            fanout.publish("stdout", b"%c" % (65 + i % 26))
        for _ in range(10):
            fanout.publish("stderr", b"!")
        for _ in range(2000):
            fanout.publish("stdout", b".")
        replay = fanout.replay()
        expected_out = bytes(65 + i % 26 for i in range(3000))
        assert replay == [("stdout", expected_out), ("stderr", b"!" * 10),
                          ("stdout", b"." * 2000)]
    finally:
        fanout.close()


def test_where_tee_comes_up_short_the_tail_is_read_and_the_ring_stays_whole(monkeypatch):
    from tether import system
    from tether.sessions import OutputFanout
    fanout = OutputFanout("s")
    r, w = _pipe()
    try:
        first = os.urandom(RING)
        os.write(w, first)
        assert fanout.keep_tail("stdout", r, RING)
        os.read(r, RING)
        real_tee = system.tee
        monkeypatch.setattr(system, "tee", lambda a, b, n, *f: real_tee(a, b, 100))
        second = os.urandom(RING)
        os.write(w, second)
        assert not fanout.keep_tail("stdout", r, RING)  # 100 bytes of it went in: dropped
        assert b"".join(d for _, d in fanout.replay()) == b""   # the whole ring is replaced
        fanout.remember("stdout", os.read(r, RING))     # what the session does then
        assert fanout.replay() == [("stdout", second)]
        monkeypatch.setattr(system, "tee", real_tee)
        third = os.urandom(RING)
        os.write(w, third)
        assert fanout.keep_tail("stdout", r, RING)      # and the tail pipe works again
        os.read(r, RING)
        assert fanout.replay() == [("stdout", third)]
    finally:
        os.close(r)
        os.close(w)
        fanout.close()
