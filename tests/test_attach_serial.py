"""The attach protocol over a pty pair standing in for a serial line.

The server side is the real attach server on the real loop, reaper and Session (the
agent's parts, minus its boot steps) in a child process, listening on `serial:/dev/pts/N`;
the test is the host on the pty master, with garbage on the line before each hello and a
host that goes away without a goodbye.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO, missing, require_root
from tether.attach.client import Client, ClientError
from tether.attach.transports import Conn, EndpointError, find_virtio_port
from tether.system import set_raw_tty

KEY = b"serial-key"

SERVER = [sys.executable, str(REPO / "tests" / "attach_host.py")]   # the agent's attach parts
# The server's session runs as root, as the agent's do: launching it sets its groups.
NEEDS_ROOT = "the server launches its session as root (setgroups, setuid)"


@pytest.fixture
def serial_line():
    require_root(NEEDS_ROOT)
    master, slave = os.openpty()
    set_raw_tty(master, baud=None)
    device = os.ttyname(slave)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(SERVER + ["serial:" + device, KEY.decode(), "--cat"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        os.close(slave)
        slave = -1
        os.set_blocking(master, False)
        yield master, proc
    finally:
        if slave >= 0:
            os.close(slave)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        os.close(master)


def host_client(master: int, key: bytes = KEY, persistent: bool = True) -> Client:
    conn = Conn(master, "pty master", persistent=persistent)
    conn.close = lambda: None          # the line outlives each conversation
    client = Client(conn, key, timeout=60)
    client.handshake()
    return client


def test_protocol_over_a_pty_with_garbage_before_the_hello(serial_line):
    master, proc = serial_line
    os.write(master, os.urandom(4096) + b"\x16\x06 AT+GARBAGE\r\n" + b"\xd7TtR" + os.urandom(64))
    client = host_client(master)
    assert [s["id"] for s in client.list()] == ["cat"]
    stream = client.attach("cat")
    stream.write(b"over the serial line\n")
    stream.read_until(b"over the serial line\n")

    # The host goes away mid-conversation and a new one connects, garbage first.
    os.write(master, os.urandom(1000))
    again = host_client(master)
    assert again.ping("back")["data"] == "back"
    stream = again.attach("cat", replay=True)
    assert b"over the serial line\n" in stream.read_until(b"over the serial line\n")
    stream.write(b"second host\n")
    stream.read_until(b"second host\n")

    # Garbage between frames of an authenticated conversation is skipped too.
    os.write(master, os.urandom(3000))
    assert again.ping(7)["data"] == 7

    # A wrong key is refused; the line is then ready for the next hello.
    with pytest.raises(ClientError, match="authentication failed"):
        host_client(master, b"wrong")
    assert host_client(master).list()[0]["running"]
    assert proc.poll() is None


def test_a_socket_client_to_a_line_keeps_checked_frames(serial_line):
    # As `tcp:` to a QEMU chardev that leads to the guest's virtio port: the client's
    # end is a socket, the agent's a line. The hello tells the client to keep the CRC.
    master, proc = serial_line
    client = host_client(master, persistent=False)
    assert client.checked
    stream = client.attach("cat")
    stream.write(b"x" * 200_000 + b"\n")
    assert stream.read_until(b"\n", timeout=60).count(b"x") == 200_000


def test_tcp_endpoint_serves_the_same_protocol():
    require_root(NEEDS_ROOT)
    with socket.socket() as probe:   # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(SERVER + [f"tcp:127.0.0.1:{port}", KEY.decode(), "--cat"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        with Client.connect(f"tcp:127.0.0.1:{port}", KEY) as client:
            stream = client.attach("cat")
            stream.write(b"over tcp\n")
            stream.read_until(b"over tcp\n")
            assert not client.checked   # a socket: data frames skip the CRC
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_virtio_port_is_found_by_name(tmp_path):
    ports = tmp_path / "class" / "virtio-ports"
    for node, name in (("vport0p1", "org.tether.guestinfo"), ("vport0p2", "org.tether.attach")):
        (ports / node).mkdir(parents=True)
        (ports / node / "name").write_text(name + "\n")
    assert find_virtio_port("org.tether.attach", str(tmp_path)) == "/dev/vport0p2"
    with pytest.raises(EndpointError, match="not found"):
        find_virtio_port("org.other", str(tmp_path))
    with pytest.raises(EndpointError, match="does not exist"):
        find_virtio_port("org.tether.attach", str(tmp_path / "missing"))


def _vsock_loopback_problem() -> str | None:
    """None if a vsock listener here can be reached through the local CID 1."""
    if not hasattr(socket, "AF_VSOCK"):
        return "no AF_VSOCK in this Python"
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as server:
            server.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
            server.listen(1)
            port = server.getsockname()[1]
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
                client.settimeout(3)
                client.connect((1, port))
    except OSError as err:
        return f"vsock loopback is not available here ({err}); it needs vsock_loopback"
    return None


def test_vsock_endpoint_serves_the_same_protocol():
    problem = _vsock_loopback_problem()
    if problem:
        missing("vsock-loopback", problem)
    require_root(NEEDS_ROOT)
    port = 20000 + os.getpid() % 20000
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(SERVER + [f"vsock:{port}", KEY.decode(), "--cat"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        with Client.connect(f"vsock:1:{port}", KEY) as client:
            stream = client.attach("cat")
            stream.write(b"over vsock\n")
            stream.read_until(b"over vsock\n")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
