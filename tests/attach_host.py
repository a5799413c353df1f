"""The real attach server on the real loop, reaper and Sessions (the agent's parts, minus
its boot steps and cgroups) in a process of its own, for tests whose client is the test:

    python tests/attach_host.py ENDPOINT KEY [--copy-idle SECONDS] [--pids FILE]
                                [--cat] [--grace SECONDS]

`--cat` starts a session "cat" (stdin open) before serving; `--pids FILE` appends the pid
of each session launched (for the test to end them if it must kill this process);
`--copy-idle` sets the copy idle timeout. Prints "ready" once it listens; SIGTERM ends it,
and the sessions still running with it.
"""
import argparse
import logging
import os
import signal
import sys

from tether.attach import channels
from tether.attach.server import start_attach_server
from tether.config import Cmd, Common, SessionConfig
from tether.loop import Loop
from tether.reaper import Reaper
from tether.sessions import Session

parser = argparse.ArgumentParser()
parser.add_argument("endpoint")
parser.add_argument("key")
parser.add_argument("--copy-idle", type=float)
parser.add_argument("--pids")
parser.add_argument("--cat", action="store_true")
parser.add_argument("--grace", type=float)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
if args.copy_idle is not None:
    channels.COPY_IDLE_TIMEOUT = args.copy_idle
loop = Loop()
reaper = Reaper(loop)
reaper.start()


class Host:   # what the attach server needs of the agent
    def __init__(self):
        self.loop, self.root, self.key, self.sessions = loop, "/", args.key.encode(), {}

    def exec_session(self, cfg):
        session = Session(cfg, loop=loop, reaper=reaper, root="/")
        self.sessions[session.id] = session
        session.start()
        if session.pid and args.pids:
            with open(args.pids, "a") as pids:
                print(session.pid, file=pids)
        return session

    def request_stop(self, reason):
        loop.stop()


host = Host()
if args.cat:
    host.exec_session(SessionConfig(common=Common(id="cat"), open_stdin=True,
                                    cmd=Cmd(path="/bin/cat", args=["cat"], env=["PATH=/bin"])))
server = start_attach_server(host, [args.endpoint])
loop.add_signal_handler(signal.SIGTERM, loop.stop)
print("ready", flush=True)
loop.run_forever()
if args.grace is None:
    server.close()
else:
    server.close(grace=args.grace)
for session in host.sessions.values():   # what the test started ends with it
    if session.running:
        os.killpg(session.pid, signal.SIGKILL)
