"""Port specs (`NetworkEndpoint.Ports`) and trust levels (`ContainerNetwork.TrustLevel`):
their text forms, parsed into data the firewall builds its rules from. Pure, no imports
beyond the standard library.

A port spec is `[HOST:]PORT[-LAST][/PROTO]`, as `docker run -p` writes it without the
address: `80/tcp`, `5000-5010/udp`, `9000:80/tcp` (connections to 9000 are redirected to
80). The protocol is tcp or udp; Docker's default, tcp, when left out. A redirect maps one
port to one port (the reference refuses ranges there too).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Optional


class PortSpecError(ValueError):
    """A port spec that cannot be applied; the message quotes it and says what is wrong."""


class TrustLevel(enum.IntEnum):
    """vmware/vic lib/config/executor TrustLevel: the int the wire carries, in its order."""
    UNSPECIFIED = 0
    PUBLISHED = 1
    OPEN = 2
    CLOSED = 3
    OUTBOUND = 4
    PEERS = 5

    @property
    def text(self) -> str:
        """The reference's String(): "" for unspecified."""
        return "" if self is TrustLevel.UNSPECIFIED else self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "TrustLevel":
        """The reference's ParseTrustLevel: case-insensitive, "" is unspecified."""
        key = text.strip().lower()
        for level in cls:
            if level.text == key:
                return level
        names = ", ".join(level.text for level in cls if level.text)
        raise ValueError(f"unknown trust level {text!r} (use one of: {names})")

    @classmethod
    def of(cls, value: int) -> "TrustLevel":
        """The level a wire value means. Unknown numbers get the published rules, as the
        reference's firewall does (its default case)."""
        try:
            return cls(value)
        except ValueError:
            return cls.PUBLISHED

    def effective(self) -> "TrustLevel":
        return TrustLevel.PUBLISHED if self is TrustLevel.UNSPECIFIED else self


PROTOCOLS = ("tcp", "udp")


@dataclasses.dataclass(frozen=True)
class PortSpec:
    """One parsed port spec: the container ports `first..last` are published over `proto`;
    when `host` is set, connections to port `host` are redirected to `first`."""
    proto: str
    first: int
    last: int
    host: Optional[int] = None
    text: str = ""

    @property
    def redirect(self) -> bool:
        return self.host is not None and self.host != self.first

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        if self.redirect:
            ports = f"{self.host}:{ports}"
        return f"{ports}/{self.proto}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise PortSpecError(f"port spec {spec!r}: {text!r} is not a port number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise PortSpecError(f"port spec {spec!r}: port {value} is out of range (1-65535)")
    return value


def _range(text: str, spec: str) -> tuple[int, int]:
    first_text, dash, last_text = text.partition("-")
    first = _port(first_text, spec)
    last = _port(last_text, spec) if dash else first
    if last < first:
        raise PortSpecError(f"port spec {spec!r}: the range {first}-{last} runs backwards")
    return first, last


def parse_port(spec: str) -> PortSpec:
    """`9000:80/tcp` -> PortSpec('tcp', 80, 80, host=9000). Raises PortSpecError."""
    if not isinstance(spec, str) or not spec.strip():
        raise PortSpecError(f"port spec {spec!r}: empty")
    text = spec.strip()
    ports, slash, proto = text.partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in PROTOCOLS:
        raise PortSpecError(f"port spec {spec!r}: unknown protocol {proto!r} (use tcp or udp)")
    parts = ports.split(":")
    if len(parts) > 2:
        raise PortSpecError(f"port spec {spec!r}: expected [HOST:]PORT[-LAST][/tcp|udp] "
                            "(a host address cannot be given here)")
    first, last = _range(parts[-1], spec)
    host = None
    if len(parts) == 2:
        host_first, host_last = _range(parts[0], spec)
        if (host_first, host_last) != (first, last):
            if host_first != host_last or first != last:
                raise PortSpecError(f"port spec {spec!r}: a redirect maps one port to one "
                                    "port, not a range")
            host = host_first
    return PortSpec(proto, first, last, host, text)


def parse_ports(specs: Optional[Iterable[str]], where: str = "") -> list[PortSpec]:
    """Every spec of an endpoint, or PortSpecError naming the endpoint and the first bad one."""
    out = []
    for spec in specs or ():
        try:
            out.append(parse_port(spec))
        except PortSpecError as err:
            raise PortSpecError(f"{where}: {err}" if where else str(err)) from None
    return out
