"""The attach protocol without IO: frames, resync over garbage, the HMAC hello."""
from __future__ import annotations

import os
import struct
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.attach import protocol as p
from tether.attach.transports import EndpointError, parse_endpoint
from tether.attach.terminal import DetachScanner
from tether.clientcli import split_remote

MESSAGES = [
    {"t": "connect", "v": 1},
    {"t": "data", "ch": 7, "s": "stdout", "d": b"\x00\x01hello" * 100},
    {"t": "list", "ch": 1},
    {"t": "ok", "ch": 2, "sessions": [{"id": "x", "pid": 3, "running": True}]},
]


def test_round_trip_in_one_feed():
    stream = b"".join(p.encode(m) for m in MESSAGES)
    decoder = p.FrameDecoder()
    assert decoder.feed(stream) == MESSAGES
    assert decoder.garbage_bytes == 0 and decoder.buffered == 0


def test_round_trip_byte_by_byte():
    stream = b"".join(p.encode(m) for m in MESSAGES)
    decoder = p.FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i:i + 1])
    assert out == MESSAGES


def test_frame_layout_is_as_documented():
    frame = p.encode({"t": "ping", "ch": 1})
    magic, length, check, crc = struct.unpack(">4sIII", frame[:16])
    payload = frame[16:]
    assert magic == b"\xd7TtR" and length == len(payload)
    assert check == length ^ 0xFFFFFFFF and crc == zlib.crc32(payload)
    assert msgpack.unpackb(payload) == {"t": "ping", "ch": 1}


@settings(max_examples=200, deadline=None)
@given(garbage=st.lists(st.binary(max_size=300), min_size=len(MESSAGES) + 1,
                        max_size=len(MESSAGES) + 1),
       cuts=st.lists(st.integers(min_value=1, max_value=97), max_size=40))
def test_resync_skips_garbage_between_frames(garbage, cuts):
    # Garbage before, between and after the frames, fed in random pieces.
    stream = garbage[0] + b"".join(p.encode(m) + g for m, g in zip(MESSAGES, garbage[1:]))
    decoder = p.FrameDecoder()
    out, pos = [], 0
    for cut in cuts:
        out += decoder.feed(stream[pos:pos + cut])
        pos += cut
    out += decoder.feed(stream[pos:])
    assert out == MESSAGES


def test_a_fake_header_with_a_huge_length_does_not_stall_the_stream():
    fake = p.MAGIC + struct.pack(">III", 900_000, 12345, 0)   # complement does not match
    decoder = p.FrameDecoder()
    assert decoder.feed(fake + p.encode(MESSAGES[0])) == [MESSAGES[0]]
    assert decoder.bad_frames == 1


def test_a_corrupted_frame_is_dropped_and_the_next_one_found_inside_it():
    good = p.encode(MESSAGES[2])
    # A header whose length swallows the next real frame, with a CRC that cannot match.
    swallow = p.MAGIC + struct.pack(">III", 200, 200 ^ 0xFFFFFFFF, 0)
    decoder = p.FrameDecoder()
    out = decoder.feed(swallow + good + os.urandom(300))
    assert out == [MESSAGES[2]]


def test_truncated_frame_waits_then_completes():
    frame = p.encode(MESSAGES[1])
    decoder = p.FrameDecoder()
    assert decoder.feed(frame[:-10]) == []
    assert decoder.feed(frame[-10:]) == [MESSAGES[1]]


def test_valid_frame_with_bad_payload_is_skipped():
    for payload in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"no": "type"})):
        frame = p.HEADER.pack(p.MAGIC, len(payload), len(payload) ^ 0xFFFFFFFF,
                              zlib.crc32(payload)) + payload
        decoder = p.FrameDecoder()
        assert decoder.feed(frame + p.encode(MESSAGES[0])) == [MESSAGES[0]]


def test_oversized_message_is_refused_when_encoding():
    with pytest.raises(p.ProtocolError):
        p.encode({"t": "data", "d": b"x" * (p.MAX_PAYLOAD + 1)})


def test_data_is_split_into_chunks():
    data = os.urandom(p.DATA_CHUNK * 2 + 5)
    frames = p.encode_data(3, data, "stderr")
    messages = p.FrameDecoder().feed(b"".join(frames))
    assert len(messages) == 3
    assert b"".join(m["d"] for m in messages) == data
    assert {m["s"] for m in messages} == {"stderr"}


# -- the hello --------------------------------------------------------------------------------
def _shake(server_key, client_key):
    server = p.ServerHandshake(server_key)
    client = p.ClientHandshake(client_key)
    (hello,) = server.receive(client.start())
    assert hello["t"] == "hello" and hello["v"] == p.VERSION
    assert len(hello["challenge"]) == p.CHALLENGE_SIZE
    (auth,) = client.receive(hello)
    (welcome,) = server.receive(auth)
    client.receive(welcome)
    return server, client


def test_right_key_authenticates():
    server, client = _shake(b"secret", b"secret")
    assert server.authenticated and client.done


def test_wrong_key_is_rejected():
    with pytest.raises(p.ProtocolError, match="authentication failed"):
        _shake(b"secret", b"guess")


def test_empty_key_still_needs_the_hmac_with_the_empty_key():
    server, _ = _shake(None, b"")
    assert server.authenticated
    server = p.ServerHandshake(b"")
    hello = server.start()
    with pytest.raises(p.ProtocolError):
        server.receive({"t": "auth", "mac": b"\0" * 32})
    assert hello["challenge"]


def test_an_answer_is_good_for_one_challenge_only():
    server = p.ServerHandshake(b"k")
    hello = server.start()
    auth = {"t": "auth", "mac": p.answer(b"k", hello["challenge"])}
    server.receive(auth)
    replay = p.ServerHandshake(b"k")
    replay.start()           # a fresh challenge: the old answer must not work
    with pytest.raises(p.ProtocolError):
        replay.receive(auth)


def test_requests_before_authentication_are_refused():
    server = p.ServerHandshake(b"k")
    with pytest.raises(p.ProtocolError, match="before authentication"):
        server.receive({"t": "list", "ch": 1})
    with pytest.raises(p.ProtocolError, match="send connect first"):
        server.receive({"t": "auth", "mac": b"x"})


def test_plain_makes_state_msgpack_safe():
    class Odd:
        def __str__(self):
            return "odd"
    value = p.plain({"a": (1, Odd()), 2: None})
    assert value == {"a": [1, "odd"], "2": None}
    msgpack.packb(value)


# -- CLI helpers --------------------------------------------------------------------------------
def test_detach_scanner_finds_keys_across_reads():
    scanner = DetachScanner()
    assert scanner.feed(b"ab\x10") == (b"ab", False)
    assert scanner.feed(b"\x11rest") == (b"", True)
    scanner = DetachScanner()
    assert scanner.feed(b"\x10") == (b"", False)
    assert scanner.feed(b"x") == (b"\x10x", False)   # ctrl-p alone goes through


def test_split_remote():
    assert split_remote("unix:/run/a.sock::/etc/hosts") == ("unix:/run/a.sock", "/etc/hosts")
    assert split_remote("tcp:127.0.0.1:99::x") == ("tcp:127.0.0.1:99", "x")
    assert split_remote("./local") is None
    assert split_remote("/tmp/a::b") is None   # no KIND: it is a local path


def test_parse_endpoint():
    assert parse_endpoint("unix:/a/b") == ("unix", ("/a/b",))
    assert parse_endpoint("vsock:3:2377") == ("vsock", (3, 2377))
    assert parse_endpoint("vsock:2377") == ("vsock", (2377,))
    assert parse_endpoint("vsock:*:2377") == ("vsock", ("*", 2377))
    assert parse_endpoint("tcp:[::1]:80") == ("tcp", ("::1", 80))
    assert parse_endpoint("serial:/dev/ttyS1") == ("serial", ("/dev/ttyS1",))
    for bad in ("nothing", "ftp:x", "tcp:host", "vsock:a:b", "vsock:*"):
        with pytest.raises(EndpointError):
            parse_endpoint(bad)


def test_data_frames_match_the_generic_encoder():
    for size in (0, 1, 255, 256, 65535, 65536, 70000):
        data = os.urandom(size)
        expected = [p.encode({"t": "data", "ch": 300, "s": "stderr", "d": data[i:i + p.DATA_CHUNK]})
                    for i in range(0, size, p.DATA_CHUNK)]
        assert p.encode_data(300, data, "stderr") == expected


def test_unchecked_frames_are_taken_only_where_allowed():
    frames = b"".join(p.encode_data(1, b"socket data", checked=False)) + \
        p.encode({"t": "ping", "ch": 2}, checked=False)
    assert frames[:4] == p.MAGIC_UNCHECKED
    on_socket = p.FrameDecoder(accept_unchecked=True).feed(frames)
    assert [m["t"] for m in on_socket] == ["data", "ping"] and on_socket[0]["d"] == b"socket data"
    on_line = p.FrameDecoder()
    assert on_line.feed(frames) == [] and on_line.bad_frames == 2


# -- data frames as the client reads them: streamed, never copied -------------------------------
def _stream_of_frames() -> bytes:
    big = os.urandom(300_000)
    pieces = [b"noise", p.encode({"t": "ok", "ch": 1}),
              b"".join(bytes(x) for x in p.data_parts(3, big, "stdout", checked=False)[0]),
              p.encode({"t": "data", "ch": 300, "s": "stderr", "d": b""}, checked=False),
              p.encode({"t": "data", "ch": 5, "d": b"other order", "s": "stdout"},
                       checked=False),                                     # decoded whole
              b"".join(p.encode_data(70000, os.urandom(5000), "stdout")),   # checked
              p.HEADER.pack(p.MAGIC_UNCHECKED, 40, 40 ^ 0xFFFFFFFF, 0) + b"\x84\xa1t\xa4data",
              b"".join(bytes(x) for x in p.data_parts(3, b"tail", "stdout", checked=False)[0]),
              p.encode({"t": "exit", "ch": 3, "code": 0})]
    return b"".join(pieces)


def _joined(messages: list[dict]) -> list[dict]:
    """Messages with consecutive data of one channel and stream joined into one."""
    out: list[dict] = []
    for m in messages:
        if m["t"] == "data":
            m = {**m, "d": bytes(m["d"])}
            last = out[-1] if out else None
            if last and last["t"] == "data" and (last["ch"], last["s"]) == (m["ch"], m["s"]):
                last["d"] += m["d"]
                continue
        out.append(m)
    return out


STREAM = _stream_of_frames()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, len(STREAM)), max_size=40))
def test_streamed_data_frames_are_what_whole_frames_decode_to(cuts):
    whole = p.FrameDecoder(accept_unchecked=True)
    want = whole.feed(STREAM)
    streaming = p.FrameDecoder(accept_unchecked=True, stream_data=True)
    got, pos = [], 0
    for cut in sorted(set(cuts)) + [len(STREAM)]:
        chunk = STREAM[pos:cut]
        pos = cut
        held = streaming.buffered     # a frame's start cut by the last feed: joined on
        for message in streaming.feed(chunk):
            if message["t"] == "data" and message["ch"] == 3:     # the unchecked frames
                assert isinstance(message["d"], memoryview)
                assert message["d"].obj is chunk or held        # a view of what was fed
            got.append(message)
    assert _joined(got) == _joined(want)
    assert (streaming.garbage_bytes, streaming.bad_frames) == \
        (whole.garbage_bytes, whole.bad_frames)
    assert streaming.buffered == 0


def test_an_unchecked_data_frame_comes_out_as_it_arrives():
    data = os.urandom(200_000)
    frame = b"".join(bytes(x) for x in p.data_parts(9, data, "stdout", checked=False)[0])
    decoder = p.FrameDecoder(accept_unchecked=True, stream_data=True)
    first = decoder.feed(frame[:100_000])
    assert [(m["t"], m["ch"], m["s"]) for m in first] == [("data", 9, "stdout")]
    rest = decoder.feed(frame[100_000:])
    assert bytes(first[0]["d"]) + bytes(rest[0]["d"]) == data
    assert decoder.buffered == 0


@pytest.mark.parametrize("checked", [True, False])
def test_a_frame_trickling_in_is_parsed_once_it_is_all_here(checked, monkeypatch):
    """A reader fed a big frame a few bytes at a time joined and parsed everything kept
    so far on every feed: quadratic copying a peer can ask for (a 1 MiB reply at a few
    bytes a read). The start is appended until the frame is whole."""
    reply = {"t": "ok", "ch": 4, "sessions": ["x" * 100 for _ in range(2000)]}
    frame = p.encode(reply, checked=checked)
    decoder = p.FrameDecoder(accept_unchecked=True, stream_data=True)
    parses = []
    real = decoder._frames
    monkeypatch.setattr(decoder, "_frames", lambda buf: (parses.append(len(buf)), real(buf))[1])
    got = []
    for at in range(0, len(frame), 997):
        got += decoder.feed(frame[at:at + 997])
    assert got == [reply]
    assert len(parses) <= 3, f"{len(parses)} parses of {len(frame)} bytes fed in 997s"
