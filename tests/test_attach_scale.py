"""The attach server at scale: more sessions than one frame can list, `stats` over a
big process tree.

The server is the real attach server on the real loop, reaper and Sessions (the agent's
parts, minus its boot steps and cgroups, so `stats` walks processes) in a child process
listening on a unix socket; the test is the client. Many sessions are exec'd ones whose
launch failed (kept, as the agent keeps them), which are cheap to make.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO, require_root, socket_paths
from tether.attach import protocol as p
from tether.attach.client import Client, ClientError

KEY = b"scale-key"

SERVER = textwrap.dedent("""
    import os, signal, sys
    from tether.loop import Loop
    from tether.reaper import Reaper
    from tether.sessions import Session
    from tether.attach.server import start_attach_server
    endpoint, key = sys.argv[1], sys.argv[2].encode()
    loop = Loop()
    reaper = Reaper(loop)
    reaper.start()

    class Host:   # what the attach server needs of the agent
        def __init__(self):
            self.loop, self.root, self.key, self.sessions = loop, "/", key, {}
        def exec_session(self, cfg):
            session = Session(cfg, loop=loop, reaper=reaper, root="/")
            self.sessions[session.id] = session
            session.start()
            return session
        def request_stop(self, reason):
            loop.stop()

    host = Host()
    server = start_attach_server(host, [endpoint])
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print("ready", flush=True)
    loop.run_forever()
    server.close(grace=0)
    for session in host.sessions.values():   # what the test started ends with it
        if session.running:
            os.killpg(session.pid, signal.SIGKILL)
""")


@pytest.fixture
def server(tmp_path):
    """The endpoint of a fresh attach server (a child process, torn down after); its
    log goes to a file (a pipe nobody reads would stall it)."""
    require_root("the server launches its sessions as root (setgroups, setuid)")
    with socket_paths("tether-scale") as socket_path, \
            open(tmp_path / "server.log", "wb") as log:
        path = socket_path()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", SERVER, "unix:" + path,
                                 KEY.decode()],
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
                proc.kill()
                proc.wait(30)


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
