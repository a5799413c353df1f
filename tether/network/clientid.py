"""The DHCP client identifier (option 61) the reference sends: RFC 4361 form,
type 255 || IAID (4 bytes) || DUID-EN (type 2, PEN 6876 = VMware, 8-byte machine hash).

Pure functions; SipHash-2-4 is written out because the stdlib does not expose it keyed.
"""
from __future__ import annotations

import re
import struct
import uuid

# The fixed SipHash key of VIC's DHCP client (lib/dhcp/client/id.go), so a server sees
# the same client identifier from us as from the reference for the same VM and NIC.
HASH_KEY = bytes.fromhex("c4eb389e4ed9481293a6b70b9b07cc2b")
VMWARE_PEN = 6876
DUID_TYPE_EN = 2
CLIENT_ID_TYPE = 255    # RFC 4361: IAID + DUID follow

_MASK = 0xFFFFFFFFFFFFFFFF


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 of `data` with a 16-byte key, as an unsigned 64-bit integer."""
    k0, k1 = struct.unpack("<QQ", key)
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _MASK; v1 = _rotl(v1, 13) ^ v0; v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _MASK; v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _MASK; v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _MASK; v1 = _rotl(v1, 17) ^ v2; v2 = _rotl(v2, 32)

    tail = len(data) % 8
    for (m,) in struct.iter_unpack("<Q", data[:len(data) - tail]):
        v3 ^= m
        rounds(2)
        v0 ^= m
    last = (len(data) & 0xFF) << 56 | int.from_bytes(data[len(data) - tail:], "little")
    v3 ^= last
    rounds(2)
    v0 ^= last
    v2 ^= 0xFF
    rounds(4)
    return v0 ^ v1 ^ v2 ^ v3


def iaid(mac: bytes) -> bytes:
    """4 bytes: the 64-bit hash of the MAC folded high ^ low."""
    h = siphash24(HASH_KEY, mac)
    return struct.pack(">I", (h & 0xFFFFFFFF) ^ (h >> 32))


def duid_en(machine_id: str) -> bytes:
    """DUID-EN, all big-endian: type, PEN, then the hash of the machine UUID's 16 raw bytes
    (text that is not a UUID, such as an empty id, is hashed as its UTF-8 bytes)."""
    try:
        raw = uuid.UUID(machine_id).bytes
    except ValueError:
        raw = machine_id.encode()
    return struct.pack(">HIQ", DUID_TYPE_EN, VMWARE_PEN, siphash24(HASH_KEY, raw))


def client_id(mac: bytes, machine_id: str) -> bytes:
    """The option 61 payload after its type byte (type 255 goes in front on the wire)."""
    return iaid(mac) + duid_en(machine_id)


def vmware_serial_to_uuid(serial: str) -> str | None:
    """`VMware-56 4d 7c 3a ... -55 aa ...` -> `564d7c3a-....-....-....-............`."""
    if not serial.startswith("VMware-"):
        return None
    digits = re.sub(r"[^0-9a-fA-F]", "", serial[len("VMware-"):])
    if len(digits) != 32:
        return None
    d = digits.lower()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}"


def machine_id(sys_dmi: str = "/sys/class/dmi/id") -> str:
    """The machine UUID: the VMware serial reformatted, else the DMI UUID, else machine-id."""
    for name, convert in (("product_serial", vmware_serial_to_uuid),
                          ("product_uuid", lambda s: s.lower() or None)):
        try:
            with open(f"{sys_dmi}/{name}") as f:
                value = convert(f.read().strip())
            if value:
                return value
        except OSError:
            pass
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip()
    except OSError:
        return ""
