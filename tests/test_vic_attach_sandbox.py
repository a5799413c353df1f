"""VIC attach acceptance: the real agent in `tether sandbox --vic-attach`, driven as the
reference's port layer drives a tether -- sync handshake, then SSH -- by an independent
client (tests/vicssh_client.py: the handshake written out in bytes, SSH from paramiko)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from helpers import executor_config, session_config, sid, socket_paths
import vicssh_client as vc
from tether.sessions import Phase

SH = ["/bin/sh", "-c"]
box_keys: dict = {}      # sandbox -> the Key its config carries


def port_layer_key() -> bytes:
    """A key as the port layer makes one: 512-bit RSA, PEM "RSA PRIVATE KEY"."""
    run = subprocess.run(["openssl", "genrsa", "-traditional", "512"], capture_output=True,
                         check=True)
    assert run.stdout.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    return run.stdout


@pytest.fixture(scope="module")
def key() -> bytes:
    return port_layer_key()


@pytest.fixture
def vic(sandbox, key):
    """start(primary, *others, extra=()) -> (box, socket path)."""
    with socket_paths("tether-vic") as socket_path:
        def start(primary, *others, extra=(), with_key=True):
            cfg = executor_config(primary, *others)
            cfg.key = key if with_key else None
            path = socket_path()
            box = sandbox.start(cfg, extra_args=["--vic-attach", path, *extra])
            box_keys[box] = cfg.key or b""
            box.wait_for_log(r"serving \d+ session")
            return box, path
        yield start


def cat_session(**fields):
    return session_config(sid(), ["/bin/cat"], attach=True, open_stdin=True, **fields)


def test_handshake_with_leading_garbage_version_and_ids(vic):
    primary, other = cat_session(), cat_session()
    box, path = vic(primary, other)
    client = vc.connect(path, garbage=b"\x00\x15 stale port-layer bytes \x16\x16\x06\xff")
    try:
        assert client.attempts == 1      # the garbage before the SYN cost nothing
        assert client.version() == 10
        assert client.container_ids() == sorted([primary.id, other.id])
        ok, text = client.global_request("no-such-request")
        assert not ok and text == b"unknown global request type: no-such-request"
    finally:
        client.close()
    assert re.search(r"in sync \(head handshake\)", box.log_text())


def test_attach_cat_echoes_bytes_and_escapes(vic):
    primary = cat_session()
    box, path = vic(primary)
    client = vc.connect(path)
    try:
        chan = client.attach(primary.id)
        payload = b"plain \x1b[1;31mred\x1b[0m \x00\x01\xfe\xff tab\t\r\n"
        chan.sendall(payload)
        assert vc.read_until(chan, lambda d: d.endswith(b"tab\t\r\n")) == payload
        assert client.request(chan, "ping", b"Ping") is True
        assert client.request(chan, "ping", b"Pong") is False
        # not a tty: no window change
        assert client.resize(chan, 100, 40) is False
    finally:
        client.close()


def test_stderr_is_extended_data(vic):
    primary = session_config(
        sid(), SH + ['while read l; do echo "out:$l"; echo "err:$l" >&2; done'],
        attach=True, open_stdin=True)
    box, path = vic(primary)
    client = vc.connect(path)
    try:
        chan = client.attach(primary.id)
        chan.sendall(b"one\n")
        assert vc.read_until(chan, lambda d: d.endswith(b"\n")) == b"out:one\n"
        assert vc.read_until(chan, lambda d: d.endswith(b"\n"), stderr=True) == b"err:one\n"
    finally:
        client.close()


def test_window_change_sets_the_tty_size(vic):
    primary = session_config(sid(), ["/bin/sh"], attach=True, open_stdin=True, tty=True,
                             env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PS1=$ "])
    box, path = vic(primary)
    client = vc.connect(path)
    try:
        chan = client.attach(primary.id)
        assert client.resize(chan, 123, 45) is True
        chan.sendall(b"stty size\n")
        assert b"45 123" in vc.read_until(chan, lambda d: b"45 123" in d)
        assert client.resize(chan, 81, 27) is True
        chan.sendall(b"stty size\n")
        assert b"27 81" in vc.read_until(chan, lambda d: b"27 81" in d)
    finally:
        client.close()


def test_close_stdin_ends_sort(vic):
    sorter = session_config(sid(), ["/usr/bin/sort"], attach=True, open_stdin=True)
    keeper = cat_session()
    box, path = vic(keeper, sorter)
    client = vc.connect(path)
    try:
        chan = client.attach(sorter.id)
        chan.sendall(b"pear\napple\nzebra\nmango\n")
        # EOF alone is a detach: stdin stays open (the process does not end)
        assert client.request(chan, "close-stdin") is True
        chan.shutdown_write()
        assert vc.read_all(chan) == b"apple\nmango\npear\nzebra\n"
    finally:
        client.close()
    box.wait_for_log(rf"session {sorter.id} \(pid \d+\) exited 0", timeout=30)


def test_eof_without_close_stdin_keeps_stdin_open(vic):
    primary = cat_session()
    box, path = vic(primary)
    client = vc.connect(path)
    try:
        chan = client.attach(primary.id)
        vc.echoed(chan, b"first\n")
        chan.shutdown_write()       # a detaching reader, not the end of stdin
        chan.close()
        chan = client.attach(primary.id)
        vc.echoed(chan, b"second\n")
    finally:
        client.close()


def test_unblock_releases_runblock_and_writes_it_back(vic):
    primary = session_config(sid(), SH + ["echo started; exec cat"], attach=True,
                             open_stdin=True, run_block=True)
    box, path = vic(primary)
    box.wait_for_log(rf"session {primary.id} waits for an attach")
    client = vc.connect(path)
    try:
        assert client.container_ids() == [primary.id]
        chan = client.attach(primary.id)
        time.sleep(0.3)
        assert "started: pid" not in box.log_text()     # still held
        assert client.request(chan, "unblock", b"nope") is False
        assert client.request(chan, "unblock", b"Unblock") is True
        # attached before the launch: nothing the process says is lost
        assert vc.read_until(chan, lambda d: d.endswith(b"started\n")) == b"started\n"
        vc.echoed(chan, b"after\n")
    finally:
        client.close()
    box.signal(15)
    result = box.wait()
    runblock_key = f"guestinfo.vice..sessions|{primary.id}.runblock"
    assert result.guestinfo.get(runblock_key) == "false", sorted(result.guestinfo)


def test_refusals_carry_the_reference_texts(vic):
    failing = session_config(sid(), ["/no/such/program"], attach=True)
    finished = session_config(sid(), SH + ["exit 7"], attach=True)
    primary = cat_session()
    box, path = vic(primary, failing, finished)
    box.wait_for_log(rf"session {finished.id} \(pid \d+\) exited 7", timeout=30)
    client = vc.connect(path)
    try:
        with pytest.raises(vc.Refused) as refused:
            client.attach("no-such-session")
        assert (refused.value.code, refused.value.text) == (1, "session no-such-session is invalid")
        with pytest.raises(vc.Refused) as refused:
            client.attach(failing.id)
        assert refused.value.code == 1
        assert refused.value.text.startswith("launch failed with: ")
        assert "/no/such/program" in refused.value.text
        with pytest.raises(vc.Refused) as refused:
            client.attach(finished.id)
        assert (refused.value.code, refused.value.text) == (
            1, "process finished with exit code: 7")
        with pytest.raises(vc.Refused) as refused:
            client.attach("")
        assert refused.value.text == "attach channel requires ID in ExtraData"
        # container-ids: HEAD leaves out what has stopped
        assert finished.id not in client.container_ids()
        # and the connection still serves
        chan = client.attach(primary.id)
        vc.echoed(chan, b"still here\n")
    finally:
        client.close()


def test_101_attach_detach_cycles_and_two_channels(vic):
    primary = cat_session()
    box, path = vic(primary)
    pid = box.agent_pid()
    client = vc.connect(path)
    try:
        watcher = client.attach(primary.id)      # sees everything the others type
        fds_before = len(os.listdir(f"/proc/{pid}/fd"))
        seen = b""
        for i in range(101):
            chan = client.attach(primary.id)
            line = f"cycle {i}\n".encode()
            vc.echoed(chan, line)
            chan.close()
            seen += line
        assert vc.read_until(watcher, lambda d: d == seen) == seen
        assert len(os.listdir(f"/proc/{pid}/fd")) <= fds_before + 2
        assert box.log_text().count("attached to") == 102
    finally:
        client.close()
    # and again on fresh connections (a reattach after the port layer went away)
    for i in range(3):
        client = vc.connect(path)
        try:
            chan = client.attach(primary.id)
            vc.echoed(chan, b"again\n")
        finally:
            client.close()


def test_vic_and_msgpack_clients_share_the_session(vic):
    """The same Session and output fan-out: input from either protocol reaches the
    process, its output reaches both."""
    from tether.attach.client import Client
    primary = cat_session()
    with socket_paths("tether-attach") as socket_path:
        msgpack_path = socket_path()
        box, path = vic(primary, extra=["--attach-socket", msgpack_path])
        client = vc.connect(path)
        with Client.connect("unix:" + msgpack_path, primary_key(box)) as other:
            stream = other.attach(primary.id)
            chan = client.attach(primary.id)
            chan.sendall(b"from ssh\n")
            stream.read_until(b"from ssh\n", timeout=20)
            vc.read_until(chan, lambda d: d == b"from ssh\n")
            stream.write(b"from msgpack\n")
            vc.read_until(chan, lambda d: d == b"from msgpack\n")
            stream.read_until(b"from msgpack\n", timeout=20)
        client.close()


def primary_key(box) -> bytes:
    """The Key the sandbox's config carries (the msgpack protocol's HMAC key)."""
    return box_keys[box]


def test_auto_handshake_answers_both_versions(vic):
    primary = cat_session()
    box, path = vic(primary, extra=["--vic-handshake", "auto"])
    for variant in ("head", "v0.9", "head"):
        client = vc.connect(path, variant=variant)
        try:
            assert client.container_ids() == [primary.id]
        finally:
            client.close()
    assert "in sync (v0.9 handshake)" in box.log_text()
    assert "in sync (head handshake)" in box.log_text()


def test_v09_handshake_when_asked(vic):
    primary = cat_session()
    box, path = vic(primary, extra=["--vic-handshake", "v0.9"])
    client = vc.connect(path, variant="v0.9")
    try:
        assert client.container_ids() == [primary.id]
    finally:
        client.close()


def test_other_users_are_refused(vic):
    import paramiko
    primary = cat_session()
    box, path = vic(primary)
    with pytest.raises(paramiko.AuthenticationException):
        vc.connect(path, user="root")


def test_client_key_auth_when_asked(vic, key, tmp_path):
    import io
    import paramiko
    primary = cat_session()
    box, path = vic(primary, extra=["--vic-auth", "key"])
    with pytest.raises(paramiko.AuthenticationException):
        vc.connect(path)                      # the reference's port layer: no credentials
    other = paramiko.RSAKey.generate(1024)
    with pytest.raises(paramiko.AuthenticationException):
        vc.connect(path, pkey=other)
    client = vc.connect(path, pkey=paramiko.RSAKey.from_private_key(io.StringIO(key.decode())))
    try:
        assert client.container_ids() == [primary.id]
    finally:
        client.close()


def test_tether_attach_vic_command(vic):
    import sys
    from helpers import REPO
    primary, other = cat_session(), cat_session()
    box, path = vic(primary, other)
    command = [sys.executable, "-m", "tether", "attach", "--vic", f"unix:{path}"]
    listing = subprocess.run(command, capture_output=True, timeout=60, cwd=REPO)
    assert listing.stdout.decode().split() == sorted([primary.id, other.id]), listing
    # stdin to the session; at its end close-stdin, so cat ends and the attach with it
    run = subprocess.run(command + [other.id], input=b"via the command \x1b[7mrev\x1b[0m\n",
                         capture_output=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"via the command \x1b[7mrev\x1b[0m\n"
    refused = subprocess.run(command + ["nope"], capture_output=True, timeout=60, cwd=REPO)
    assert refused.returncode == 1
    assert b"session nope is invalid" in refused.stderr


def test_input_for_a_process_not_reading_holds_the_host_back_not_dropped(vic, tmp_path):
    """The reference's write to a process's stdin blocks, and the host's SSH window with
    it. Input the process does not read yet waits in the channel's window, not in the
    agent: none is dropped however much is sent (the agent used to keep 4 MiB and drop
    the rest)."""
    import threading
    flag = tmp_path / "read-now"
    counter = session_config(sid(), ["/bin/sh", "-c", f"while [ ! -e {flag} ]; do "
                                     "sleep 0.05; done; exec wc -c"],
                             attach=True, open_stdin=True)
    box, path = vic(cat_session(), counter)
    client = vc.connect(path)
    size = 12 << 20
    try:
        chan = client.attach(counter.id)
        sent = threading.Event()

        def send():
            chan.sendall(b"x" * size)
            sent.set()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sent.wait(5.0)           # unheld, all of it is taken well within this
        flag.touch()
        sender.join(60)
        assert sent.is_set()
        assert client.request(chan, "close-stdin") is True
        chan.shutdown_write()
        assert vc.read_all(chan, timeout=60).strip() == str(size).encode()
    finally:
        client.close()
    assert "dropping input" not in box.log_text()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_tether_attach_vic_ended_by_a_signal_leaves_the_terminal_as_it_was(vic, signame):
    """`tether attach --vic` puts the terminal raw for a tty session; SIGTERM or SIGHUP
    used to kill it there, leaving the user's terminal raw (no echo, no line editing)."""
    import os
    import pty
    import signal
    import sys
    import termios
    import time
    from helpers import REPO
    signum = getattr(signal, signame)
    primary = cat_session(tty=True)
    box, path = vic(primary)
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        proc = subprocess.Popen([sys.executable, "-m", "tether", "attach", "--vic",
                                 f"unix:{path}", primary.id], stdin=slave, stdout=slave,
                                stderr=subprocess.PIPE, cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while termios.tcgetattr(slave)[3] & termios.ICANON:     # until it went raw
                assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
                time.sleep(0.01)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert termios.tcgetattr(slave) == before
        assert proc.returncode == 128 + signum, err
    finally:
        os.close(master)
        os.close(slave)


def test_tether_attach_vic_prints_the_agents_ids_escaped(tmp_path):
    """The IDs a (hostile) agent lists reach the user's terminal escaped: no escape
    sequence, carriage return or line of ours forged by them."""
    import sys
    from types import SimpleNamespace
    from helpers import REPO, vic_socket_server
    evil = "a\x1b]0;owned\x07\rtether attach: fine\x1b[2J"
    with vic_socket_server(tmp_path, socket.SO_RCVBUF, 1 << 16) as (loop, server, probe):
        probe.close()
        server.service.host.sessions[evil] = SimpleNamespace(phase=Phase.RUNNING)
        proc = subprocess.Popen([sys.executable, "-m", "tether", "attach", "--vic",
                                 f"unix:{tmp_path / 'vic.sock'}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=REPO)
        try:
            loop.run_until(lambda: proc.poll() is not None, timeout=60)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert out == b"a\\x1b]0;owned\\x07\\rtether attach: fine\\x1b[2J\n", out
