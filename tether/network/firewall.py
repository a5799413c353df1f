"""The container firewall: one nftables table, `inet tether`, built as data from the
endpoints' trust levels and published ports, and replaced in one transaction.

Semantics follow the reference's later revision (vmware/vic cmd/tether/ops_linux.go
setupFirewall, lib/tether/netfilter), per endpoint, on its interface:
  open      accept everything in, out and forwarded; redirects
  closed    nothing (the policy drops it)
  outbound  established/related in, everything out
  peers     outbound + redirects + everything from the network's pools + ping from them
  published outbound + ping + each published port (+ its redirect); also unspecified and
            unknown levels
  a network of type "bridge": outbound + everything from its pools
A DHCP endpoint that is not open also passes UDP 67-68 both ways. Loopback and IPv6
neighbour discovery (IPv6's ARP) always pass. Everything else is dropped: input, output
and forward chains have policy drop, as the reference's bootstrap set.

Applying is atomic: the batch adds the table, deletes it, and writes it again from
scratch, so the kernel switches from the old ruleset to the new one in one step and a
failed batch leaves the old one in place.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Mapping, Optional

from tether.console import escape_unprintable
from tether.log import get_logger

from .ports import PortSpec, PortSpecError, TrustLevel

FAMILY = "inet"
TABLE = "tether"
ND_TYPES = ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit",
            "nd-neighbor-advert"]

log = get_logger("tether.firewall")


class FirewallError(Exception):
    """The ruleset cannot be built (a bad port spec) or nftables refused it."""


@dataclasses.dataclass(frozen=True)
class EndpointPolicy:
    """What the firewall needs to know about one endpoint."""
    name: str
    ifname: str
    trust: TrustLevel
    bridge: bool = False
    dynamic: bool = False
    pools: tuple[tuple[str, str], ...] = ()     # (first, last) address ranges
    ports: tuple[PortSpec, ...] = ()


# -- config -> policies ------------------------------------------------------------------------
def _text(ip) -> Optional[str]:
    addr = ip.address() if ip is not None and len(ip) else None
    return str(addr) if addr is not None else None


def _pools(network) -> tuple[tuple[str, str], ...]:
    out = []
    for pool in network.pools or []:
        first, last = _text(pool.first_ip), _text(pool.last_ip)
        if first is None:
            continue
        last = last or first
        if ipaddress.ip_address(first).version != ipaddress.ip_address(last).version:
            raise FirewallError(f"pool {first}-{last} mixes IPv4 and IPv6")
        out.append((first, last))
    return tuple(out)


def policies(networks: Optional[Mapping[str, Any]],
             interfaces: Mapping[str, str]) -> list[EndpointPolicy]:
    """One policy per endpoint with a known interface. Raises FirewallError naming the
    endpoint and spec when a port spec is bad (nothing is applied then)."""
    from . import is_unspecified
    out = []
    for name, endpoint in sorted((networks or {}).items()):
        if endpoint is None:
            continue
        where = f"network {name}"
        try:
            ports = tuple(endpoint.port_specs(where))
            pools = _pools(endpoint.network)
        except (PortSpecError, FirewallError) as err:
            raise FirewallError(str(err) if isinstance(err, PortSpecError)
                                else f"{where}: {err}") from None
        ifname = interfaces.get(name)
        if not ifname:
            log.warning("%s: no interface, so no firewall rules: its traffic is dropped", where)
            continue
        out.append(EndpointPolicy(
            name=name, ifname=ifname, trust=endpoint.network.trust,
            bridge=endpoint.network.type == "bridge",
            dynamic=not endpoint.static and is_unspecified(endpoint.ip),
            pools=pools, ports=ports))
    return out


# -- policies -> nftables JSON -------------------------------------------------------------------
def _meta(key: str, value: Any) -> dict:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


def _payload(protocol: str, field: str, value: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": field}},
                      "right": value}}


def _ports(first: int, last: int) -> Any:
    return first if first == last else {"range": [first, last]}


def _established() -> dict:
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                      "right": ["established", "related"]}}


_ACCEPT = {"accept": None}


class _Builder:
    def __init__(self) -> None:
        self.commands: list[dict] = []

    def rule(self, chain: str, *expr: dict, comment: str = "") -> None:
        rule = {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}
        if comment:
            rule["comment"] = comment
        self.commands.append({"add": {"rule": rule}})


def _source_ranges(pools) -> list[tuple[str, Any]]:
    """(payload protocol, match value) per address family present in the pools."""
    by_family: dict[str, list] = {}
    for first, last in pools:
        proto = "ip" if ipaddress.ip_address(first).version == 4 else "ip6"
        by_family.setdefault(proto, []).append(first if first == last
                                               else {"range": [first, last]})
    return [(proto, {"set": values}) for proto, values in by_family.items()]


def _endpoint_rules(b: _Builder, p: EndpointPolicy) -> None:
    iif, oif = _meta("iifname", p.ifname), _meta("oifname", p.ifname)
    # The name is a guestinfo key, any text: nft refuses a ruleset over a NUL in a
    # comment, and lists a '"' in one unescaped (a listing nft cannot read back).
    tag = escape_unprintable(p.name).replace('"', "'")

    def outbound() -> None:
        b.rule("input", iif, _established(), _ACCEPT, comment=f"{tag}: replies")
        b.rule("output", oif, _ACCEPT, comment=f"{tag}: outbound")

    def ping(sources=None) -> None:
        for proto, l4, request, reply in (("ip", "icmp", "echo-request", "echo-reply"),
                                          ("ip6", "icmpv6", "echo-request", "echo-reply")):
            src = [_payload(pr, "saddr", v) for pr, v in sources or [] if pr == proto]
            if sources is not None and not src:
                continue
            b.rule("input", iif, *src, _payload(l4, "type", request), _ACCEPT,
                   comment=f"{tag}: ping")
            b.rule("output", oif, _payload(l4, "type", reply), _ACCEPT, comment=f"{tag}: ping")

    def from_pools() -> None:
        for proto, value in _source_ranges(p.pools):
            b.rule("input", iif, _payload(proto, "saddr", value), _ACCEPT,
                   comment=f"{tag}: peers")

    def redirects() -> None:
        for spec in p.ports:
            if spec.redirect:
                b.rule("prerouting", iif, _payload(spec.proto, "dport", spec.host),
                       {"redirect": {"port": spec.first}}, comment=f"{tag}: {spec.text}")

    def published() -> None:
        for spec in p.ports:
            b.rule("input", iif, _payload(spec.proto, "dport", _ports(spec.first, spec.last)),
                   _ACCEPT, comment=f"{tag}: {spec.text}")

    if p.dynamic and (p.bridge or p.trust is not TrustLevel.OPEN):
        dhcp = [_payload("udp", "sport", {"range": [67, 68]}),
                _payload("udp", "dport", {"range": [67, 68]})]
        b.rule("input", iif, *dhcp, _ACCEPT, comment=f"{tag}: DHCP")
        b.rule("output", oif, *dhcp, _ACCEPT, comment=f"{tag}: DHCP")
    if p.bridge:
        outbound()
        from_pools()
        return
    level = p.trust.effective()
    if level is TrustLevel.OPEN:
        redirects()
        for chain, match in (("input", iif), ("output", oif), ("forward", iif)):
            b.rule(chain, match, _ACCEPT, comment=f"{tag}: open")
    elif level is TrustLevel.CLOSED:
        pass
    elif level is TrustLevel.OUTBOUND:
        outbound()
    elif level is TrustLevel.PEERS:
        outbound()
        redirects()
        from_pools()
        ping(_source_ranges(p.pools))
    else:
        outbound()
        ping()
        published()
        redirects()


def ruleset(policies_: list[EndpointPolicy]) -> list[dict]:
    """The whole table as one batch of nftables JSON commands (see the module doc)."""
    table = {"family": FAMILY, "name": TABLE}
    b = _Builder()
    b.commands += [{"add": {"table": table}}, {"delete": {"table": table}},
                   {"add": {"table": table}}]
    for name, hook, kind, prio, policy in (("input", "input", "filter", 0, "drop"),
                                           ("output", "output", "filter", 0, "drop"),
                                           ("forward", "forward", "filter", 0, "drop"),
                                           ("prerouting", "prerouting", "nat", -100, "accept")):
        b.commands.append({"add": {"chain": {
            "family": FAMILY, "table": TABLE, "name": name, "type": kind, "hook": hook,
            "prio": prio, "policy": policy}}})
    b.rule("input", _meta("iifname", "lo"), _ACCEPT, comment="loopback")
    b.rule("output", _meta("oifname", "lo"), _ACCEPT, comment="loopback")
    b.rule("input", _payload("icmpv6", "type", {"set": ND_TYPES}), _ACCEPT,
           comment="IPv6 neighbour discovery")
    b.rule("output", _payload("icmpv6", "type", {"set": ND_TYPES}), _ACCEPT,
           comment="IPv6 neighbour discovery")
    for p in policies_:
        _endpoint_rules(b, p)
    return b.commands


def lockdown_ruleset() -> list[dict]:
    """Before the networks are configured: drop everything but loopback, neighbour
    discovery and DHCP, so no port is open while addresses come up."""
    commands = ruleset([])
    dhcp = [_payload("udp", "sport", {"range": [67, 68]}),
            _payload("udp", "dport", {"range": [67, 68]})]
    for chain in ("input", "output"):
        commands.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain,
                                          "expr": [*dhcp, _ACCEPT], "comment": "DHCP"}}})
    return commands


# -- applying ----------------------------------------------------------------------------------
class Firewall:
    """Owns the `inet tether` table of the namespace it runs in."""

    def __init__(self) -> None:
        self._nft = None
        self.applied: Optional[list[EndpointPolicy]] = None   # None: nothing applied yet

    def _handle(self):
        if self._nft is None:
            from .nft import Nft, NftError
            try:
                self._nft = Nft()
            except NftError as err:
                raise FirewallError(str(err)) from None
        return self._nft

    def _run(self, commands: list[dict]) -> None:
        from .nft import NftError
        try:
            self._handle().run(commands)
        except NftError as err:
            raise FirewallError(f"nftables refused the ruleset: {err}") from None

    def lockdown(self) -> None:
        self._run(lockdown_ruleset())

    def apply(self, networks, interfaces: Mapping[str, str]) -> list[EndpointPolicy]:
        """Build every endpoint's rules and replace the table in one transaction. On any
        error nothing changes and FirewallError says why."""
        wanted = policies(networks, interfaces)
        self._run(ruleset(wanted))
        self.applied = wanted
        for p in wanted:
            level = "bridge" if p.bridge else p.trust.effective().text
            log.info("firewall: %s on %s: %s%s", p.name, p.ifname, level,
                     "; ports " + " ".join(map(str, p.ports)) if p.ports else "")
        return wanted

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None



def apply_networks(firewall: Firewall, manager, networks) -> None:
    """Configure the networks (manager: a NetworkManager), then the firewall for every
    endpoint that has its interface, even when another endpoint failed. The first apply
    locks the namespace down before any address comes up. Raises FirewallError when the
    ruleset could not be applied (the message also carries any network error), else the
    network error, if any."""
    if firewall.applied is None:
        try:
            firewall.lockdown()
        except FirewallError as err:
            log.error("firewall: %s", err)
    network_error = None
    try:
        manager.apply()
    except Exception as err:   # noqa: BLE001 - the rules must go in regardless
        network_error = err
    try:
        firewall.apply(networks, manager.interfaces)
    except FirewallError as err:
        if network_error is not None:
            raise FirewallError(f"{err}; {network_error}") from None
        raise
    if network_error is not None:
        raise network_error
