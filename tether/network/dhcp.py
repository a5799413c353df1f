"""DHCP through pyroute2's client, on one background thread running an asyncio loop.

pyroute2 does the protocol: DISCOVER/REQUEST, renewal at T1, rebinding at T2, retransmission
with a randomized increasing backoff, a fresh DISCOVER when a lease expires, RELEASE on exit.
This module adds what the reference sends (client id, hostname, a parameter list that asks
for router and DNS only when the network has none), restarts a client that fails, and turns
each lease into plain data for a callback that runs on a worker thread (the agent's
callback posts it to its loop, which alone changes the config).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import threading
from typing import Callable, Optional

from pyroute2.dhcp import fsm
from pyroute2.dhcp.client import AsyncDHCPClient, ClientConfig
from pyroute2.dhcp.dhcp4socket import AsyncDHCP4Socket
from pyroute2.dhcp.enums import dhcp
from pyroute2.dhcp.hooks import Trigger, hook
from pyroute2.dhcp.leases import Lease, MissingOptionError

from tether.log import get_logger

from .clientid import CLIENT_ID_TYPE

RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
NAK_DELAY_MAX = 60.0     # seconds; a server that refuses every REQUEST is asked this often


# The interface MTU a lease may set (option 26): below 576 is refused, as systemd-networkd
# and dhcpcd do (RFC 791's minimum datagram every host must take).
MTU_MIN, MTU_MAX = 576, 65535


class UnusableLease(ValueError):
    """A lease whose address or mask cannot be put on a NIC; the message says why."""


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    ip: str
    prefixlen: int
    routers: tuple[str, ...]
    dns: tuple[str, ...]
    mtu: Optional[int]
    server_id: Optional[str]
    lease_time: Optional[int]

    @classmethod
    def from_lease(cls, lease: Lease) -> "LeaseInfo":
        """The lease as plain data; raises UnusableLease for an address or mask no NIC
        should get. Routers, DNS servers and an MTU that cannot be used are left out
        (logged): the rest of the lease still applies."""
        def opt(name, default=None):
            try:
                return getattr(lease, name)
            except MissingOptionError:
                return default
        mask = opt("subnet_mask")
        if mask is None:
            raise UnusableLease(f"address {lease.ip} without a subnet mask")
        try:
            iface = ipaddress.IPv4Interface(f"{lease.ip}/{mask}")
        except ValueError:
            raise UnusableLease(f"address {lease.ip} with the subnet mask {mask}") from None
        problem = _unusable(iface.ip)
        if problem is None and iface.network.prefixlen == 0:
            problem = "a subnet mask of 0.0.0.0"
        if problem is None and iface.network.prefixlen < 31 and iface.ip in (
                iface.network.network_address, iface.network.broadcast_address):
            problem = f"the network or broadcast address of {iface.network}"
        if problem:
            raise UnusableLease(f"address {iface}: {problem}")
        where = f"lease {iface} on {lease.interface}"
        mtu = opt("mtu")
        if mtu is not None and not MTU_MIN <= mtu <= MTU_MAX:
            _log().warning("DHCP %s: MTU %s ignored (not within %d-%d)",
                           where, mtu, MTU_MIN, MTU_MAX)
            mtu = None
        return cls(ip=str(iface.ip), prefixlen=iface.network.prefixlen,
                   routers=_usable(opt("routers", ()), "router", where),
                   dns=_usable(opt("name_servers", ()), "DNS server", where),
                   mtu=mtu, server_id=opt("server_id"), lease_time=opt("lease_time"))


def _unusable(ip: ipaddress.IPv4Address) -> Optional[str]:
    """Why a DHCP-given address cannot be a host's address, router or DNS server."""
    for test, what in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                       (ip.is_multicast, "multicast"), (ip.is_reserved, "reserved/broadcast")):
        if test:
            return what
    return None


def _usable(addresses, what: str, where: str) -> tuple[str, ...]:
    out = []
    for text in addresses or ():
        try:
            problem = _unusable(ipaddress.IPv4Address(text))
        except ValueError:
            problem = "not an IPv4 address"
        if problem:
            _log().warning("DHCP %s: %s %s ignored (%s)", where, what, text, problem)
        else:
            out.append(text)
    return tuple(out)


def _log():
    return get_logger("tether.dhcp")


def _server(lease: Lease) -> str:
    try:
        return lease.server_id
    except MissingOptionError:
        return lease.server_mac


class MemoryLease(Lease):
    """Leases live in the agent's memory: nothing to persist in a VM that boots fresh."""

    def dump(self) -> None:
        pass

    @classmethod
    def load(cls, interface: str) -> None:
        return None


def requested_parameters(want_router: bool, want_dns: bool) -> tuple:
    params = [dhcp.Option.SUBNET_MASK]
    if want_router:
        params.append(dhcp.Option.ROUTER)
    if want_dns:
        params.append(dhcp.Option.NAME_SERVER)
    params += [dhcp.Option.INTERFACE_MTU, dhcp.Option.LEASE_TIME,
               dhcp.Option.RENEWAL_TIME, dhcp.Option.REBINDING_TIME]
    return tuple(params)


class _ClientIdSocket(AsyncDHCP4Socket):
    """Puts the reference's RFC 4361 client id (type 255) on every message sent, and drops
    received packets it cannot decode."""

    def __init__(self, ifname: str, client_id: bytes):
        super().__init__(ifname)
        self._client_id = client_id

    async def put(self, msg, *args, **kwargs):
        msg.dhcp["options"]["client_id"] = {"type": CLIENT_ID_TYPE, "key": self._client_id}
        return await super().put(msg, *args, **kwargs)

    async def get(self):
        # pyroute2 drops only the ValueErrors of its decoder: anything else (an empty
        # client id option raises IndexError) would end its receiving task for good.
        while True:
            raw = await self.loop.sock_recv(self, 4096)
            try:
                return self._decode_msg(raw)
            except Exception as exc:
                _dropped(self.ifname, "undecodable", exc)


class _Client(AsyncDHCPClient):
    def __init__(self, config: ClientConfig, client_id: bytes):
        super().__init__(config)
        self._sock = _ClientIdSocket(config.interface, client_id)

    _naks_in_a_row = 0

    async def nak_received(self, msg) -> None:
        # pyroute2 starts over at once after a NAK: a server that offers and then refuses
        # (misconfigured, or hostile) made it loop DISCOVER/OFFER/REQUEST/NAK hundreds of
        # times a second, burning the agent's CPU. The first NAK restarts at once (a
        # server that lost its state); each further one in a row waits twice as long.
        if self.state in (fsm.State.REQUESTING, fsm.State.REBOOTING, fsm.State.RENEWING,
                          fsm.State.REBINDING):
            naks, self._naks_in_a_row = self._naks_in_a_row, self._naks_in_a_row + 1
            if naks:
                delay = min(2.0 ** (naks - 1), NAK_DELAY_MAX)
                _log().warning("DHCP on %s: refused %d times in a row; asking again in %gs",
                               self.config.interface, naks + 1, delay)
                try:   # cut short when the client stops
                    await asyncio.wait_for(self._states[fsm.State.OFF].wait(), delay)
                except asyncio.TimeoutError:
                    pass
        await super().nak_received(msg)

    async def ack_received(self, msg) -> None:
        await super().ack_received(msg)
        if self.state == fsm.State.BOUND:
            self._naks_in_a_row = 0

    async def _process_msg(self, msg) -> None:
        # Anyone on the network can broadcast to port 68: a packet without a (known)
        # message type must not end the receiving task (pyroute2 lets its KeyError out).
        try:
            dhcp.MessageType(msg.dhcp["options"]["message_type"])
        except (KeyError, ValueError, TypeError) as exc:
            _dropped(self.config.interface, "without a valid message type", exc)
            return
        await super()._process_msg(msg)


def _dropped(ifname: str, what: str, exc: BaseException) -> None:
    """A packet from the network dropped: debug only, a flood must not flood the log."""
    _log().debug("DHCP on %s: dropped a packet %s: %r", ifname, what, exc)


@dataclasses.dataclass
class DhcpClientSpec:
    ifname: str
    client_id: bytes
    hostname: Optional[str]
    want_router: bool
    want_dns: bool


LeaseCallback = Callable[[str, Optional[LeaseInfo], str], None]   # ifname, lease|None, event


class DhcpHandle:
    def __init__(self, spec: DhcpClientSpec):
        self.spec = spec
        self.first_lease: concurrent.futures.Future = concurrent.futures.Future()
        self.lease: Optional[LeaseInfo] = None
        self.stop_event: Optional[asyncio.Event] = None
        self.task: Optional[asyncio.Task] = None

    def wait_first(self, timeout: float) -> LeaseInfo:
        return self.first_lease.result(timeout)


class DhcpService:
    """All DHCP clients of the agent, on one daemon thread."""

    def __init__(self, on_lease: LeaseCallback, log):
        self._on_lease = on_lease
        self._log = log
        self._loop = asyncio.new_event_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dhcp-apply")
        self._thread = threading.Thread(target=self._run_loop, name="dhcp", daemon=True)
        self._thread.start()
        self.handles: dict[str, DhcpHandle] = {}

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self, spec: DhcpClientSpec) -> DhcpHandle:
        handle = DhcpHandle(spec)
        self.handles[spec.ifname] = handle
        asyncio.run_coroutine_threadsafe(self._launch(handle), self._loop).result(10)
        return handle

    async def _launch(self, handle: DhcpHandle) -> None:
        handle.stop_event = asyncio.Event()
        handle.task = asyncio.ensure_future(self._keep_running(handle))

    async def _keep_running(self, handle: DhcpHandle) -> None:
        """Run the client until stopped; a client that dies (link gone, socket error) is
        started again after a growing delay instead of leaving the NIC without a lease."""
        spec = handle.spec
        failures = 0
        while not handle.stop_event.is_set():
            config = ClientConfig(
                interface=spec.ifname, lease_type=MemoryLease, hooks=self._hooks(handle),
                requested_parameters=requested_parameters(spec.want_router, spec.want_dns),
                handle_signals=False, vendor_id=None, host_name=spec.hostname or None,
                hook_timeout=None, release=True)
            try:
                async with _Client(config, spec.client_id) as client:
                    await client.bootstrap()
                    await self._until_stopped_or_deaf(handle, client)
                return
            except Exception as exc:      # keep the agent's DHCP alive whatever happens
                delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
                failures += 1
                self._log.error("DHCP client on %s failed: %s; restarting in %.0fs",
                                spec.ifname, exc, delay)
                try:
                    await asyncio.wait_for(handle.stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    @staticmethod
    async def _until_stopped_or_deaf(handle: DhcpHandle, client: _Client) -> None:
        """Wait for stop; raise when the client's socket tasks end first. A link that goes
        down gives its raw socket ENETDOWN and pyroute2's tasks then return quietly,
        leaving a client that never hears an answer again. The lease stays on the NIC
        (no RELEASE, no UNBOUND): the restarted client asks again and the answer is
        applied as a renewal, which also puts back the routes the link lost."""
        stopped = asyncio.ensure_future(handle.stop_event.wait())
        io = [t for t in (client._receiver_task, client._sender_task) if t is not None]
        try:
            await asyncio.wait([stopped, *io], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not handle.stop_event.is_set():
            client.config.release = False
            raise OSError("its socket closed (did the link go down?)")

    def _hooks(self, handle: DhcpHandle):
        service = self

        @hook(Trigger.BOUND, Trigger.RENEWED, Trigger.REBOUND)
        async def got_lease(lease: Lease):
            try:
                info = LeaseInfo.from_lease(lease)
            except UnusableLease as exc:
                message = (f"DHCP server {_server(lease)} gave an unusable lease on "
                           f"{handle.spec.ifname}: {exc}")
                service._log.error("%s; ignored", message)
                if not handle.first_lease.done():
                    handle.first_lease.set_exception(UnusableLease(message))
                return
            lost, handle.lease = handle.lease is None, info
            if not handle.first_lease.done():
                # the first lease is applied by whoever waits for it (NetworkManager.apply)
                handle.first_lease.set_result(info)
                return
            await asyncio.get_running_loop().run_in_executor(
                service._pool, service._deliver, handle, info, "bound" if lost else "renewed")

        # The lease is gone: it ran out (EXPIRED), or it ended otherwise (UNBOUND: the
        # server refused a renewal with a NAK, or the client died and is restarted).
        # pyroute2 then starts over with a DISCOVER, retransmitted with backoff until a
        # server answers (got_lease again).
        @hook(Trigger.EXPIRED)
        async def expired(lease: Lease):
            await lost_lease("expired")

        @hook(Trigger.UNBOUND)
        async def unbound(lease: Lease):
            if handle.stop_event is not None and handle.stop_event.is_set():
                return   # our own RELEASE on the way out
            await lost_lease("lost")

        async def lost_lease(event: str):
            if handle.lease is None:
                return
            handle.lease = None
            await asyncio.get_running_loop().run_in_executor(
                service._pool, service._deliver, handle, None, event)

        return (got_lease, expired, unbound)

    def _deliver(self, handle: DhcpHandle, info: Optional[LeaseInfo], event: str) -> None:
        try:
            self._on_lease(handle.spec.ifname, info, event)
        except Exception as exc:
            self._log.error("applying the DHCP lease on %s failed: %s", handle.spec.ifname, exc)

    def stop_one(self, ifname: str, timeout: float = 10.0) -> None:
        handle = self.handles.pop(ifname, None)
        if handle is None or handle.task is None:
            return

        async def stop_it():
            handle.stop_event.set()
            await asyncio.wait([handle.task], timeout=timeout)
        try:
            asyncio.run_coroutine_threadsafe(stop_it(), self._loop).result(timeout + 2)
        except Exception as exc:
            self._log.warning("stopping the DHCP client on %s: %s", ifname, exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every client (each RELEASEs its lease) and the thread."""
        async def stop_all():
            for handle in self.handles.values():
                if handle.stop_event:
                    handle.stop_event.set()
            tasks = [h.task for h in self.handles.values() if h.task]
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(timeout + 2)
            except Exception as exc:
                self._log.warning("stopping DHCP clients: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._pool.shutdown(wait=False)
