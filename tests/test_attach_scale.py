"""The attach server at scale: `stats` over a big process tree.

The server is the real attach server on the real loop, reaper and Sessions (the agent's
parts, minus its boot steps and cgroups, so `stats` walks processes) in a child process
listening on a unix socket; the test is the client.
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
from tether.attach.client import Client

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
