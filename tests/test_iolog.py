"""The output-log framing (VIC's `lib/iolog`) and `tether logs`."""
from __future__ import annotations

import base64
import hashlib
import os
import struct
import subprocess
import sys

import pytest

from tether import iolog
from tether.iolog import LineFramer, encode_entry, parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_entry_is_16_char_header_then_payload():
    entry = encode_entry(b"hello\n", iolog.STDOUT, when_ns=1_500_000_000_123_456_789)
    assert len(entry) == 16 + 6
    when, word = struct.unpack("<qH", base64.b64decode(entry[:16]))
    assert when == 1_500_000_000_123_456_789
    assert word == 6 << 4          # size 6, stream 0, no flags: the reference's layout
    assert entry[16:] == b"hello\n"


def test_stderr_sets_stream_bit():
    entry = encode_entry(b"x", iolog.STDERR, when_ns=0)
    _, word = struct.unpack("<qH", base64.b64decode(entry[:16]))
    assert word == (1 << 4) | (1 << 3)


def test_large_write_is_split_into_9_entries():
    framer = LineFramer(iolog.STDOUT, None)
    blob = framer.feed(b"x" * (32 * 1024)) + framer.close()   # no newlines
    entries = list(parse(blob))
    assert len(entries) == 9
    assert all(len(e.data) <= 4095 for e in entries)


def test_large_entry_round_trips_by_hash():
    data = os.urandom(100_000)
    framer = LineFramer(iolog.STDOUT, None)
    blob = framer.feed(data[:7777]) + framer.feed(data[7777:]) + framer.close()
    got = b"".join(e.data for e in parse(blob))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_split_5x4095_with_timestamps():
    clock = iter(range(1000, 2000))
    framer = LineFramer(iolog.STDOUT, None, clock=lambda: next(clock))
    blob = framer.feed(b"a" * (5 * 4095))
    entries = list(parse(blob))
    assert [len(e.data) for e in entries] == [4095] * 5
    assert [e.when_ns for e in entries] == [1000, 1001, 1002, 1003, 1004]


def test_entries_cut_at_newlines_and_partial_line_held():
    framer = LineFramer(iolog.STDOUT, None)
    assert framer.feed(b"par") == b""
    blob = framer.feed(b"tial\nnext")
    assert [e.data for e in parse(blob)] == [b"partial\n"]
    assert [e.data for e in parse(framer.close())] == [b"next"]
    assert framer.close() == b""


def test_tagged_entries_carry_session_id_within_the_limit():
    framer = LineFramer(iolog.STDERR, "abc123")
    blob = framer.feed(b"z" * 9000 + b"\n")
    entries = list(parse(blob))
    assert {e.session for e in entries} == {"abc123"}
    assert {e.stream for e in entries} == {iolog.STDERR}
    assert b"".join(e.data for e in entries) == b"z" * 9000 + b"\n"
    # the encoded size (with the ID prefix) never passes the reference's 4095
    pos = 0
    while pos < len(blob):
        _, word = struct.unpack("<qH", base64.b64decode(blob[pos:pos + 16]))
        assert word >> 4 <= 4095
        pos += 16 + (word >> 4)


def test_truncated_log_is_reported():
    blob = encode_entry(b"hello\n", when_ns=5)
    with pytest.raises(iolog.FramingError):
        list(parse(blob[:-2]))
    with pytest.raises(iolog.FramingError):
        list(parse(blob + b"AAAA"))


def test_entry_reader_takes_a_stream_cut_anywhere():
    blob = (encode_entry(b"one\n", iolog.STDOUT, 1) + encode_entry(b"two\n", iolog.STDERR, 2, "s2")
            + encode_entry(b"x" * 4000, iolog.STDOUT, 3))
    reader = iolog.EntryReader()
    got = []
    for i in range(len(blob)):                  # one byte at a time
        got += list(reader.feed(blob[i:i + 1]))
    reader.end()
    assert [(e.when_ns, e.stream, e.session, e.data) for e in got] == \
        [(e.when_ns, e.stream, e.session, e.data) for e in parse(blob)]
    assert len(got) == 3 and reader.offset == len(blob)
    with pytest.raises(iolog.FramingError, match=f"bad header at offset {len(blob)}"):
        list(reader.feed(b"not a header at all"))
    reader.skip()                               # a reader of a live port reads on
    assert [e.data for e in reader.feed(encode_entry(b"again\n"))] == [b"again\n"]
    list(reader.feed(blob[:19]))
    with pytest.raises(iolog.FramingError, match="truncated entry"):
        reader.end()


def test_format_time_is_go_layout():
    assert iolog.format_time(1_500_000_000_123_456_789) == "2017-07-14T02:40:00.123456789Z"


def _logs(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "tether", "logs", *args], cwd=REPO,
                          capture_output=True, timeout=120, input=stdin)


def test_tether_logs_prints_and_filters(tmp_path):
    path = tmp_path / "output.log"
    path.write_bytes(encode_entry(b"one\n", iolog.STDOUT, 1_500_000_000_000_000_000)
                     + encode_entry(b"two\n", iolog.STDERR, 1_500_000_001_000_000_000, "s2")
                     + encode_entry(b"three", iolog.STDOUT, 1_500_000_002_000_000_000))
    run = _logs(str(path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().splitlines() == [
        "2017-07-14T02:40:00.000000000Z primary stdout one",
        "2017-07-14T02:40:01.000000000Z s2 stderr two",
        "2017-07-14T02:40:02.000000000Z primary stdout three",
    ]
    assert _logs(str(path), "--session", "s2", "--raw").stdout == b"two\n"
    assert _logs(str(path), "--session", "primary", "--raw").stdout == b"one\nthree"
    assert _logs("-", "--raw", stdin=path.read_bytes()).stdout == b"one\ntwo\nthree"


def test_tether_logs_reports_bad_input(tmp_path):
    path = tmp_path / "bad.log"
    path.write_bytes(b"this is not a framed log at all")
    run = _logs(str(path))
    assert run.returncode == 1
    assert b"bad header at offset 0" in run.stderr
    missing = _logs(str(tmp_path / "nope.log"))
    assert missing.returncode == 1 and b"cannot read" in missing.stderr


def test_log_port_buffers_when_the_pipe_is_full():
    from tether.loop import Loop
    loop = Loop()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        port = iolog.LogPort(w, loop)
        data = os.urandom(1 << 20)       # far more than a pipe holds
        port.write(data)                 # must not block
        got = bytearray()
        os.set_blocking(r, False)
        while len(got) < len(data):
            loop.run_until(lambda: True, timeout=0)   # one round: the writer runs
            loop._run_once(0.05)
            try:
                got += os.read(r, 1 << 16)
            except BlockingIOError:
                pass
        assert bytes(got) == data
        assert port.dropped == 0
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_log_port_goes_quiet_when_its_reader_goes_away():
    """A pipe filled, then its reader closed: the port closes and the loop idles (it
    used to keep its writer on the dead fd and spin at every turn of the loop)."""
    from tether.loop import Loop
    loop = Loop()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        port = iolog.LogPort(w, loop)
        port.write(b"x" * (1 << 20))     # the pipe takes 64 KiB; the rest waits on the loop
        assert port.pending > 0
        os.close(r)
        loop.run_until(lambda: port.closed, timeout=5)
        assert port.closed and port.pending == 0 and port.dropped > 0
        port.write(b"more")              # dropped quietly, nothing registered again
        before = loop.wakeups
        loop.run_until(lambda: False, timeout=0.5)
        assert loop.wakeups - before < 10, f"{loop.wakeups - before} wake-ups in 0.5 s"
    finally:
        loop.close()


def test_a_flooded_log_port_drops_whole_entries_and_its_reader_keeps_the_framing():
    """Past its limit the port drops the oldest output: whole entries, never the rest of
    one half written (it used to cut bytes anywhere, and the reader then took session
    output for headers: a FramingError, or entries the container forged)."""
    from tether.loop import Loop
    loop = Loop()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        port = iolog.LogPort(w, loop, limit=100_000)
        framers = [LineFramer(iolog.STDOUT, None), LineFramer(iolog.STDERR, "other")]
        for i in range(10_000):
            port.write(framers[i % 2].feed(b"line %05d\n" % i))
        assert port.dropped > 0
        got = bytearray()
        os.set_blocking(r, False)
        while port.pending:
            loop._run_once(0.05)
            try:
                got += os.read(r, 1 << 16)
            except BlockingIOError:
                pass
        with pytest.raises(BlockingIOError):
            got += os.read(r, 1 << 16)
        entries = list(parse(bytes(got)))       # no FramingError
        numbers = [int(e.data[5:10]) for e in entries]
        assert all(e.data == b"line %05d\n" % n for e, n in zip(entries, numbers))
        assert [e.session for e in entries] == [None if n % 2 == 0 else "other"
                                                for n in numbers]
        assert numbers == sorted(numbers) and numbers[-1] == 9_999
        assert len(got) + port.dropped == sum(len(encode_entry(b"line 00000\n", 0, 0,
                                                               None if i % 2 == 0 else "other"))
                                              for i in range(10_000))
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_tether_logs_into_a_reader_that_goes_away_stops_quietly(tmp_path):
    """`tether logs FILE | head` printed a BrokenPipeError traceback; it stops as cat
    does, with 128 + SIGPIPE."""
    log = tmp_path / "output.log"
    log.write_bytes(b"".join(encode_entry(b"line %d\n" % i) for i in range(50000)))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reader, writer = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tether", "logs", str(log)], cwd=repo,
                                stdout=writer, stderr=subprocess.PIPE)
        os.close(writer)
        writer = -1
        assert os.read(reader, 100)          # it started writing; then the reader goes
        os.close(reader)
        reader = -1
        _, err = proc.communicate(timeout=60)
    finally:
        for fd in (reader, writer):
            if fd >= 0:
                os.close(fd)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 141
