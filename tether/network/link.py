"""Netlink actions on one link, as small functions of plain data (an IPRoute handed in).

Imported only when a network is configured: it imports pyroute2.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError

IFA_F_NODAD = 0x02
SCOPE_LINK = 253         # rtnetlink's RT_SCOPE_LINK: on the link, no gateway


def links(ipr) -> list[tuple[int, str, str]]:
    """(index, name, mac) of every link."""
    return [(m["index"], m.get("ifname"), m.get("address")) for m in ipr.get_links()]


def link_info(ipr, index: int) -> dict:
    m = ipr.get_links(index)[0]
    return {"index": index, "name": m.get("ifname"), "alias": m.get("ifalias"),
            "mac": m.get("address"), "mtu": m.get("mtu"), "up": bool(m["flags"] & 1)}


def name_link(ipr, index: int, name: str, log) -> str:
    """Rename an `eth*` link to `name`, else give it the alias `name`; return its name.

    Nothing to do when the name or alias already is `name` (a second endpoint on the NIC).
    """
    info = link_info(ipr, index)
    if not name or name in (info["name"], info["alias"]):
        return info["name"]
    if info["name"].startswith("eth"):
        ipr.link("set", index=index, state="down")
        try:
            ipr.link("set", index=index, ifname=name)
            return name
        except NetlinkError as exc:
            log.warning("cannot rename %s to %s (%s); setting it as the alias instead",
                        info["name"], name, exc.args[-1] if exc.args else exc)
    if not info["alias"]:
        ipr.link("set", index=index, ifalias=name)
    else:
        log.warning("link %s already has the alias %s; not adding %s (one alias per link)",
                    info["name"], info["alias"], name)
    return info["name"]


def set_up(ipr, index: int) -> None:
    ipr.link("set", index=index, state="up")


def set_mtu(ipr, index: int, mtu: int) -> None:
    ipr.link("set", index=index, mtu=mtu)


def add_address(ipr, index: int, cidr: str, log) -> None:
    """Add an address; an address already there is fine."""
    iface = ipaddress.ip_interface(cidr)
    kwargs = {"index": index, "address": str(iface.ip), "prefixlen": iface.network.prefixlen}
    if iface.version == 6:
        kwargs["flags"] = IFA_F_NODAD    # usable at once: routes via it can be added now
    else:
        kwargs["broadcast"] = str(iface.network.broadcast_address) \
            if iface.network.prefixlen < 31 else None
    if kwargs.get("broadcast") is None:
        kwargs.pop("broadcast", None)
    try:
        ipr.addr("add", **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        log.debug("address %s already on link %d", cidr, index)


def del_address(ipr, index: int, cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    try:
        ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
            raise


def set_default_route(ipr, index: int, gateway: str) -> None:
    """Make the default route of this family on this link the one via `gateway`. The new
    route goes in before the old ones go, so a gateway the kernel refuses leaves the
    route there was. A gateway outside the link's subnets (a cloud's /32 lease) is
    reached through a host route to it on the link, as DHCP clients do."""
    version = ipaddress.ip_address(gateway).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    dst = "::/0" if version == 6 else "0.0.0.0/0"
    old = [route.get("gateway") for route in ipr.get_routes(family=family, oif=index)
           if route["dst_len"] == 0 and route["table"] == 254]
    try:
        ipr.route("replace", dst=dst, gateway=gateway, oif=index, family=family)
    except NetlinkError as exc:
        if exc.code != errno.ENETUNREACH:
            raise
        ipr.route("replace", dst=f"{gateway}/{128 if version == 6 else 32}", oif=index,
                  family=family, scope=SCOPE_LINK)
        ipr.route("replace", dst=dst, gateway=gateway, oif=index, family=family)
    for old_gateway in old:
        if old_gateway == gateway:
            continue
        try:
            ipr.route("del", dst=dst, oif=index, family=family, gateway=old_gateway)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:     # `replace` took its place
                raise


def add_route(ipr, index: int, destination: str, gateway: str) -> None:
    network = ipaddress.ip_network(destination, strict=False)
    family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
    ipr.route("replace", dst=str(network), gateway=gateway, oif=index, family=family)


def enable_link_notify(ifname: str) -> None:
    """arp_notify / ndisc_notify: the kernel announces the link's addresses on changes."""
    for path in (f"/proc/sys/net/ipv4/conf/{ifname}/arp_notify",
                 f"/proc/sys/net/ipv6/conf/{ifname}/ndisc_notify"):
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError:
            pass    # IPv6 disabled, or a read-only /proc/sys: the explicit ARP still goes


def gratuitous_arp_frame(mac: str, ip: str) -> bytes:
    """A broadcast ARP request with sender = target = ip (RFC 5227 announcement)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = socket.inet_aton(ip)
    ether = b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\x00" * 6 + addr
    return ether + arp


def send_gratuitous_arp(ifname: str, mac: str, ip: str) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0x0806))
        s.send(gratuitous_arp_frame(mac, ip))
