"""The attach server at scale and against clients that hold what they took: more
sessions than one frame can list, `stats` over a big process tree, copies whose client
went quiet.

The server is the real attach server on the real loop, reaper and Sessions (the agent's
parts, minus its boot steps and cgroups, so `stats` walks processes) in a child process
listening on a unix socket; the test is the client. Many sessions are exec'd ones whose
launch failed (kept, as the agent keeps them), which are cheap to make.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, require_root, socket_paths
from tether.attach import protocol as p
from tether.attach.client import Client, ClientError

KEY = b"scale-key"
COPY_IDLE = 2.0     # the server's copy idle timeout in these tests (seconds)

SERVER = str(REPO / "tests" / "attach_host.py")


@pytest.fixture
def server(tmp_path):
    """The endpoint of a fresh attach server (a child process, torn down after); its
    log goes to a file (a pipe nobody reads would stall it)."""
    require_root("the server launches its sessions as root (setgroups, setuid)")
    with socket_paths("tether-scale") as socket_path, \
            open(tmp_path / "server.log", "wb") as log:
        path = socket_path()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        pids = tmp_path / "session.pids"
        proc = subprocess.Popen([sys.executable, SERVER, "unix:" + path, KEY.decode(),
                                 "--copy-idle", str(COPY_IDLE), "--pids", str(pids),
                                 "--grace", "0"],
                                stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO)
        try:
            assert proc.stdout.readline() == b"ready\n", \
                (tmp_path / "server.log").read_text()
            yield "unix:" + path
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()   # its sessions outlive it: end them (each its own group)
                proc.wait(30)
                for pid in pids.read_text().split() if pids.exists() else ():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(int(pid), signal.SIGKILL)


def exec_failing(client: Client, count: int, prefix: str) -> list[str]:
    """`count` execs of a program that is not there, pipelined: each leaves a failed
    session (255-byte ID) behind. Returns their IDs."""
    ids, channels = [], []
    for n in range(count):
        ident = f"{prefix}{n:06d}".ljust(255, "x")
        channel = client.open_channel()
        client.send({"t": p.EXEC, "ch": channel, "args": ["/nonexistent"], "id": ident,
                     "attach": False})
        ids.append(ident)
        channels.append(channel)
    for channel in channels:
        reply = client.next_message(channel, 60)
        assert reply is not None and reply["t"] == p.ERROR and "stat" in reply["msg"], reply
        client.release_channel(channel)
    return ids


def test_list_and_stats_answer_for_more_sessions_than_one_frame_holds(server):
    """3,600 sessions: a `list` reply is about 3 MiB and a `stats` one 1.2 MiB, over
    the 1 MiB frame limit: both failed for everyone ("message of N bytes is over the
    1048576 limit"). The client now asks for pages; a client that asks for everything
    at once gets a clear error instead."""
    with Client.connect(server, KEY, timeout=60) as client:
        running = client.exec(["/bin/sleep", "1000"], id="sleeper", attach=False)["id"]
        ids = exec_failing(client, 3600, "f")
        listed = client.list()
        assert [s["id"] for s in listed] == sorted([running, *ids])
        assert {s["id"]: s["run_state"]["Status"] for s in listed}[running] == "running"
        stats = client.stats()
        assert set(stats["sessions"]) == {running, *ids}
        assert stats["sessions"][running]["running"] and stats["cpus"] >= 1
        for kind in (p.LIST, p.STATS):
            with pytest.raises(ClientError, match="do not fit one reply.*'after'"):
                client.request(kind)             # an old client: no paging
        assert client.ping("still here")["data"] == "still here"


def test_a_page_is_the_sessions_after_the_one_named(server):
    with Client.connect(server, KEY, timeout=60) as client:
        ids = sorted(exec_failing(client, 5, "g"))
        page = client.request(p.LIST, after=ids[1])
        assert [s["id"] for s in page["sessions"]] == ids[2:] and page["next"] is None
        page = client.request(p.STATS, after=ids[3])
        assert list(page["sessions"]) == ids[4:] and page["next"] is None
        assert client.request(p.LIST, after="")["sessions"][0]["id"] == ids[0]
        with pytest.raises(ClientError, match="'after' must be str"):
            client.request(p.LIST, after=7)


PROCESSES = 300
FORK_TREE = (f"i=0; while [ $i -lt {PROCESSES} ]; do sleep 1000 & i=$((i+1)); done; "
             "echo forked; wait")


def test_stats_walks_processes_off_the_loop(server):
    """`stats` walked each session's process tree with psutil on the loop (a session
    without cgroup figures): a container of many processes stalled every session's I/O
    meanwhile. The walk now runs on a worker thread: a `ping` sent right behind a `stats`
    (in the same write, so read at once) is answered first, and the figures are still
    the whole tree's."""
    with Client.connect(server, KEY, timeout=60) as client:
        stream = client.exec(["/bin/sh", "-c", FORK_TREE], id="tree")
        stream.read_until(b"forked", timeout=60)
        stats_channel, ping_channel = client.open_channel(), client.open_channel()
        client._send(p.encode({"t": p.STATS, "ch": stats_channel})
                     + p.encode({"t": p.PING, "ch": ping_channel, "data": 1}))
        replies = []                    # in the order they came
        while len(replies) < 2:
            replies += [m for m in client._read(time.monotonic() + 60, "the replies")
                        if m.get("ch") in (stats_channel, ping_channel)]
        order = [m["ch"] for m in replies]
        assert order == [ping_channel, stats_channel]
        assert replies[1]["t"] == p.OK, replies[1]
        entry = replies[1]["sessions"]["tree"]
        assert entry["pids"] == PROCESSES + 1 and entry["rss"] > 0, entry
        stream.signal("KILL")


def stopped_with(client: Client, channel: int) -> str:
    """The error that ended a stalled copy's channel, after what it had sent."""
    while True:
        message = client.next_message(channel, 60)
        assert message is not None, "the copy was not stopped"
        if message["t"] == p.ERROR:
            return message["msg"]
        assert message["t"] in (p.OK, p.DATA), message


def wait_for_log(path, text: str, count: int, wait: float = 20) -> None:
    deadline = time.monotonic() + wait
    while path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not {count} times in the log"
        time.sleep(0.05)


def open_copy_to(client: Client, path: str, wait: float = 10) -> int:
    """A copy-to channel, asked for again while the agent has no copy slot free."""
    deadline = time.monotonic() + wait
    while True:
        channel = client.open_channel()
        client.send({"t": p.COPY_TO, "ch": channel, "path": path})
        reply = client.next_message(channel, 60)
        if reply["t"] == p.OK:
            return channel
        client.release_channel(channel)
        assert "copies are already running" in reply["msg"], reply
        assert time.monotonic() < deadline, "the stopped copies kept their slots"
        time.sleep(0.1)


def test_idle_copies_give_their_slots_back(server, tmp_path):
    """A copy started and then left alone (nothing sent to a copy-to, nothing read of a
    copy-from) kept one of the 16 copy slots for as long as its client stayed
    connected: 16 of them locked `tether cp` out for everyone, for ever. A copy whose
    client has not moved its data for the idle timeout is now stopped with an error
    saying so, and its slot is free again."""
    copies = tmp_path / "copies"
    copies.mkdir()
    big = copies / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)            # more than the socket, the backlog and read-ahead
    stalled: list[tuple[Client, int, str]] = []
    clients: list[Client] = []
    try:
        for _ in range(2):
            clients.append(Client.connect(server, KEY, timeout=60))
        senders, readers = clients      # copy-to, then nothing; copy-from, never read
        for n in range(16):
            client, kind = (senders, p.COPY_TO) if n % 2 else (readers, p.COPY_FROM)
            channel = client.open_channel()
            fields = {"path": str(copies / f"to{n}")} if kind == p.COPY_TO else \
                {"path": str(big)}
            client.send({"t": kind, "ch": channel, **fields})
            if kind == p.COPY_TO:
                assert client.next_message(channel, 60)["t"] == p.OK
            stalled.append((client, channel, kind))
        wait_for_log(tmp_path / "server.log", "the copy was stopped", 16)
        # 16 copies at once again: the stalled ones' slots are free
        late = Client.connect(server, KEY, timeout=60)
        clients.append(late)
        opened = [open_copy_to(late, str(copies / f"late{n}")) for n in range(16)]
        for n, channel in enumerate(opened):
            late.send({"t": p.DATA, "ch": channel, "s": "stdin", "d": b"in at last %d" % n})
            late.send({"t": p.EOF, "ch": channel})
        for n, channel in enumerate(opened):
            assert late.next_message(channel, 60)["t"] == p.OK
            assert (copies / f"late{n}").read_bytes() == b"in at last %d" % n
        for client, channel, kind in stalled:
            what = "sent nothing" if kind == p.COPY_TO else "took nothing"
            assert f"the client {what} for {COPY_IDLE:g}s: the copy was stopped" in \
                stopped_with(client, channel)
    finally:
        for client in clients:
            client.close()
    # no half-written copy left behind
    assert sorted(os.listdir(copies)) == sorted(["big", *(f"late{n}" for n in range(16))])
