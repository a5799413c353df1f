"""The container VM's ConfigSpec, laid out as VIC's port layer laid out its container VMs.

    CD-ROM       the bootstrap ISO on a datastore, on an IDE controller (lib/spec/ide.go)
    COM1         network serial port, the attach channel: client to a URI, or left
                 unconnected as the port layer creates it (lib/portlayer/attach/join.go)
    COM2         file `tether.debug` in the VM's directory: kernel console and agent log
    COM3         file `output.log`: the session output log, iolog framing
                 (both lib/portlayer/logging/logging.go)
    NICs         vmxnet3, one per network endpoint, at VMware PCI slot numbers from 0x4A0 in
                 steps of 32 (lib/constants, lib/spec/spec.go AssignSlotNumber); the
                 endpoint's ID is the slot number, which the agent resolves to the device
    containerfs  a thin child disk of the image's disk on a paravirtual SCSI controller,
                 so the image stays read-only (lib/portlayer/storage/image/vsphere/join.go)
    extraConfig  the config's guestinfo keys and the VMX options below (lib/spec/spec.go)

`assign_nics` and `plan_*` work on plain data; `config_spec` turns a `VmPlan` into pyVmomi
objects. Nothing here talks to a server.
"""
from __future__ import annotations

import dataclasses
import re

FIRST_NIC_SLOT = 0x4A0          # VIC's PCISlotNumberBegin
NIC_SLOT_STEP = 1 << 5          # the next bridge: one NIC behind each
NIC_SLOT_END = 1 << 11
UNCONNECTED_ATTACH_URI = "tcp://127.0.0.1:2377"     # VIC's placeholder until attach binds it
DEBUG_LOG = "tether.debug"
OUTPUT_LOG = "output.log"
CONTAINERFS_DISK = "containerfs.vmdk"
GUEST_ID = "otherLinux64Guest"
ANNOTATION_TAG = "tether-vsphere"

# VMX options VIC's port layer set on every container VM (lib/spec/spec.go), those that
# still apply to ours: a serial port's file exists after a restart, a child disk shares its
# parent's UUID, the attach port needs flow control, the agent is "unmanaged" tools.
VMX_OPTIONS = {
    "answer.msg.serial.file.open": "Append",
    "answer.msg.disk.duplicateUUID": "Yes",
    "disk.EnableUUID": "true",
    "serial0.hardwareFlowControl": "TRUE",
    "tools.remindInstall": "FALSE",
    "tools.upgrade.policy": "manual",
}

_MAC = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")
_PCI_ADDRESS = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


class SpecError(ValueError):
    """The config cannot be laid out as a VM (a slot clash, too many NICs, a bad ID)."""


@dataclasses.dataclass
class Nic:
    endpoint: str               # the endpoint's name in the config
    network: str                # the vSphere network it connects to
    slot: int                   # VMware PCI slot number
    mac: str | None = None      # a fixed MAC (the endpoint's ID was one); None: generated


@dataclasses.dataclass
class VmPlan:
    name: str
    datastore: str
    iso: str                            # datastore path of the bootstrap ISO
    nics: list[Nic]
    extra_config: dict[str, str]        # exact values to store (<nil> already in place)
    containerfs_parent: str | None = None   # datastore path of the image disk
    attach_uri: str | None = None
    memory_mb: int = 512
    cpus: int = 1
    annotation: str = ""

    @property
    def directory(self) -> str:
        return self.name

    def file(self, name: str) -> str:
        return f"[{self.datastore}] {self.directory}/{name}"

    @property
    def vmx_path(self) -> str:
        return self.file(f"{self.name}.vmx")


def endpoint_networks(config, mapping: dict[str, str], default: str | None) -> dict[str, str]:
    """Endpoint name -> vSphere network name: `mapping` (endpoint=network), else `default`,
    else the network's own name in the config."""
    endpoints = {name: ep for name, ep in (config.networks or {}).items() if ep is not None}
    unknown = sorted(set(mapping) - set(endpoints))
    if unknown:
        raise SpecError(f"--network names no network endpoint of the config: {', '.join(unknown)}")
    out = {}
    for name, endpoint in sorted(endpoints.items()):
        out[name] = mapping.get(name) or default or endpoint.network.common.name or name
    return out


def assign_nics(config, networks: dict[str, str]) -> list[Nic]:
    """One NIC per endpoint, endpoints in name order. An ID that is a slot number keeps its
    slot and one that is a MAC gets that MAC; the others get the next free slot and their ID
    becomes it (the port layer's way: the agent finds the NIC by slot). Mutates the config."""
    endpoints = {name: ep for name, ep in sorted((config.networks or {}).items()) if ep is not None}
    taken: dict[int, str] = {}
    for name, endpoint in endpoints.items():
        ident = endpoint.common.id or ""
        if ident.isdigit():
            slot = int(ident)
            if slot in taken:
                raise SpecError(f"networks {taken[slot]} and {name} both ask for PCI slot {slot}")
            taken[slot] = name
        elif _PCI_ADDRESS.match(ident):
            raise SpecError(f"network {name}: ID {ident} is a PCI address; on vSphere an "
                            f"endpoint is found by VMware slot number ({FIRST_NIC_SLOT}, "
                            f"{FIRST_NIC_SLOT + NIC_SLOT_STEP}, ...), its MAC, or left to "
                            "the port layer")
    free = (s for s in range(FIRST_NIC_SLOT, NIC_SLOT_END, NIC_SLOT_STEP) if s not in taken)
    nics = []
    for name, endpoint in endpoints.items():
        ident = endpoint.common.id or ""
        if ident.isdigit():
            nics.append(Nic(name, networks[name], int(ident)))
            continue
        slot = next(free, None)
        if slot is None:
            raise SpecError(f"too many networks: at most "
                            f"{(NIC_SLOT_END - FIRST_NIC_SLOT) // NIC_SLOT_STEP}")
        if _MAC.match(ident):
            nics.append(Nic(name, networks[name], slot, ident.lower()))
        else:
            endpoint.common.id = str(slot)
            nics.append(Nic(name, networks[name], slot))
    return sorted(nics, key=lambda nic: nic.slot)


# --------------------------------------------------------------------------- pyVmomi

def config_spec(plan: VmPlan, backings: dict[str, object]):
    """The CreateVM ConfigSpec. `backings`: vSphere network name -> NIC backing info."""
    from pyVmomi import vim
    device = vim.vm.device
    keys = iter(range(-100, -1000, -1))     # temporary keys; the server assigns real ones
    changes = []

    def add(dev, create_file=False):
        spec = device.VirtualDeviceSpec(operation=device.VirtualDeviceSpec.Operation.add,
                                        device=dev)
        if create_file:
            spec.fileOperation = device.VirtualDeviceSpec.FileOperation.create
        changes.append(spec)
        return dev

    def connected(start: bool = True):
        return device.VirtualDevice.ConnectInfo(startConnected=start, connected=start,
                                                allowGuestControl=True)

    ide = add(device.VirtualIDEController(key=next(keys), busNumber=0))
    add(device.VirtualCdrom(
        key=next(keys), controllerKey=ide.key, unitNumber=0, connectable=connected(),
        backing=device.VirtualCdrom.IsoBackingInfo(fileName=plan.iso)))

    attach = plan.attach_uri or UNCONNECTED_ATTACH_URI
    add(device.VirtualSerialPort(
        key=next(keys), yieldOnPoll=True, connectable=connected(plan.attach_uri is not None),
        backing=device.VirtualSerialPort.URIBackingInfo(
            direction="client", serviceURI=attach)))
    for name in (DEBUG_LOG, OUTPUT_LOG):
        add(device.VirtualSerialPort(
            key=next(keys), yieldOnPoll=True, connectable=connected(),
            backing=device.VirtualSerialPort.FileBackingInfo(fileName=plan.file(name))))

    for nic in plan.nics:
        card = device.VirtualVmxnet3(
            key=next(keys), backing=backings[nic.network], connectable=connected(),
            addressType="manual" if nic.mac else "generated",
            slotInfo=device.VirtualDevice.PciBusSlotInfo(pciSlotNumber=nic.slot),
            deviceInfo=vim.Description(label=nic.endpoint, summary=nic.network))
        if nic.mac:
            card.macAddress = nic.mac
        add(card)

    if plan.containerfs_parent:
        scsi = add(device.ParaVirtualSCSIController(
            key=next(keys), busNumber=0,
            sharedBus=device.VirtualSCSIController.Sharing.noSharing))
        add(device.VirtualDisk(
            key=next(keys), controllerKey=scsi.key, unitNumber=0,
            backing=device.VirtualDisk.FlatVer2BackingInfo(
                fileName=plan.file(CONTAINERFS_DISK), diskMode="persistent",
                thinProvisioned=True,
                parent=device.VirtualDisk.FlatVer2BackingInfo(fileName=plan.containerfs_parent))),
            create_file=True)

    extra = dict(VMX_OPTIONS)
    extra.update(plan.extra_config)
    return vim.vm.ConfigSpec(
        name=plan.name, guestId=GUEST_ID, alternateGuestName="tether container VM",
        annotation=plan.annotation, numCPUs=plan.cpus, memoryMB=plan.memory_mb,
        files=vim.vm.FileInfo(vmPathName=plan.vmx_path),
        bootOptions=vim.vm.BootOptions(bootOrder=[vim.vm.BootOptions.BootableCdromDevice()]),
        deviceChange=changes,
        extraConfig=[vim.option.OptionValue(key=k, value=v) for k, v in sorted(extra.items())])


def nic_backing(network):
    """The backing that connects a vmxnet3 to a network object of any of vSphere's kinds."""
    from pyVmomi import vim
    card = vim.vm.device.VirtualEthernetCard
    if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
        return card.DistributedVirtualPortBackingInfo(port=vim.dvs.PortConnection(
            portgroupKey=network.key, switchUuid=network.config.distributedVirtualSwitch.uuid))
    if isinstance(network, vim.OpaqueNetwork):
        return card.OpaqueNetworkBackingInfo(opaqueNetworkId=network.summary.opaqueNetworkId,
                                             opaqueNetworkType=network.summary.opaqueNetworkType)
    return card.NetworkBackingInfo(deviceName=network.name, network=network)
