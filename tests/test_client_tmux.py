"""`tether attach` in a real terminal: tmux drives the CLI against a tty `sh` session."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO, executor_config, require_tool, session_config, sid, unique
from tether.attach.client import Client

KEY = b"tmux-test-key"

class Tmux:
    """A private tmux server (its own -L socket) with one window."""

    def __init__(self, command: str, env: dict, cols: int = 100, rows: int = 30):
        self.name = unique("tether-tmux-")
        self.env = env
        self.run("-f", "/dev/null", "new-session", "-d", "-s", "main", "-x", str(cols),
                 "-y", str(rows), command)
        self.run("set-option", "-g", "status", "off")

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.name, *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def keys(self, text: str) -> None:
        self.run("send-keys", "-t", "main", "-l", text)

    def key(self, *names: str) -> None:
        self.run("send-keys", "-t", "main", *names)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "main")

    def wait_for(self, pattern: str, timeout: float = 60.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            text = self.screen()
            if len(regex.findall(text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen after {timeout}s:\n{text}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], env=self.env,
                       capture_output=True, timeout=60)


def open_and_quit_vi(tmux: Tmux) -> None:
    """vi opens full screen in the session, quits, and the shell's prompt is back."""
    name = unique("vi-file-")
    tmux.keys(f"vi /tmp/{name}")
    tmux.key("Enter")
    tmux.wait_for(r"^~", count=5)
    tmux.keys(":q!")
    tmux.key("Enter")
    tmux.wait_for(rf"vi /tmp/{name}\s*\n\$\s*$")   # back at the prompt


@pytest.fixture
def tmux_attach(sandbox, tmp_path):
    require_tool("tmux")
    made = []

    def start():
        shell = session_config(sid(), ["sh"], open_stdin=True, tty=True,
                               env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm",
                                    "PS1=$ ", "HOME=/root"])
        cfg = executor_config(shell)
        cfg.key = KEY
        sock = f"/tmp/tether-tmux-{unique()}.sock"
        box = sandbox.start(cfg, attach_socket=sock)
        box.wait_for_log(r"serving \d+ session")
        tmux = attach(sock, shell.id)
        return tmux, "unix:" + sock, shell.id

    def attach(sock: str, session: str, *options: str):
        """`tether attach` in a new tmux, on a session already running."""
        key_file = tmp_path / "key"
        key_file.write_bytes(KEY)
        env = dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm")
        env.pop("TMUX", None)
        cli = (f"cd {REPO} && {sys.executable} -m tether attach unix:{sock} {session} "
               f"--key-file {key_file} {' '.join(options)}; echo cli-exited-$?; sleep 600")
        tmux = Tmux(f"sh -c '{cli}'", env)
        made.append((tmux, sock))
        return tmux

    start.attach = attach
    yield start
    for tmux, sock in made:
        tmux.kill()
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass


def test_attach_cli_in_tmux(tmux_attach, tmp_path):
    tmux, endpoint, session = tmux_attach()
    # Typed input echoes (the session's tty echoes it), and the command runs.
    tmux.key("Enter")
    tmux.wait_for(r"^\$")
    tmux.keys("echo typed-$((6*7))")
    tmux.key("Enter")
    tmux.wait_for(r"^typed-42$")
    tmux.wait_for(r"echo typed-\$\(\(6\*7\)\)")

    # The window size follows tmux: at attach, and after a resize (SIGWINCH -> resize).
    tmux.keys("stty size")
    tmux.key("Enter")
    tmux.wait_for(r"^30 100$")
    tmux.run("resize-window", "-t", "main", "-x", "120", "-y", "40")
    tmux.keys("stty size")
    tmux.key("Enter")
    tmux.wait_for(r"^30 100$[\s\S]*^40 120$")

    # A full-screen program opens and quits.
    require_tool("vi")
    open_and_quit_vi(tmux)
    tmux.keys("echo after-vi")
    tmux.key("Enter")
    tmux.wait_for(r"^after-vi$")

    # ctrl-p ctrl-q detaches; the shell keeps running.
    tmux.key("C-p", "C-q")
    tmux.wait_for(r"read escape sequence")
    tmux.wait_for(r"cli-exited-0")
    with Client.connect(endpoint, KEY) as client:
        (state,) = client.list()
        assert state["id"] == session and state["running"]
        stream = client.attach(session)
        stream.write(b"echo still-$((40+2))\r")
        stream.read_until(b"still-42")


def test_replay_is_inert(tmux_attach, tmp_path):
    """vi's terminal queries (cursor position, device attributes, colours) are in the
    replay; the outer terminal (tmux) would answer them into the shell. Replayed, they
    are not answered, and what arrives while the replay is shown is dropped: the shell
    reads exactly what is typed."""
    require_tool("vi")
    tmux, endpoint, session = tmux_attach()
    tmux.key("Enter")
    tmux.wait_for(r"^\$")
    open_and_quit_vi(tmux)
    seen = tmp_path / "seen"
    tmux.keys(f"IFS= read -r line; printf %s \"$line\" > {seen}; echo read-done")
    tmux.key("Enter")                         # the shell now waits in read
    tmux.key("C-p", "C-q")
    tmux.wait_for(r"cli-exited-0")
    tmux.kill()

    again = tmux_attach.attach(endpoint[len("unix:"):], session, "--replay")
    again.wait_for(r"read -r line")           # the replay is on the screen
    time.sleep(1.0)                           # time for any answer to reach the shell
    again.keys("echo ok")
    again.key("Enter")
    again.wait_for(r"^read-done$")
    assert seen.read_bytes() == b"echo ok"


def test_job_control_in_an_interactive_shell(tmux_attach):
    """The session's pty is its controlling terminal: `tty` and `ps` agree on it, a job
    goes to the background and comes back with `fg`, and ctrl-c typed in the terminal
    reaches the foreground job (not the shell). The shell is sh (dash): bash would take
    the terminal as its controlling tty itself, by opening it, and so hide an agent that
    does not make it one."""
    require_tool("ps")
    tmux, _, _ = tmux_attach()
    tmux.key("Enter")
    tmux.wait_for(r"^\$")
    # Without a controlling tty, ps shows "?" for the shell.
    tmux.keys("echo tty=$(tty) ps=$(ps -o tty= -p $$)")
    tmux.key("Enter")
    tmux.wait_for(r"^tty=/dev/(pts/\d+) ps=\1\s*$")

    tmux.keys("sleep 1000 & echo job=$!")
    tmux.key("Enter")
    pid = re.search(r"^job=(\d+)\s*$", tmux.wait_for(r"^job=\d+\s*$"), re.M).group(1)
    tmux.keys("jobs")
    tmux.key("Enter")
    tmux.wait_for(r"^\[1\]\s*\+?\s*Running\s+sleep 1000")
    tmux.keys("fg")
    tmux.key("Enter")
    tmux.wait_for(r"\$ fg\s*\n\s*sleep 1000\s*$")     # the shell names the job it resumed
    time.sleep(0.5)      # let the shell hand the terminal to the job before the ctrl-c
    tmux.key("C-c")
    # Typed ahead: if the ctrl-c did not end the job, this line goes to sleep's terminal.
    tmux.keys(f"echo status=$? alive=$(kill -0 {pid} 2>/dev/null && echo yes || echo no)")
    tmux.key("Enter")
    tmux.wait_for(r"(^|\$ )status=130 alive=no\s*$")
