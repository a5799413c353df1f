"""Finding the NIC for an endpoint ID: a VMware PCI slot number, a PCI address, a MAC or a name.

The slot arithmetic and the sysfs globbing are pure or take plain paths; netlink is used
only for MAC and name lookups, through the IPRoute object handed in.
"""
from __future__ import annotations

import glob
import os
import re

SYSFS_PCI = "/sys/bus/pci/devices"
BRIDGE_BASE = 0x11      # the first PCI bridge slot on VMware's virtual hardware

PCI_ADDRESS = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
MAC_ADDRESS = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")


class NicNotFound(LookupError):
    pass


def slot_to_pci_path(slot: int, numbering: str = "new") -> str:
    """The sysfs path pattern of the device at a VMware PCI slot number (KB 2047927).

    dev = slot & 0x1f, bus = (slot >> 5) & 0x1f, fn = (slot >> 10) & 7. Bus 0 is the root
    bus; bus N sits behind bridge slot 0x11 + N - 1 (itself a slot, so resolved again).
    The old numbering (VIC at E, slots 192, 224, ...) puts the function bits on the device;
    the new one (VIC HEAD, slots 1184, 1216, ...) puts them on the bridge.
    """
    if numbering not in ("old", "new"):
        raise ValueError(f"numbering must be 'old' or 'new', not {numbering!r}")
    dev, bus, fn = slot & 0x1F, (slot >> 5) & 0x1F, (slot >> 10) & 0x7
    if bus == 0:
        return f"0000:00:{dev:02x}.{fn}"
    bridge_slot = BRIDGE_BASE + bus - 1
    if numbering == "new":
        return f"{_bridge_path(bridge_slot, fn)}/0000:*:{dev:02x}.0"
    return f"{_bridge_path(bridge_slot, 0)}/0000:*:{dev:02x}.{fn}"


def _bridge_path(bridge_slot: int, fn: int) -> str:
    if bridge_slot < 32:
        return f"0000:00:{bridge_slot:02x}.{fn}"
    # a bridge beyond the root bus's 32 slots: itself behind a bridge
    return slot_to_pci_path(bridge_slot | fn << 10, "new")


def interfaces_under(pci_path: str, sysfs_pci: str = SYSFS_PCI) -> list[str]:
    """Interface names of the PCI device(s) matching a path pattern (virtio nets sit one
    level deeper, under virtioN)."""
    base = os.path.join(sysfs_pci, pci_path)
    found = glob.glob(os.path.join(base, "net", "*")) + glob.glob(
        os.path.join(base, "virtio*", "net", "*"))
    return sorted({os.path.basename(p) for p in found})


def classify(endpoint_id: str) -> str:
    """'slot', 'pci', 'mac' or 'name'."""
    if endpoint_id.isdigit():
        return "slot"
    if PCI_ADDRESS.match(endpoint_id):
        return "pci"
    if MAC_ADDRESS.match(endpoint_id):
        return "mac"
    return "name"


def find_interface_name(endpoint_id: str, links: list[tuple[int, str, str]],
                        sysfs_pci: str = SYSFS_PCI) -> str:
    """The kernel name of the NIC an endpoint ID designates.

    `links` is (index, name, mac) for every link, from netlink. Raises NicNotFound with a
    message saying what was looked for and where.
    """
    kind = classify(endpoint_id)
    if kind == "slot":
        slot = int(endpoint_id)
        tried = []
        for numbering in ("new", "old"):
            pattern = slot_to_pci_path(slot, numbering)
            if pattern in tried:
                continue
            tried.append(pattern)
            names = interfaces_under(pattern, sysfs_pci)
            if len(names) == 1:
                return names[0]
            if len(names) > 1:
                raise NicNotFound(f"PCI slot {slot} matches several interfaces {names} "
                                  f"under {sysfs_pci}/{pattern}")
        raise NicNotFound(f"no network interface at PCI slot {slot} (looked under "
                          f"{', '.join(f'{sysfs_pci}/{p}/net' for p in tried)}); "
                          "check the vNIC is connected")
    if kind == "pci":
        address = endpoint_id.lower() if endpoint_id.count(":") == 2 else "0000:" + endpoint_id.lower()
        names = interfaces_under(address, sysfs_pci)
        if len(names) != 1:
            raise NicNotFound(f"{'no' if not names else 'more than one'} network interface "
                              f"at PCI address {address} ({sysfs_pci}/{address}/net)")
        return names[0]
    if kind == "mac":
        mac = endpoint_id.lower()
        matches = [name for _, name, addr in links if (addr or "").lower() == mac]
        if len(matches) != 1:
            raise NicNotFound(f"{'no' if not matches else 'more than one'} network interface "
                              f"with MAC address {mac}")
        return matches[0]
    if any(name == endpoint_id for _, name, _ in links):
        return endpoint_id
    raise NicNotFound(f"no network interface named {endpoint_id!r} "
                      f"(have: {', '.join(name for _, name, _ in links)})")
