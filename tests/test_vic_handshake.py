"""The serial sync handshake, sans-IO: the bytes of both versions, garbage, retries.

The client side of these exchanges is written out as the reference's port layer sends
it (vmware/vic pkg/serial), byte by byte, not taken from our ClientHandshake; the last
tests check our client against our server."""
from __future__ import annotations

import itertools

import pytest

from tether.attach.vic import handshake as hs

SYN, ACK, DEBUG_ACK, NAK = 0x16, 0x06, 0x07, 0x15


def fixed(*values):
    it = itertools.cycle(values)
    return lambda: next(it)


def test_head_exchange():
    server = hs.ServerHandshake("head", random_byte=fixed(0x41))
    assert server.receive(bytes((SYN, 0x10))) == bytes((ACK, 0x11, 0x41))
    assert not server.established
    assert server.receive(bytes((ACK, 0x42))) == bytes((ACK,))
    assert server.established and server.leftover == b""


def test_head_increment_wraps_without_the_high_bit():
    server = hs.ServerHandshake("head", random_byte=fixed(254))
    assert server.receive(bytes((SYN, 0xFF))) == bytes((ACK, 0x00, 254))
    assert server.receive(bytes((ACK, 255))) == bytes((ACK,))
    server = hs.ServerHandshake("head", random_byte=fixed(0x7F))
    assert server.receive(bytes((SYN, 0x01))) == bytes((ACK, 0x02, 0x7F))
    assert server.receive(bytes((ACK, 0x80))) == bytes((ACK,))   # not 0x80|... twice


def test_head_keeps_the_last_two_bytes_of_garbage():
    server = hs.ServerHandshake("head", random_byte=fixed(7))
    # line noise, a stale SYN, then the real one, all in one read
    assert server.receive(b"\x00\xff junk" + bytes((SYN, 3, SYN, 9))) == bytes((ACK, 10, 7))
    # a partial read waits for more
    assert server.receive(bytes((ACK,))) == b""
    assert server.receive(bytes((8,))) == bytes((ACK,))
    assert server.established


def test_head_bad_packets_nak_then_rest_and_retry():
    server = hs.ServerHandshake("head", random_byte=fixed(5, 6))
    assert server.receive(b"xy") == bytes((NAK,))
    assert server.resting and server.failures == 1
    assert "unexpected syn packet" in server.last_error
    # bytes that arrive while resting wait for the retry (the kernel would hold them)
    assert server.receive(bytes((SYN, 1))) == b""
    assert server.retry() == bytes((ACK, 2, 5))
    assert server.receive(bytes((ACK, 99))) == bytes((NAK,))    # wrong position
    assert "unexpected position" in server.last_error
    assert server.retry() == b""
    assert server.receive(bytes((SYN, 1))) == bytes((ACK, 2, 6))
    assert server.receive(bytes((ACK, 7))) == bytes((ACK,))
    assert server.established and server.failures == 2


def test_v09_exchange_and_leftover():
    server = hs.ServerHandshake("v0.9", random_byte=fixed(0x10))
    token = hs.inc_v09(0x10)
    assert token == 0x91
    assert server.receive(bytes((SYN, 0x85))) == bytes((ACK, 0x86, token))
    # no final ACK; what follows the client's ACK is already SSH
    assert server.receive(bytes((ACK, hs.inc_v09(token))) + b"SSH-2.0-Go\r\n") == b""
    assert server.established and server.leftover == b"SSH-2.0-Go\r\n"


def test_v09_high_bit_increment():
    server = hs.ServerHandshake("v0.9", random_byte=fixed(0))
    assert server.receive(bytes((SYN, 0xFF))) == bytes((ACK, 0x80, 0x81))
    assert server.receive(bytes((ACK, 0x82))) == b""
    assert server.established


def test_v09_debug_ack_echoes_the_probe():
    server = hs.ServerHandshake("v0.9", random_byte=fixed(0x20))
    token = hs.inc_v09(0x20)
    server.receive(bytes((SYN, 0x90)))
    out = server.receive(bytes((DEBUG_ACK, hs.inc_v09(token))) + hs.PROBE[:10])
    assert out == b"" and not server.established
    assert server.receive(hs.PROBE[10:]) == hs.PROBE
    assert server.receive(bytes((ACK,))) == b""
    assert server.established


def test_v09_rejects_a_wrong_ack():
    server = hs.ServerHandshake("v0.9", random_byte=fixed(0x20))
    server.receive(bytes((SYN, 0x90)))
    assert server.receive(bytes((0x33,))) == bytes((NAK,))
    assert "not an ack" in server.last_error


def test_the_versions_are_not_compatible():
    """A head server answers a v0.9 client's token with the wrong echo when the
    increment sets the high bit, and the other way round."""
    v09_client_token = 0x81      # inc_v09 of anything below 0x80 -> high bit set
    head = hs.ServerHandshake("head", random_byte=fixed(1))
    assert head.receive(bytes((SYN, 0xFF)))[1] == 0x00      # v0.9 expects 0x80
    head = hs.ServerHandshake("head", random_byte=fixed(1))
    head.receive(bytes((SYN, v09_client_token)))
    # the v0.9 client answers (s+1)|0x80 = 0x82; head expects 2
    assert head.receive(bytes((ACK, 0x82))) == bytes((NAK,))


@pytest.mark.parametrize("variant", ["head", "v0.9"])
def test_auto_answers_both(variant):
    for pos in range(256):
        if variant == "head" and pos == 0xFF:
            continue        # rand.Intn(255) never gives 255
        if variant == "v0.9" and pos < 0x80:
            continue        # inc_v09 always sets the high bit
        server = hs.ServerHandshake("auto", random_byte=fixed(pos * 7 % 256))
        reply = server.receive(bytes((SYN, pos)))
        expected_echo = hs.inc_head(pos) if variant == "head" else hs.inc_v09(pos)
        assert reply[:2] == bytes((ACK, expected_echo)), pos
        token = reply[2]
        if variant == "head":
            assert server.receive(bytes((ACK, hs.inc_head(token)))) == bytes((ACK,))
        else:
            assert server.receive(bytes((ACK, hs.inc_v09(token)))) == b""
        assert server.established and server.spoken == variant, pos


@pytest.mark.parametrize("variant", ["head", "v0.9"])
def test_our_client_against_our_server(variant):
    server = hs.ServerHandshake(variant)
    client = hs.ClientHandshake(variant, debug=(variant == "v0.9"))
    to_server = client.start()
    for _ in range(10):
        to_client = server.receive(to_server)
        to_server = client.receive(to_client) if to_client else b""
        if client.established and server.established:
            break
    assert client.established and server.established


def test_parse_variant():
    assert hs.parse_variant("HEAD") == "head"
    assert hs.parse_variant("0.9") == "v0.9"
    with pytest.raises(ValueError):
        hs.parse_variant("v2")
