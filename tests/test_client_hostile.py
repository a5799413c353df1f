"""The host's `tether` CLI against a hostile agent: a container that took over the VM's
PID 1 answers `tether ps`, `exec`, `attach`, `kill` and `cp` with anything it likes,
and the client runs on the user's machine, often as root.

The agent here is scripted: a real unix socket, the real handshake and frame encoder
(tether/attach/protocol.py), and a handler per test that answers each request. The CLI
runs as a user runs it, `python -m tether ...` in a process of its own.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from helpers import REPO, socket_paths
from tether.attach import protocol as p

KEY = b"hostile-key"


class ScriptedAgent:
    """Serves a unix socket as an agent would up to the welcome; after it, every message
    of the client goes to `handler(message, send)`; `send` takes a message (a dict) or
    raw bytes."""

    def __init__(self, path: str, handler):
        self.handler = handler
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = p.FrameDecoder(accept_unchecked=True)
        shake = p.ServerHandshake(KEY, allow_unchecked=True)

        def send(message) -> None:
            conn.sendall(message if isinstance(message, bytes) else p.encode(message))
        send.conn, send.decoder = conn, decoder   # for a handler that reads as it sends
        try:
            while data := conn.recv(1 << 16):
                for message in decoder.feed(data):
                    if shake.authenticated:
                        self.handler(message, send)
                    else:
                        for reply in shake.receive(message):
                            send(reply)
        except OSError:
            return

    def close(self) -> None:
        for sock in (self.listener, *self.conns):   # shutdown wakes a blocked accept/recv
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(10)
        for sock in (self.listener, *self.conns):
            sock.close()


@pytest.fixture
def hostile():
    """serve(handler) -> the endpoint of a ScriptedAgent; run(*args) -> the CLI's
    CompletedProcess (its --timeout is up to the test)."""
    agents: list[ScriptedAgent] = []
    env = dict(os.environ, PYTHONPATH=str(REPO), TETHER_KEY=KEY.decode())
    env.pop("TETHER_KEY_FILE", None)
    with socket_paths("tether-hostile") as socket_path:
        def serve(handler) -> str:
            path = socket_path()
            agents.append(ScriptedAgent(path, handler))
            return "unix:" + path

        def run(*args, timeout: float = 120, **kw):
            return subprocess.run([sys.executable, "-m", "tether", *args], cwd=REPO, env=env,
                                  capture_output=True, timeout=timeout,
                                  stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
        run.serve, run.env = serve, env
        try:
            yield run
        finally:
            for agent in agents:
                agent.close()


def answer(kind: str, **fields):
    """A handler that answers requests of `kind` with ok and `fields` (others: nothing)."""
    def handler(message, send) -> None:
        if message["t"] == kind:
            send({"t": p.OK, "ch": message["ch"], **fields})
    return handler


def assert_no_terminal_control(text: bytes) -> None:
    """Nothing a terminal would act on but the line ends: no ESC, CR, BEL, C1 control."""
    controls = {c for c in text.decode(errors="replace")
                if not c.isprintable() and c != "\n"}
    assert not controls, (controls, text)


# -- text the agent chose, printed by the CLI -------------------------------------------------
FORGED = "\x1b]0;owned\x07\x1b[2J\x1b[1A\rroot 1 running 0 forged\n\x9b31m\u202e"


def test_ps_prints_the_agents_fields_escaped(hostile):
    endpoint = hostile.serve(answer(p.LIST, sessions=[
        {"id": "web" + FORGED, "pid": 7, "status": FORGED, "started": "true" + FORGED,
         "run_state": {"Status": "running" + FORGED}}]))
    done = hostile("ps", endpoint)
    assert done.returncode == 0, done.stderr
    assert_no_terminal_control(done.stdout)
    assert done.stdout.count(b"\n") == 2            # the heading and one row: none forged
    assert b"web\\x1b]0;owned\\x07" in done.stdout and b"true\\x1b" in done.stdout


def test_an_error_the_agent_sends_is_printed_escaped_and_clipped(hostile):
    def refuse(message, send) -> None:
        send({"t": p.ERROR, "ch": message["ch"], "msg": FORGED + "x" * (1 << 19)})
    endpoint = hostile.serve(refuse)
    for args in (("ps", endpoint), ("kill", endpoint, "s1"),
                 ("exec", endpoint, "-d", "--", "true")):
        done = hostile(*args)
        assert done.returncode == 1, args
        assert_no_terminal_control(done.stderr)
        assert done.stderr.startswith(f"tether {args[0]}: ".encode()), done.stderr[:200]
        assert done.stderr.count(b"\n") == 1 and len(done.stderr) < 4096, args


def test_a_connection_error_the_agent_sends_is_printed_escaped(hostile):
    def refuse(message, send) -> None:
        send({"t": p.ERROR, "msg": FORGED})
    done = hostile("ps", hostile.serve(refuse))
    assert done.returncode == 1
    assert_no_terminal_control(done.stderr)
    assert b"the agent refused: \\x1b]0;owned" in done.stderr


def test_exec_detached_prints_the_id_the_agent_chose_escaped(hostile):
    endpoint = hostile.serve(answer(p.EXEC, id="abc" + FORGED, pid=9, tty=False))
    done = hostile("exec", endpoint, "-d", "--", "true")
    assert done.returncode == 0, done.stderr
    assert_no_terminal_control(done.stdout)
    assert done.stdout.startswith(b"abc\\x1b]0;owned")


# -- replies of the wrong shape ---------------------------------------------------------------
def session_agent(on_request):
    """A handler for an attach/exec conversation: ok to unblock, close-stdin and resize;
    `on_request(message, send)` for the rest."""
    def handler(message, send) -> None:
        if message["t"] in (p.UNBLOCK, p.CLOSE_STDIN, p.RESIZE):
            send({"t": p.OK, "ch": message["ch"]})
        elif message["t"] != p.CLOSE:
            on_request(message, send)
    return handler


def attached_then(*messages):
    """Answers attach and exec with ok, then sends `messages` on their channel."""
    def on_request(message, send) -> None:
        send({"t": p.OK, "ch": message["ch"], "id": "s1", "tty": False, "running": True})
        for extra in messages:
            send({"ch": message["ch"], **extra})
    return session_agent(on_request)


MALFORMED = {
    "ch-a-list": (("ps",), lambda m, send: send({"t": p.OK, "ch": [m["ch"]]})),
    "ch-a-map": (("ps",), lambda m, send: send({"t": p.OK, "ch": {"a": 1}})),
    "no-sessions": (("ps",), answer(p.LIST)),
    "sessions-a-string": (("ps",), answer(p.LIST, sessions="abc")),
    "session-a-number": (("ps",), answer(p.LIST, sessions=[1, 2])),
    "fields-of-any-type": (("ps",), answer(p.LIST, sessions=[
        {"id": 5, "pid": [1], "status": {"a": 1}, "run_state": "x", "started": None}])),
    "json-of-bytes": (("ps", "--json"), answer(p.LIST, sessions=[{"id": b"\x00\xff"}])),
    "json-nested-deep": (("ps", "--json"), answer(p.LIST, sessions=[{"id": "deep"}],
                                                   x=1, next=None)),
    "exec-without-id": (("exec", "-d", "--", "true"), answer(p.EXEC, pid=3)),
    "exec-id-a-map": (("exec", "-d", "--", "true"), answer(p.EXEC, id={"a": 1})),
    "exec-attached-without-id": (("exec", "--", "true"), answer(p.EXEC, pid=3)),
    "kill-without-signal": (("kill", "s1"), answer(p.SIGNAL)),
    "exit-code-a-string": (("attach", "s1"), attached_then({"t": p.EXIT, "code": "zero"})),
    "exit-code-a-list": (("exec", "--", "true"), attached_then({"t": p.EXIT, "code": [0]})),
    "data-of-a-number": (("attach", "s1"), attached_then({"t": p.DATA, "s": "stdout",
                                                         "d": 12})),
    "data-without-d": (("attach", "s1"), attached_then({"t": p.DATA, "s": "stderr"})),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_reply_is_a_clear_error_not_a_traceback(hostile, case, tmp_path):
    args, handler = MALFORMED[case]
    if case == "json-nested-deep":
        deep = [None]
        for _ in range(990):   # msgpack reads it; json.dumps(indent=2) recurses on it
            deep = [deep]
        handler = answer(p.LIST, sessions=[{"id": "deep", "x": deep}])
    endpoint = hostile.serve(handler)
    done = hostile(args[0], "--timeout", "5", endpoint, *args[1:])
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    if case == "fields-of-any-type":   # shown as they are, by type when not text
        assert done.returncode == 0 and b"(a list)" in done.stdout, done
        return
    if case == "json-of-bytes":
        assert done.returncode == 0, done
        assert json.loads(done.stdout) == [{"id": "\x00\ufffd"}]
        return
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"tether {args[0]}: ".encode()), done.stderr
    assert done.stderr.count(b"\n") == 1, done.stderr


def test_a_data_message_cannot_pass_for_the_exit(hostile):
    """A data message's stream name is the agent's to choose: 'exit' is no exit."""
    endpoint = hostile.serve(attached_then({"t": p.DATA, "s": "exit", "d": b"7"},
                                           {"t": p.DATA, "s": "stdout", "d": b"out\n"},
                                           {"t": p.EXIT, "code": 3}))
    done = hostile("attach", endpoint, "s1")
    assert (done.returncode, done.stdout) == (3, b"out\n"), done


# -- what the agent can make the client spend -------------------------------------------------
def test_pages_that_never_end_are_cut_short(hostile):
    """An agent can answer every page with a `next` past the last: the client asks for
    at most MAX_PAGES pages, then says so, rather than listing (and holding) forever."""
    from tether.attach.client import MAX_PAGES
    asked = []

    def endless(message, send) -> None:
        after = message.get("after") or ""
        asked.append(after)
        send({"t": p.OK, "ch": message["ch"], "sessions": [{"id": after + "a"}],
              "next": after + "a"})
    done = hostile("ps", "--timeout", "5", hostile.serve(endless), timeout=60)
    assert done.returncode == 1 and b"pages" in done.stderr, done
    assert len(asked) == MAX_PAGES


# -- the user's terminal ----------------------------------------------------------------------
def tty_agent(resize: str):
    """Attach answered as a tty session's; resize answered by `resize`: ok, refused or
    never answered."""
    def on_request(message, send) -> None:
        if message["t"] == p.ATTACH:
            send({"t": p.OK, "ch": message["ch"], "tty": True, "running": True, "pid": 5})

    def handler(message, send) -> None:
        if message["t"] == p.RESIZE and resize != "ok":
            if resize == "refused":
                send({"t": p.ERROR, "ch": message["ch"], "msg": "resize: no"})
            return
        session_agent(on_request)(message, send)
    return handler


def attach_on_a_terminal(hostile, endpoint: str, *, then=None):
    """`tether attach` with a pty (sized 24x80) as its terminal; `then(proc, slave)` runs
    while it is attached. (exit status, stderr, the terminal's modes before, after)."""
    import pty
    import termios
    master, slave = pty.openpty()
    try:
        fcntl_winsize(slave, 24, 80)
        before = termios.tcgetattr(slave)
        proc = subprocess.Popen([sys.executable, "-m", "tether", "attach", "--timeout", "3",
                                 endpoint, "s1"], stdin=slave, stdout=slave,
                                stderr=subprocess.PIPE, cwd=REPO, env=hostile.env)
        try:
            if then is not None:
                then(proc, slave)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return proc.returncode, err, before, termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)


def fcntl_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@pytest.mark.parametrize("resize", ["refused", "unanswered"])
def test_a_failed_first_resize_leaves_the_terminal_as_it_was(hostile, resize):
    """The terminal goes raw, then its size is sent: an agent that refuses the resize, or
    never answers it, ends the attach, and the terminal must not stay raw."""
    code, err, before, after = attach_on_a_terminal(hostile, hostile.serve(tty_agent(resize)))
    assert code == 1 and err.startswith(b"tether attach: "), err
    assert after == before


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_attached_leaves_the_terminal_as_it_was(hostile, signame):
    import signal
    import termios
    import time
    signum = getattr(signal, signame)

    def when_raw(proc, slave) -> None:
        deadline = time.monotonic() + 30
        while termios.tcgetattr(slave)[3] & termios.ICANON:   # until it went raw
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.01)
        proc.send_signal(signum)
    code, err, before, after = attach_on_a_terminal(hostile, hostile.serve(tty_agent("ok")),
                                                    then=when_raw)
    assert after == before
    assert code == 128 + signum, err


# -- tether cp out of the guest ---------------------------------------------------------------
def tar_of(members, compression: str = "") -> bytes:
    """A tar of (name, type, data or link target) members."""
    import io
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:" + compression, format=tarfile.PAX_FORMAT) as arc:
        for name, kind, content in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            if kind == tarfile.REGTYPE:
                info.size = len(content)
                arc.addfile(info, io.BytesIO(content))
            else:
                info.linkname = content or ""
                arc.addfile(info)
    return out.getvalue()


def sends_tar(stream: bytes):
    """Answers copy-from with a directory's reply and `stream` as its tar."""
    def handler(message, send) -> None:
        if message["t"] == p.COPY_FROM:
            send({"t": p.OK, "ch": message["ch"], "kind": "tar", "size": None, "mode": 0o755})
            for frame in p.encode_data(message["ch"], stream, "stdout"):
                send(frame)
            send({"t": p.EOF, "ch": message["ch"]})
            send({"t": p.CLOSE, "ch": message["ch"]})
    return handler


def past_path_max(dest: str) -> list:
    """Members whose links resolve outside `dest` only past PATH_MAX: a check of each
    name with os.path.realpath (tarfile's data filter before CPython's fix of
    CVE-2025-4517) stops resolving there, sees them inside, and lets `out/escaped` be
    written in dest's parent."""
    import tarfile
    levels = "abcdefghijklmnop"
    component = "d" * ((4096 - len(dest) - 1) // (len(levels) + 1))
    members, at = [], ""
    for level in levels:
        members += [(os.path.join(at, component), tarfile.DIRTYPE, None),
                    (os.path.join(at, level), tarfile.SYMTYPE, component)]
        at = os.path.join(at, component)
    deep = os.path.join(*levels, "l" * 254)
    members += [(deep, tarfile.SYMTYPE, os.path.join(*[".."] * len(levels))),
                ("out", tarfile.SYMTYPE, os.path.join(deep, "..")),
                ("out/escaped", tarfile.REGTYPE, b"written outside\n")]
    return members


def test_a_tar_copied_out_never_writes_outside_the_destination(hostile, tmp_path):
    import tarfile
    dest = tmp_path / "dest"
    cases = {"past PATH_MAX": past_path_max(str(dest)),
             "through an outward link": [("up", tarfile.SYMTYPE, ".."),
                                         ("up/escaped", tarfile.REGTYPE, b"x")],
             "dot-dot": [("../escaped", tarfile.REGTYPE, b"x")],
             "hard link out": [("hard", tarfile.LNKTYPE, "../escaped")]}
    for case, members in cases.items():
        done = hostile("cp", f"{hostile.serve(sends_tar(tar_of(members)))}::/dir", str(dest))
        assert b"Traceback" not in done.stderr, (case, done.stderr.decode())
        assert sorted(os.listdir(tmp_path)) == ["dest"], (case, done)


def test_a_compressed_tar_is_refused_not_expanded(hostile, tmp_path):
    """The agent sends a directory as a plain tar; a compressed stream would be a bomb
    on the user's disk: a few hundred bytes of bzip2 make a file of any size."""
    import tarfile
    bomb = tar_of([("zeros", tarfile.REGTYPE, bytes(16 << 20))], "bz2")
    assert len(bomb) < 4096
    dest = tmp_path / "dest"
    done = hostile("cp", f"{hostile.serve(sends_tar(bomb))}::/dir", str(dest))
    assert done.returncode == 1 and b"compressed" in done.stderr, done
    assert not (dest / "zeros").exists()


def test_a_stream_that_is_no_tar_is_a_clear_error(hostile, tmp_path):
    done = hostile("cp", f"{hostile.serve(sends_tar(b'no tar here' * 200))}::/dir",
                   str(tmp_path / "dest"))
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.stderr.startswith(b"tether cp: ") and done.stderr.count(b"\n") == 1


def test_a_file_copied_out_stops_at_the_size_the_agent_announced(hostile, tmp_path):
    """A file's reply says its size; an agent that then sends on without end must not
    fill the user's disk (the client spools what it receives): the client stops at the
    first byte past the size, and nothing of it is kept."""
    chunk = bytes(1 << 20)
    pushed = []

    def overflowing(message, send) -> None:
        if message["t"] != p.COPY_FROM:
            return
        send({"t": p.OK, "ch": message["ch"], "kind": "file", "size": 10, "mode": 0o644})
        try:
            for _ in range(256):   # "without end", bounded so a failing run ends
                for frame in p.encode_data(message["ch"], chunk, "stdout", checked=False):
                    send(frame)
                pushed.append(len(chunk))
        except OSError:
            pass                   # the client hung up
        else:
            send({"t": p.EOF, "ch": message["ch"]})
    target = tmp_path / "file"
    done = hostile("cp", f"{hostile.serve(overflowing)}::/file", str(target))
    assert done.returncode == 1 and b"more than the 10 bytes" in done.stderr, done
    assert not target.exists()
    assert sum(pushed) < 64 << 20, "the client took what came past the size"


# -- tether cp into the guest -----------------------------------------------------------------
def test_data_pushed_at_a_copy_in_is_not_held_by_the_client(hostile, tmp_path):
    """While the client sends a file, it reads what the agent sends (so neither side can
    deadlock). An agent that reads slowly and pushes data on the copy's channel (where
    none belongs) must not make the client hold it: here 1 MiB pushed per 64 KiB read,
    512 MiB in all for a 32 MiB file, measured by the client's peak RSS."""
    frame = b"".join(p.encode_data(1, bytes(1 << 20), "stdout", checked=False))

    def flooding(message, send) -> None:
        if message["t"] != p.COPY_TO:
            return
        send({"t": p.OK, "ch": message["ch"]})
        flood = frame.replace(p.data_header(1, 1 << 20), p.data_header(message["ch"], 1 << 20))
        received, ended = 0, False
        for _ in range(512):
            send(flood)
            data = send.conn.recv(64 << 10)
            for got in send.decoder.feed(data):
                received += len(got.get("d") or b"")
                ended = ended or got["t"] == p.EOF
        while not ended:
            data = send.conn.recv(1 << 20)
            if not data:
                return
            for got in send.decoder.feed(data):
                received += len(got.get("d") or b"")
                ended = ended or got["t"] == p.EOF
        send({"t": p.OK, "ch": message["ch"], "size": received})

    source = tmp_path / "source.bin"
    source.write_bytes(bytes(32 << 20))
    measured = ("import sys\nsys.path.insert(0, 'tests')\nfrom helpers import peak_rss_kib\n"
                "from tether.cli import main\ncode = main(sys.argv[1:])\n"
                "print(peak_rss_kib(), file=sys.stderr)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", measured, "cp", str(source),
                           f"{hostile.serve(flooding)}::/file"], cwd=REPO, env=hostile.env,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    *_, peak_kib = done.stderr.split()
    assert done.returncode == 0, done.stderr.decode()
    assert int(peak_kib) < 200 << 10, f"the client grew to {int(peak_kib) >> 10} MiB"


# -- tether ports on a guestinfo the guest wrote to -------------------------------------------
def test_ports_prints_names_from_the_guestinfo_escaped(tmp_path):
    """`tether ports` reads the `--out` of `tether vm`, which holds what the guest wrote
    (it may set any key, and the list of networks is a value): a network's name is
    shown escaped in the table and in an error."""
    encoded = subprocess.run([sys.executable, "-m", "tether", "config", "encode",
                              str(REPO / "examples" / "static-network.json")], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
    guestinfo = tmp_path / "guestinfo.vmx"
    guestinfo.write_text(encoded.replace("bridge", "br\x1b]0;owned\x07\x1b[2Jx"))
    for args in ((str(guestinfo),), (str(guestinfo), "nosuch")):
        done = subprocess.run([sys.executable, "-m", "tether", "ports", *args], cwd=REPO,
                              capture_output=True)
        assert_no_terminal_control(done.stdout + done.stderr)
        assert b"br\\x1b]0;owned" in done.stdout + done.stderr, done
