"""A scriptable, deliberately hostile DHCP server for tests/test_network_hostile.py.

Usage: python tests/test_network_hostile_server.py IFNAME SERVER_IP LEASE_IP
(run under `ip netns exec PEER_NS`). No tests here.

It answers DISCOVER with OFFER and REQUEST with ACK (or NAK), each carrying the options of
the current script, and reads JSON commands from stdin, one a line:
  {"options": {...}}   the options of every later OFFER/ACK:
                       mask, routers, dns, mtu, lease, t1, t2 (plain values), raw (hex:
                       option bytes appended as they are, malformed ones included)
  {"nak": true|false}  answer REQUESTs with NAK
  {"send": "hex"}      broadcast these bytes as a DHCP payload to port 68, once
It prints one JSON line per event: ready, discover, request, ack, nak, sent.
"""
from __future__ import annotations

import json
import selectors
import socket
import struct
import sys

COOKIE = b"c\x82Sc"
DISCOVER, OFFER, REQUEST, ACK, NAK = 1, 2, 3, 5, 6


def option(code: int, data: bytes) -> bytes:
    return bytes([code, len(data)]) + data


def encode_options(options: dict) -> bytes:
    out = b""
    ip4 = socket.inet_aton
    if options.get("mask") is not None:
        out += option(1, ip4(options["mask"]))
    if options.get("routers") is not None:
        out += option(3, b"".join(ip4(r) for r in options["routers"]))
    if options.get("dns") is not None:
        out += option(6, b"".join(ip4(s) for s in options["dns"]))
    if "mtu" in options:
        out += option(26, struct.pack("!H", options["mtu"]))
    for key, code in (("lease", 51), ("t1", 58), ("t2", 59)):
        if key in options:
            out += option(code, struct.pack("!I", options[key] & 0xFFFFFFFF))
    return out + bytes.fromhex(options.get("raw", ""))


def reply(request: bytes, kind: int, yiaddr: str, server: str, options: dict) -> bytes:
    xid, chaddr = request[4:8], request[28:44]
    head = struct.pack("!BBBB", 2, 1, 6, 0) + xid + b"\0" * 4 + b"\0" * 4
    head += socket.inet_aton(yiaddr if kind != NAK else "0.0.0.0")
    head += socket.inet_aton(server) + b"\0" * 4 + chaddr + b"\0" * 192
    body = option(53, bytes([kind])) + option(54, socket.inet_aton(server))
    if kind != NAK:
        body += encode_options(options)
    return head + COOKIE + body + b"\xff"


def message_type(packet: bytes):
    i = 240
    while i + 1 < len(packet):
        code = packet[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            return None
        length = packet[i + 1]
        if code == 53 and length == 1:
            return packet[i + 2]
        i += 2 + length
    return None


def main() -> None:
    ifname, server, lease_ip = sys.argv[1:4]
    options: dict = {"mask": "255.255.255.0", "lease": 120}
    nak = False
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    sock.bind(("0.0.0.0", 67))

    def emit(**event) -> None:
        print(json.dumps(event), flush=True)

    def broadcast(payload: bytes) -> None:
        sock.sendto(payload, ("255.255.255.255", 68))

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "net")
    sel.register(sys.stdin, selectors.EVENT_READ, "cmd")
    emit(event="ready")
    while True:
        for key, _ in sel.select():
            if key.data == "cmd":
                line = sys.stdin.readline()
                if not line:
                    return
                cmd = json.loads(line)
                if "options" in cmd:
                    options = cmd["options"]
                if "nak" in cmd:
                    nak = cmd["nak"]
                if "send" in cmd:
                    broadcast(bytes.fromhex(cmd["send"]))
                    emit(event="sent")
                continue
            packet, _ = sock.recvfrom(4096)
            kind = message_type(packet)
            if kind == DISCOVER:
                emit(event="discover")
                broadcast(reply(packet, OFFER, lease_ip, server, options))
            elif kind == REQUEST:
                emit(event="request")
                if nak:
                    broadcast(reply(packet, NAK, lease_ip, server, options))
                    emit(event="nak")
                else:
                    broadcast(reply(packet, ACK, lease_ip, server, options))
                    emit(event="ack", options=options)


if __name__ == "__main__":
    main()
