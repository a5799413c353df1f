"""Python stand-ins for the Go types whose shape is part of the wire format.

`ipaddress` is imported where text forms are made or read, not at import: decoding
guestinfo needs only the bytes (PID 1's startup).
"""
from __future__ import annotations

from .record import record
from .schema import untagged


class IP(bytes):
    """Go's net.IP: raw bytes, 4 or 16 long. Both lengths are kept as given."""

    @classmethod
    def parse(cls, text: str, *, v4_in_16: bool = False) -> "IP":
        import ipaddress
        addr = ipaddress.ip_address(text)
        if v4_in_16 and addr.version == 4:
            return cls(ipaddress.IPv6Address("::ffff:" + text).packed)
        return cls(addr.packed)

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        import ipaddress
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


@record
class IPNet:
    """Go's net.IPNet: two untagged fields, IP and Mask."""
    ip: IP = untagged("IP", default_factory=lambda: IP(b""))
    mask: IPMask = untagged("Mask", default_factory=lambda: IPMask(b""))

    @classmethod
    def parse(cls, cidr: str) -> "IPNet":
        """`10.0.0.2/24` keeps the host address (like Go's ParseCIDR's IP, not its network);
        a bare address gets the full mask."""
        import ipaddress
        iface = ipaddress.ip_interface(cidr)
        return cls(IP(iface.ip.packed), IPMask(iface.netmask.packed))

    def is_zero(self) -> bool:
        return not self.ip and not self.mask

    def prefixlen(self) -> int | None:
        """The mask's length as Go's IPNet.String() counts it: for an IPv4 address with a
        16-byte mask only the mask's last 4 bytes count (/24, not /120). None: no mask."""
        if not self.mask:
            return None
        mask = self.mask
        addr = self.ip.address()
        if addr is not None and addr.version == 4 and len(mask) == 16:
            mask = IPMask(mask[12:])
        return mask.prefixlen()

    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
        """The address with its prefix (the full length when there is no mask); None when
        the IP is not a 4- or 16-byte address."""
        addr = self.ip.address()
        if addr is None:
            return None
        bits = self.prefixlen()
        import ipaddress
        return ipaddress.ip_interface((addr, addr.max_prefixlen if bits is None else bits))

    def __str__(self) -> str:
        """`10.0.0.2/24` (the host address kept, unlike Go, which prints the network),
        the bare address without a mask, "" for the zero value. The one text form: the
        JSON form, the network code and the logs all use it."""
        if self.is_zero():
            return ""
        bits = self.prefixlen()
        return str(self.ip) if bits is None else f"{self.ip}/{bits}"


@record
class Userinfo:
    """Go's url.Userinfo has only unexported fields, so it never produces keys."""
    username: str = ""
    password: str | None = None


@record
class URL:
    """Go 1.8's net/url.URL field set (the toolchain VIC shipped with), all untagged."""
    scheme: str = untagged("Scheme", default="")
    opaque: str = untagged("Opaque", default="")
    user: Userinfo | None = untagged("User", default=None)
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

Duration = int                   # time.Duration: integer nanoseconds


def Array(elem):
    """`[N]T`: a list with ARRAY semantics."""
    from typing import Annotated
    return Annotated[list[elem], ARRAY]


def __getattr__(name: str):
    """Uint, Float32 and Interface, made when first asked for: `Annotated` is typing's,
    and the agent's config model uses none of them."""
    if name not in ("Uint", "Float32", "Interface"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from typing import Annotated, Optional
    base, kind = {"Uint": (int, UINT), "Float32": (float, FLOAT32),
                  "Interface": (Optional[object], INTERFACE)}[name]
    value = globals()[name] = Annotated[base, kind]
    return value
