"""Copy in and out of a hostile container: the real agent in `tether sandbox --rootfs`,
a real process inside the root racing it, paths that block, archives that explode.

The swapper is a process this test starts, chrooted into the container root as an
unprivileged user (uid 1234), exchanging a directory (or a file) with a symlink (or a
FIFO) with renameat2(RENAME_EXCHANGE) in a loop, as a container process could.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import signal
import socket
import stat
import struct
import sys
import tarfile
import termios
import threading
import time
import zlib

import pytest

from helpers import (executor_config, require_tool, session_config, sid, small_tmpfs,
                     socket_paths)
from tether.attach import protocol as p
from tether.attach import transports
from tether.attach.client import Client, ClientError
from swapper import USER, Swapper

KEY = b"copy-test-key"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

@pytest.fixture
def rootfs(tmp_path):
    """A busybox container root; /data belongs to the unprivileged user."""
    require_tool("busybox")
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "data"):
        (root / d).mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "data", USER, USER)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "ls", "tty"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         f"user:x:{USER}:{USER}::/:/bin/sh\n")
    return root


@pytest.fixture
def agent(sandbox):
    """start(rootfs, **kw) -> (box, endpoint): the agent serving a long sleep in `rootfs`."""
    with socket_paths("tether-copy") as socket_path:
        def start(rootfs, **kw):
            primary = session_config(sid(), ["/bin/sleep", "1000"], env=["PATH=/bin"])
            cfg = executor_config(primary)
            cfg.key = KEY
            path = socket_path()
            box = sandbox.start(cfg, rootfs=rootfs, attach_socket=path, **kw)
            box.wait_for_log(r"serving \d+ session")
            return box, "unix:" + path
        yield start


@pytest.fixture
def swapper():
    started = []

    def start(root, first, second):
        s = Swapper(root, first, second)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def stops_on_sigterm(box, clean: bool = True) -> None:
    """SIGTERM ends the agent (box.wait fails the test if it is still running); `clean`:
    nothing went wrong on the way."""
    box.signal(signal.SIGTERM)
    result = box.wait(timeout=30)
    assert not clean or "Traceback" not in result.log, result.log


# -- 1. races through a swapped path component -------------------------------------------
def test_copy_through_a_component_swapped_for_a_symlink_never_leaves_the_root(
        agent, rootfs, swapper, tmp_path):
    outside = tmp_path / "outside"           # a host directory the container must not reach
    outside.mkdir()
    secret = outside / "f"
    secret.write_bytes(b"HOST SECRET")
    os.chmod(secret, 0o600)
    data = rootfs / "data"
    (data / "dir").mkdir()
    (data / "dir" / "f").write_bytes(b"container file")
    os.chown(data / "dir", USER, USER)
    os.chown(data / "dir" / "f", USER, USER)
    os.symlink(str(outside), data / "alt")   # absolute: inside the root it leads nowhere
    os.lchown(data / "alt", USER, USER)
    box, endpoint = agent(rootfs)
    swapper(rootfs, "/data/dir", "/data/alt")
    leaked = read_ok = written_ok = 0
    with Client.connect(endpoint, KEY, timeout=20) as client:
        for _ in range(400):
            sink = io.BytesIO()
            try:
                client.copy_from("/data/dir/f", sink)
            except ClientError:
                continue
            read_ok += 1
            leaked += sink.getvalue() == b"HOST SECRET"
        for i in range(400):
            try:
                client.copy_to(f"/data/dir/new{i}", b"dropped by the agent", mode=0o4755)
                written_ok += 1
            except ClientError:
                pass
        client.ping()
    dropped = sorted(os.listdir(outside))
    assert (leaked, dropped) == (0, ["f"]), (
        f"{leaked} of 400 copy-from calls returned the host's file; copy-to put "
        f"{len(dropped) - 1} entries into the host directory")
    assert read_ok + written_ok < 800, "no copy saw the symlink: the race did not run"
    assert not [n for n in os.listdir(data / "dir") if n.startswith(".tether")]
    stops_on_sigterm(box)


# -- 2. nothing the container puts in the path can block PID 1 ---------------------------
def test_a_fifo_swapped_in_for_the_file_does_not_hang_the_agent(agent, rootfs, swapper):
    data = rootfs / "data"
    (data / "f").write_bytes(b"regular")
    os.mkfifo(data / "pipe")
    for name in ("f", "pipe"):
        os.chown(data / name, USER, USER)
    box, endpoint = agent(rootfs)
    racing = swapper(rootfs, "/data/f", "/data/pipe")
    refused = 0
    with Client.connect(endpoint, KEY, timeout=10) as client:
        for _ in range(200):
            try:
                assert client.copy_from("/data/f", io.BytesIO())["size"] == 7
            except ClientError as err:
                assert "regular file" in str(err) or "No such file" in str(err), err
                refused += 1
            # copy-to never writes through a FIFO either: a new file or a refusal
            try:
                client.copy_to("/data/f", b"regular")
            except ClientError as err:
                assert "regular file" in str(err), err
        assert client.ping()
    assert refused, "the FIFO was never seen: the race did not run"
    racing.stop()
    fifos = [stat.S_ISFIFO(os.lstat(data / name).st_mode) for name in ("f", "pipe")]
    assert sorted(fifos) == [False, True], "a copy-to replaced the FIFO"
    stops_on_sigterm(box)


def test_copy_from_proc_kmsg_is_refused_and_the_agent_stays_responsive(agent, rootfs):
    box, endpoint = agent(rootfs)
    with Client.connect(endpoint, KEY, timeout=10) as client:
        for path in ("/proc/kmsg", "/proc/self/../kmsg", "/sys/kernel/notes", "/dev/zero"):
            with pytest.raises(ClientError, match="refused"):
                client.copy_from(path, io.BytesIO())
        with pytest.raises(ClientError, match="refused"):
            client.copy_to("/proc/sys/kernel/hostname", b"hostile\n")
        assert client.ping()
    stops_on_sigterm(box)


# -- 3. big copies -------------------------------------------------------------------------
def fast_copy_from(client: Client, path: str) -> tuple[dict, bytes]:
    """copy-from read as fast as the client library reads (1 MiB at a time, the data
    handed on without copying): a reader this fast is what made the agent's send path
    recurse. (Reading the socket beside the library lost what its decoder had already
    buffered with the ok reply.)"""
    sink = io.BytesIO()
    info = client.copy_from(path, sink)
    return info, sink.getvalue()


def test_fast_copy_from_keeps_what_came_with_the_ok_reply():
    """The race behind the 64 MiB test's failures, made certain: the agent's ok, a whole
    data frame and half of the next are already in the socket when the client reads the
    ok, so they land in the client's channel queue and decoder buffer. A reader that
    takes the socket over after the ok (fast_copy_from's own decoder once did) loses
    them. Here a scripted agent writes the reply; the rest follows only once the client
    has read all of it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ours.setblocking(False)
        theirs.sendall(p.encode({"t": p.HELLO, "v": p.VERSION, "challenge": bytes(32),
                                 "server": "tether", "unchecked": True})
                       + p.encode({"t": p.WELCOME, "v": p.VERSION}))
        client = Client(transports.Conn(ours.fileno(), "scripted", sock=ours), KEY)
        client.handshake()
        channel = client._next_channel   # the copy's channel
        payload = os.urandom(150 << 10)
        frames = p.encode_data(channel, payload, "stdout", checked=True)   # 64 KiB each
        reply = (p.encode({"t": p.OK, "ch": channel, "kind": "file", "size": len(payload),
                           "mode": 0o600}) + b"".join(frames)
                 + p.encode({"t": p.EOF, "ch": channel}) + p.encode({"t": p.CLOSE, "ch": channel}))
        cut = reply.index(frames[1]) + len(frames[1]) // 2
        theirs.sendall(reply[:cut])

        def rest() -> None:
            deadline = time.monotonic() + 30
            while _queued(ours) and time.monotonic() < deadline:
                time.sleep(0.001)
            theirs.sendall(reply[cut:])
        writer = threading.Thread(target=rest, daemon=True)
        writer.start()
        info, received = fast_copy_from(client, "/data/big.bin")
        writer.join(30)
        request = p.FrameDecoder().feed(theirs.recv(1 << 16))
    assert [m["t"] for m in request] == [p.CONNECT, p.AUTH, p.COPY_FROM]
    assert (request[-1]["ch"], request[-1]["path"]) == (channel, "/data/big.bin")
    assert (info["kind"], info["size"], info["mode"]) == ("file", len(payload), 0o600)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


def _queued(sock) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_copy_64_mib_both_ways_with_checksums(agent, rootfs):
    """64 MiB to a fast reader used to end in RecursionError (pump -> send_bytes ->
    flush -> pump, once per 64 KiB)."""
    payload = os.urandom(1 << 20) * 64
    digest = hashlib.sha256(payload).hexdigest()
    box, endpoint = agent(rootfs)
    with Client.connect(endpoint, KEY, timeout=60) as client:
        reply = client.copy_to("/data/big.bin", io.BytesIO(payload), mode=0o600)
        assert (reply["size"], reply["sha256"]) == (len(payload), digest)
        assert hashlib.sha256((rootfs / "data" / "big.bin").read_bytes()).hexdigest() == digest
        info, received = fast_copy_from(client, "/data/big.bin")
        assert (info["kind"], info["size"], info["mode"]) == ("file", len(payload), 0o600)
        assert hashlib.sha256(received).hexdigest() == digest
        sink = io.BytesIO()
        assert client.copy_from("/data/big.bin", sink)["sha256"] == digest
        assert client.ping()
    assert "RecursionError" not in box.log_text()
    stops_on_sigterm(box)


# -- 9. tar streams, off the loop, with caps ---------------------------------------------
@pytest.fixture
def small_tmpdir(tmp_path):
    """A 32 MiB tmpfs the agent gets as TMPDIR: a spool of anything big fails there."""
    with small_tmpfs(tmp_path / "smalltmp", "32m") as path:
        yield path


class CountingSink:
    def __init__(self):
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> int:
        if len(self.head) < 4096:
            self.head += bytes(data[:4096])
        self.size += len(data)
        return len(data)


def test_tar_copy_from_a_3_gib_sparse_file_streams_without_spooling(
        agent, rootfs, small_tmpdir):
    tree = rootfs / "data" / "tree"
    tree.mkdir()
    (tree / "small").write_bytes(b"hello")
    with open(tree / "sparse", "wb") as f:
        f.truncate(3 << 30)
    box, endpoint = agent(rootfs, env={"TMPDIR": str(small_tmpdir)})
    with Client.connect(endpoint, KEY, timeout=60) as client:
        sink = CountingSink()
        info = client.copy_from("/data/tree", sink)
        assert info["kind"] == "tar"
        assert sink.size > 3 << 30
        with tarfile.open(fileobj=io.BytesIO(sink.head + bytes(4096)), mode="r|") as archive:
            assert archive.next().name == "tree"
        assert client.ping()
        # A copy the client stopped reading holds a worker; SIGTERM still stops the agent.
        channel = client.open_channel()
        client.send({"t": p.COPY_FROM, "ch": channel, "path": "/data/tree", "tar": None})
        assert client.next_message(channel, 30)["t"] == p.OK
        stops_on_sigterm(box)
    assert os.statvfs(small_tmpdir).f_bfree * os.statvfs(small_tmpdir).f_frsize > 24 << 20


def gzip_bomb(size: int) -> bytes:
    """A gzip'd tar holding one file of `size` zero bytes, compressed as it is made."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [gz.compress(info.tobuf(format=tarfile.PAX_FORMAT))]
    block = bytes(1 << 20)
    for _ in range(size // len(block)):
        out.append(gz.compress(block))
    out.append(gz.compress(bytes(1024)))   # end of archive
    out.append(gz.flush())
    return b"".join(out)


def test_a_gzip_bomb_stops_at_the_cap_with_a_clear_error(agent, rootfs):
    bomb = gzip_bomb(1 << 30)
    assert len(bomb) < 2 << 20
    box, endpoint = agent(rootfs)
    with Client.connect(endpoint, KEY, timeout=60) as client:
        with pytest.raises(ClientError, match="expands"):
            client.copy_to("/data", bomb, tar=True)
        assert client.ping()
    assert os.listdir(rootfs / "data") == []       # nothing half-written is left
    stops_on_sigterm(box)


def test_tar_copy_in_through_a_swapped_component_never_leaves_the_root(
        agent, rootfs, swapper, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = rootfs / "data"
    (data / "dir").mkdir()
    os.chown(data / "dir", USER, USER)
    os.symlink(str(outside), data / "alt")
    os.lchown(data / "alt", USER, USER)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for i in range(20):
            member = tarfile.TarInfo(f"sub/file{i}")
            member.size = 5
            tar.addfile(member, io.BytesIO(b"tar\n\n"))
    box, endpoint = agent(rootfs)
    swapper(rootfs, "/data/dir", "/data/alt")
    with Client.connect(endpoint, KEY, timeout=20) as client:
        for _ in range(100):
            try:
                client.copy_to("/data/dir", archive.getvalue(), tar=True)
            except ClientError:
                pass
    assert os.listdir(outside) == []
    stops_on_sigterm(box)


# -- 10. the container's /dev and non-regular targets ----------------------------------------
def in_agent(box, path) -> str:
    """`path` as the agent sees it, through its mount namespace."""
    return f"/proc/{box.agent_pid()}/root{path}"


def mount_points(box) -> dict[str, str]:
    """mount point -> filesystem type, in the agent's mount namespace."""
    with open(f"/proc/{box.agent_pid()}/mountinfo") as f:
        found = {}
        for line in f:
            fields = line.split()
            found[fields[4].replace("\\040", " ")] = fields[fields.index("-") + 1]
        return found


def test_the_sandbox_gives_the_container_root_a_fresh_dev(agent, rootfs):
    box, endpoint = agent(rootfs)
    mounts = mount_points(box)
    dev = f"{rootfs}/dev"
    assert (mounts.get(dev), mounts.get(f"{dev}/pts"), mounts.get(f"{dev}/shm")) == (
        "tmpfs", "devpts", "tmpfs"), {k: v for k, v in mounts.items() if "/dev" in k}
    host_null = os.stat("/dev/null")
    null = os.stat(in_agent(box, f"{dev}/null"))
    assert (null.st_dev, null.st_ino) != (host_null.st_dev, host_null.st_ino)
    for name, (major, minor) in {"null": (1, 3), "zero": (1, 5), "full": (1, 7),
                                 "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}.items():
        info = os.lstat(in_agent(box, f"{dev}/{name}"))
        assert stat.S_ISCHR(info.st_mode), name
        assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (major, minor), name
        assert stat.S_IMODE(info.st_mode) == 0o666, name
    assert os.readlink(in_agent(box, f"{dev}/ptmx")) == "pts/ptmx"
    assert os.readlink(in_agent(box, f"{dev}/fd")) == "/proc/self/fd"
    assert os.readlink(in_agent(box, f"{dev}/stdin")) == "/proc/self/fd/0"
    assert sorted(os.listdir(in_agent(box, dev))) == sorted(
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
         "stdin", "stdout", "tty", "urandom", "zero"])
    # A tty session's pty comes from the root's own devpts: the session finds it there.
    with Client.connect(endpoint, KEY, timeout=30) as client:
        out = client.exec(["/bin/tty"], tty=True, env=["PATH=/bin"]).collect(30)
    assert out["stdout"].strip() == b"/dev/pts/0", out
    stops_on_sigterm(box)


def test_a_hostile_image_cannot_point_the_system_mounts_elsewhere(agent, rootfs, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("host data")
    (rootfs / "sys").rmdir()
    os.symlink(str(elsewhere), rootfs / "sys")
    inside = rootfs / str(elsewhere).lstrip("/")     # where the link leads inside the root
    inside.mkdir(parents=True)
    box, endpoint = agent(rootfs)
    mounts = mount_points(box)
    assert not [m for m in mounts if m in (str(elsewhere), str(inside))
                or m.startswith((f"{elsewhere}/", f"{inside}/"))], mounts
    assert mounts.get(f"{rootfs}/proc") == "proc"
    assert os.listdir(in_agent(box, str(elsewhere))) == ["keep"]
    assert "refusing to mount over /sys" in box.log_text(), box.log_text()
    stops_on_sigterm(box, clean=False)


def test_copy_to_never_replaces_a_non_regular_file(agent, rootfs):
    os.mkfifo(rootfs / "data" / "pipe")
    os.mknod(rootfs / "data" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    box, endpoint = agent(rootfs)
    host_null = os.stat("/dev/null")
    null = os.stat(in_agent(box, f"{rootfs}/dev/null"))
    # Never try the copy onto /dev/null below where it is the host's own.
    assert (null.st_dev, null.st_ino) != (host_null.st_dev, host_null.st_ino)
    with Client.connect(endpoint, KEY, timeout=10) as client:
        for path in ("/data/pipe", "/data/null"):
            with pytest.raises(ClientError, match="regular file"):
                client.copy_to(path, b"replaced")
        with pytest.raises(ClientError, match="refused"):
            client.copy_to("/dev/null", b"replaced")
    assert stat.S_ISFIFO(os.lstat(rootfs / "data" / "pipe").st_mode)
    assert stat.S_ISCHR(os.lstat(rootfs / "data" / "null").st_mode)
    assert stat.S_ISCHR(os.lstat(in_agent(box, f"{rootfs}/dev/null")).st_mode)
    stops_on_sigterm(box)

