"""Python stand-ins for the Go types whose shape is part of the wire format."""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Annotated, Any, Optional

from .schema import untagged


class IP(bytes):
    """Go's net.IP: raw bytes, 4 or 16 long. Both lengths are kept as given."""

    @classmethod
    def parse(cls, text: str, *, v4_in_16: bool = False) -> "IP":
        addr = ipaddress.ip_address(text)
        if v4_in_16 and addr.version == 4:
            return cls(ipaddress.IPv6Address("::ffff:" + text).packed)
        return cls(addr.packed)

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if len(self) == 4:
            return ipaddress.IPv4Address(bytes(self))
        if len(self) == 16:
            v6 = ipaddress.IPv6Address(bytes(self))
            return v6.ipv4_mapped or v6
        return None

    def __str__(self) -> str:
        addr = self.address()
        return str(addr) if addr is not None else "<nil>"

    def __repr__(self) -> str:
        return f"IP({str(self)!r}, {len(self)})"


class IPMask(bytes):
    """Go's net.IPMask: raw bytes."""

    def prefixlen(self) -> int:
        return sum(bin(b).count("1") for b in self)


@dataclasses.dataclass
class IPNet:
    """Go's net.IPNet: two untagged fields, IP and Mask."""
    ip: IP = untagged("IP", default_factory=lambda: IP(b""))
    mask: IPMask = untagged("Mask", default_factory=lambda: IPMask(b""))

    @classmethod
    def parse(cls, cidr: str) -> "IPNet":
        """`10.0.0.2/24` keeps the host address (like Go's ParseCIDR's IP, not its network)."""
        iface = ipaddress.ip_interface(cidr)
        return cls(IP(iface.ip.packed), IPMask(iface.netmask.packed))

    def is_zero(self) -> bool:
        return not self.ip and not self.mask

    def __str__(self) -> str:
        if self.is_zero():
            return ""
        if not self.mask:
            return str(self.ip)
        return f"{self.ip}/{self.mask.prefixlen()}"


@dataclasses.dataclass
class Userinfo:
    """Go's url.Userinfo has only unexported fields, so it never produces keys."""
    username: str = ""
    password: Optional[str] = None


@dataclasses.dataclass
class URL:
    """Go 1.8's net/url.URL field set (the toolchain VIC shipped with), all untagged."""
    scheme: str = untagged("Scheme", default="")
    opaque: str = untagged("Opaque", default="")
    user: Optional[Userinfo] = untagged("User", default=None)
    host: str = untagged("Host", default="")
    path: str = untagged("Path", default="")
    raw_path: str = untagged("RawPath", default="")
    force_query: bool = untagged("ForceQuery", default=False)
    raw_query: str = untagged("RawQuery", default="")
    fragment: str = untagged("Fragment", default="")


class GoKind:
    """An `Annotated` marker for Go kinds Python has no type for (their wire rules differ)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"GoKind({self.name!r})"


UINT = GoKind("uint")            # uint fields write nothing and read nothing (slices of them do)
FLOAT32 = GoKind("float32")      # widened to float64 on encode; decoding one is an error
INTERFACE = GoKind("interface")  # interface{} fields write and read nothing
ARRAY = GoKind("array")          # fixed-size array: encodes like a slice; decoding one is an error

Uint = Annotated[int, UINT]
Float32 = Annotated[float, FLOAT32]
Interface = Annotated[Optional[object], INTERFACE]
Duration = int                   # time.Duration: integer nanoseconds


def Array(elem: Any) -> Any:
    """`[N]T`: a list with ARRAY semantics."""
    return Annotated[list[elem], ARRAY]
