"""Networking: NICs, addresses (static and DHCP), routes, and the DNS/hosts entries.

Importing this package is cheap: pyroute2 (about 250 ms natively, seconds under TCG) is
imported only by `NetworkManager.apply()` when the config has networks.

Threads: the config belongs to the agent's loop thread. DHCP runs on its own thread
(`dhcp.py`); a lease that arrives, renews or expires is posted to the loop (`post`, the
loop's call_soon_threadsafe) and applied there, so a write-back, which also runs on the
loop, never sees an endpoint half updated.

MTU: the wire model has no MTU field, so it comes from, in order: the `mtus` argument
(endpoint name -> MTU, for callers that know it), the DHCP lease's interface-MTU option
(26), else the NIC keeps the MTU its device reports (the host sets it on the vNIC, e.g.
virtio-net `host_mtu=`).
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Mapping, Optional

from extraconfig.types import IP, IPNet
from tether.log import Logger


class NetworkError(Exception):
    pass


def _ip_text(ip: Optional[IP]) -> Optional[str]:
    if ip is None:
        return None
    addr = ip.address()
    return None if addr is None else str(addr)


def _cidr(net: Optional[IPNet]) -> Optional[str]:
    """`10.0.0.2/24` for netlink and comparisons (the full prefix when there is no mask),
    or None when unset."""
    iface = net.interface() if net is not None and net.ip else None
    return None if iface is None else str(iface)


def is_unspecified(net: Optional[IPNet]) -> bool:
    if net is None or not net.ip:
        return True
    addr = net.ip.address()
    return addr is None or addr.is_unspecified


class NetworkManager:
    """Applies `config.networks` to the kernel; keeps DHCP leases and renews them."""

    def __init__(self, config, etc, publish: Callable[[], None], log: Logger,
                 hostname: str = "", mtus: Optional[Mapping[str, int]] = None,
                 dhcp_timeout: float = 30.0, *, post: Callable[[Callable[[], None]], None]):
        """`publish()` writes the config back; `post(fn)` runs fn on the loop thread (the
        loop's call_soon_threadsafe). Every method runs on the loop thread."""
        self.config = config
        self.etc = etc
        self.publish = publish
        self.post = post
        self.log = log
        self.hostname = hostname
        self.mtus = dict(mtus or {})
        self.dhcp_timeout = dhcp_timeout
        self._configured: dict[str, str] = {}     # endpoint name -> config it was applied from
        self._nic_index: dict[str, int] = {}      # endpoint id -> link index (names change)
        # At boot apply() waits for a new endpoint's first DHCP lease (the sessions need
        # the network); after that (a reload) it must not hold the loop: the lease is
        # applied on the loop when it comes, as a renewal is.
        self.wait_for_leases = True
        self.interfaces: dict[str, str] = {}      # endpoint name -> its NIC's name (firewall)
        self._dhcp = None                          # DhcpService, started on first need

    # -- public ------------------------------------------------------------------------------
    def apply(self) -> None:
        """Configure every endpoint not configured yet; publish; raise NetworkError listing
        the endpoints that failed (the others are configured regardless)."""
        networks = {k: v for k, v in (self.config.networks or {}).items() if v is not None}
        pending = {k: v for k, v in networks.items()
                   if self._configured.get(k) != _applied_signature(v)}
        if not pending:
            return
        from pyroute2 import IPRoute
        errors = []
        with IPRoute() as ipr:
            for name, endpoint in pending.items():
                try:
                    self._apply_endpoint(ipr, name, endpoint)
                    self._configured[name] = _applied_signature(endpoint)
                except NetworkError as exc:
                    errors.append(str(exc))
                except Exception as exc:   # netlink and OS errors: say which endpoint
                    errors.append(f"network {name}: {_describe(exc)}")
        self._flush_and_publish()
        if errors:
            raise NetworkError("; ".join(errors))

    def stop(self) -> None:
        """Release DHCP leases and stop the renewal thread."""
        service, self._dhcp = self._dhcp, None
        if service is not None:
            service.stop()

    # -- one endpoint ----------------------------------------------------------------------
    def _apply_endpoint(self, ipr, name: str, endpoint) -> None:
        from . import link
        ifname, index = self._find_nic(ipr, name, endpoint)
        link.enable_link_notify(ifname)
        ifname = link.name_link(ipr, index, endpoint.common.name, self.log)
        self.interfaces[name] = ifname
        if name in self.mtus:
            link.set_mtu(ipr, index, self.mtus[name])
        link.set_up(ipr, index)

        dynamic = not endpoint.static and is_unspecified(endpoint.ip)
        if not dynamic:
            if endpoint.ip is None:
                raise NetworkError(f"network {name}: static endpoint without an IP address; "
                                   "set ip, or 0.0.0.0 when it is managed externally")
            if is_unspecified(endpoint.ip):
                self.log.info("network %s: address managed externally; link %s is up",
                              name, ifname)
                return
            self._apply_address(ipr, index, ifname, name, endpoint, lease=None)
            return
        handle = self._dhcp_for(ipr, index, ifname, endpoint)
        if handle.lease is None and not self.wait_for_leases:
            self._first_lease_later(name, ifname, handle)
            return
        from .dhcp import UnusableLease
        try:
            lease = handle.lease or handle.wait_first(self.dhcp_timeout)
        except UnusableLease as exc:
            self._dhcp.stop_one(ifname)
            raise NetworkError(f"network {name}: {exc}") from None
        except Exception:
            self._dhcp.stop_one(ifname)
            raise NetworkError(
                f"network {name}: no DHCP lease on {ifname} within {self.dhcp_timeout:g}s; "
                "is a DHCP server reachable on that network?") from None
        self._apply_address(ipr, index, ifname, name, endpoint, lease=lease)

    def _first_lease_later(self, name: str, ifname: str, handle) -> None:
        """Do not wait for the first lease: when it comes, it goes to the loop like a
        renewal (`_on_lease`); if it has not come in dhcp_timeout, say so."""
        import threading
        self.log.info("network %s: asking for a DHCP lease on %s (applied when it comes)",
                      name, ifname)

        def arrived(future) -> None:     # on the DHCP thread, or at once
            if not future.cancelled() and future.exception() is None:
                self._lease_event(ifname, future.result(), "bound")

        def late() -> None:              # on the loop
            if self._dhcp is not None and handle.lease is None:
                self.log.error("network %s: no DHCP lease on %s within %gs; still asking",
                               name, ifname, self.dhcp_timeout)
        handle.first_lease.add_done_callback(arrived)
        timer = threading.Timer(self.dhcp_timeout, lambda: self.post(late))
        timer.daemon = True
        timer.start()

    def _find_nic(self, ipr, name: str, endpoint) -> tuple[str, int]:
        from . import link
        from .nic import NicNotFound, find_interface_name
        endpoint_id = endpoint.common.id
        if not endpoint_id:
            raise NetworkError(f"network {name}: endpoint has no ID (a PCI slot, PCI address, "
                               "MAC address or interface name)")
        if endpoint_id in self._nic_index:
            index = self._nic_index[endpoint_id]
            return link.link_info(ipr, index)["name"], index
        all_links = link.links(ipr)
        try:
            ifname = find_interface_name(endpoint_id, all_links)
        except NicNotFound as exc:
            raise NetworkError(f"network {name}: {exc}") from None
        index = next(i for i, n, _ in all_links if n == ifname)
        self._nic_index[endpoint_id] = index
        return ifname, index

    def _apply_address(self, ipr, index: int, ifname: str, name: str, endpoint,
                       lease) -> None:
        from . import link
        network = endpoint.network
        if lease is None:
            new = _cidr(endpoint.ip)
            gateway_net = network.gateway
            dynamic_dns: list[str] = []
        else:
            new = f"{lease.ip}/{lease.prefixlen}"
            if lease.routers:
                gateway_net = IPNet.parse(f"{lease.routers[0]}/{lease.prefixlen}")
            else:
                gateway_net = network.gateway
            dynamic_dns = list(lease.dns)
            if lease.mtu and name not in self.mtus:
                try:
                    link.set_mtu(ipr, index, lease.mtu)
                except Exception as exc:   # more than the NIC takes: the lease still applies
                    self.log.warning("network %s: the lease's MTU %d on %s: %s",
                                     name, lease.mtu, ifname, _describe(exc))

        old = _cidr(endpoint.assigned)
        if old and old != new and not self._shared_address(name, endpoint, old):
            link.del_address(ipr, index, old)
        link.add_address(ipr, index, new, self.log)

        # write-back (read-write fields)
        iface = ipaddress.ip_interface(new)
        endpoint.assigned = IPNet.parse(str(iface))
        network.assigned.gateway = gateway_net if gateway_net is not None else IPNet()
        if lease is None:
            network.assigned.nameservers = network.nameservers
        elif dynamic_dns:
            network.assigned.nameservers = [IP(ipaddress.ip_address(s).packed)
                                            for s in dynamic_dns]
        elif network.nameservers:
            network.assigned.nameservers = network.nameservers

        gateway = _ip_text(network.assigned.gateway.ip) if network.assigned.gateway else None
        if gateway:
            self._apply_routes(ipr, index, name, network, gateway)

        network_name = network.common.name or name
        self.etc.set_network_host(network_name, str(iface.ip))
        static_dns = [s for s in (_ip_text(ip) for ip in network.nameservers or []) if s]
        self.etc.set_nameservers(name, static_dns, dynamic_dns, gateway)

        if iface.version == 4:
            try:
                link.send_gratuitous_arp(ifname, link.link_info(ipr, index)["mac"], str(iface.ip))
            except OSError as exc:
                self.log.warning("gratuitous ARP for %s on %s: %s", iface.ip, ifname, exc)

    def _drop_address(self, ipr, index: int, name: str, endpoint) -> None:
        """The lease is gone: the address leaves the NIC (the kernel drops the routes that
        needed it), and the write-back, /etc/hosts and resolv.conf stop naming it, its
        gateway and its DNS servers until a new lease comes."""
        from . import link
        network = endpoint.network
        old = _cidr(endpoint.assigned)
        endpoint.assigned = IPNet()
        network.assigned.gateway = IPNet()
        network.assigned.nameservers = None
        self.etc.set_network_host(network.common.name or name, None)
        self.etc.set_nameservers(name, [], [], None)
        if old and not self._shared_address(name, endpoint, old):
            link.del_address(ipr, index, old)

    def _shared_address(self, name: str, endpoint, cidr: str) -> bool:
        """Another configured endpoint on the same NIC still uses this address."""
        for other_name, other in (self.config.networks or {}).items():
            if other is None or other_name == name or other_name not in self._configured:
                continue
            if other.common.id == endpoint.common.id and _cidr(other.assigned) == cidr:
                return True
        return False

    def _apply_routes(self, ipr, index: int, name: str, network, gateway: str) -> None:
        from . import link
        gw_version = ipaddress.ip_address(gateway).version
        if network.default:
            link.set_default_route(ipr, index, gateway)
            return
        for destination in network.destinations or []:
            cidr = _cidr(destination)
            if not cidr:
                continue
            if ipaddress.ip_network(cidr, strict=False).version != gw_version:
                self.log.warning("network %s: route to %s skipped: gateway %s is another "
                                 "address family", name, cidr, gateway)
                continue
            try:
                link.add_route(ipr, index, cidr, gateway)
            except Exception as exc:
                self.log.warning("network %s: route to %s via %s: %s",
                                 name, cidr, gateway, _describe(exc))

    # -- DHCP ----------------------------------------------------------------------------------
    def _dhcp_for(self, ipr, index: int, ifname: str, endpoint):
        """The NIC's DHCP client, started on first need (endpoints on one NIC share it)."""
        from .dhcp import DhcpClientSpec, DhcpService
        from .clientid import client_id, machine_id
        from . import link
        if self._dhcp is None:
            self._dhcp = DhcpService(self._lease_event, self.log)
        handle = self._dhcp.handles.get(ifname)
        if handle is not None:
            return handle
        mac = link.link_info(ipr, index)["mac"]
        network = endpoint.network
        spec = DhcpClientSpec(
            ifname=ifname,
            client_id=client_id(bytes.fromhex(mac.replace(":", "")), machine_id()),
            hostname=self.hostname or None,
            want_router=is_unspecified(network.gateway),
            want_dns=not network.nameservers)
        return self._dhcp.start(spec)

    def _lease_event(self, ifname: str, lease, event: str) -> None:
        """DHCP's callback, on its worker thread: hand the lease to the loop."""
        self.post(lambda: self._on_lease(ifname, lease, event))

    def _on_lease(self, ifname: str, lease, event: str) -> None:
        """A lease arrived, was renewed, or was lost (expired, refused): apply it to every
        dynamic endpoint on that NIC, or take the lost one away, then write the files and
        publish. Runs on the loop thread."""
        from pyroute2 import IPRoute
        if self._dhcp is None:
            return   # stopped: a late event
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=ifname)
            if not index:
                self.log.error("DHCP %s on %s: the link is gone", event, ifname)
                return
            index = index[0]
            for name, endpoint in (self.config.networks or {}).items():
                if endpoint is None or endpoint.static or not is_unspecified(endpoint.ip):
                    continue
                if self._nic_index.get(endpoint.common.id) != index:
                    continue
                if lease is None:
                    try:
                        self._drop_address(ipr, index, name, endpoint)
                    except Exception as exc:
                        self.log.error("network %s: removing the lost lease's address: %s",
                                       name, _describe(exc))
                    self.log.warning("network %s: DHCP lease on %s %s; address removed, "
                                     "asking for a new lease", name, ifname, event)
                    continue
                try:
                    self._apply_address(ipr, index, ifname, name, endpoint, lease)
                    self.log.info("network %s: DHCP %s %s/%d on %s", name, event,
                                  lease.ip, lease.prefixlen, ifname)
                except Exception as exc:
                    self.log.error("network %s: applying DHCP lease: %s", name, _describe(exc))
            self._flush_and_publish()

    def _flush_and_publish(self) -> None:
        try:
            self.etc.flush()
        except Exception as exc:
            self.log.error("writing /etc files: %s", exc)
        try:
            self.publish()
        except Exception as exc:
            self.log.error("publishing network state: %s", exc)


def _applied_signature(endpoint) -> str:
    """The read-only fields an endpoint is applied from: a reload that changes them re-applies
    the endpoint; one that does not is skipped (the reference re-ran everything)."""
    n = endpoint.network
    return repr((endpoint.common.id, endpoint.common.name, endpoint.static, endpoint.ip,
                 n.common.name, n.gateway, n.default, n.destinations, n.nameservers))


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if code:
        import os
        return f"{exc.__class__.__name__} {code} ({os.strerror(code)}): {exc}"
    return f"{exc}"
