"""The session output log is capped and rotated (a file), and says once when it stops
(a full disk)."""
from __future__ import annotations

import os

import pytest

from helpers import executor_config, session_config, sid, small_tmpfs
from tether.iolog import LineFramer, LogPort, parse


def test_a_file_log_rotates_to_dot_1_at_its_cap_between_whole_entries(tmp_path):
    path = str(tmp_path / "output.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    port = LogPort(fd, None, path=path, max_bytes=64 << 10)
    framer = LineFramer(0, None)
    for i in range(5000):
        port.write(framer.feed(b"line %05d of the session's output\n" % i))
    port.close()
    assert port.rotations >= 2
    for name in (path, path + ".1"):
        assert os.path.getsize(name) <= 64 << 10
        entries = list(parse(open(name, "rb").read()))     # each file reads on its own
        assert entries
    last = list(parse(open(path, "rb").read()))[-1].data
    assert last == b"line 04999 of the session's output\n"
    assert not os.path.exists(path + ".2")


def test_the_sandbox_output_log_is_capped(sandbox, tmp_path):
    primary = session_config(sid(), ["/bin/sh", "-c", "yes 'some output' | head -c 3000000"])
    result = sandbox.run(executor_config(primary), output_log=True,
                         extra_args=["--output-log-max", "1000000"])
    assert result.returncode == 0, result.log
    directory = os.path.dirname(sandbox._boxes[-1].output_log_path)
    sizes = {name: os.path.getsize(os.path.join(directory, name))
             for name in os.listdir(directory) if name.startswith("output.log")}
    assert set(sizes) == {"output.log", "output.log.1"}, sizes
    assert all(size <= 1_000_000 for size in sizes.values()), sizes


@pytest.fixture
def full_disk(tmp_path):
    with small_tmpfs(tmp_path / "small", "256k") as mountpoint:
        yield mountpoint


def test_a_full_disk_stops_the_log_once_and_says_so(full_disk, caplog):
    path = str(full_disk / "output.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    port = LogPort(fd, None, path=path, max_bytes=1 << 30)
    with caplog.at_level("WARNING", logger="tether.iolog"):
        for _ in range(64):
            port.write(b"x" * 16384)
    assert port.closed and port.dropped > 0
    stopped = [r for r in caplog.records if "output log stopped" in r.getMessage()]
    assert len(stopped) == 1 and "No space left" in stopped[0].getMessage()
