"""Container VMs on vSphere: run one (check, upload the ISO once, create, power on, wait for
`started` and the exit, read the result, remove), and list, read the logs of, stop and
remove the ones `run` created.

`run` checks everything it can before it creates anything (datacenter, datastore, pool,
host, folder, every network, the ISO, the image disk, the VM name), so a mistake leaves
nothing behind.
The bootstrap ISO is uploaded once per content: `[DS] tether/bootstrap-<sha256:16>.iso`.
VMs are recognised by their annotation, which starts with `tether-vsphere`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time

from pyVmomi import vim, vmodl

from . import spec as S
from .connection import Connection, VsphereError, fault_text, split_datastore_path
from tether.outcome import EXIT_NOT_STARTED, EXIT_TIMEOUT, primary_outcome
from .guestinfo import extra_config_values, guestinfo_view, host_map

ISO_DIRECTORY = "tether"
IMAGE_DIRECTORY = "tether/images"
DEFAULT_TIMEOUT = 300.0
DEFAULT_STOP_TIMEOUT = 10.0
POLL = 0.5

ON = vim.VirtualMachine.PowerState.poweredOn
OFF = vim.VirtualMachine.PowerState.poweredOff


@dataclasses.dataclass
class RunOptions:
    datacenter: str | None = None
    datastore: str | None = None
    networks: dict[str, str] = dataclasses.field(default_factory=dict)   # endpoint -> network
    default_network: str | None = None
    folder: str | None = None
    resource_pool: str | None = None
    host: str | None = None
    iso: str | None = None              # a datastore path; else the local image is uploaded
    image_dir: str = "build"
    containerfs: str | None = None      # datastore path of the image disk
    attach_uri: str | None = None
    name: str | None = None
    memory_mb: int = 512
    cpus: int = 1
    keep: bool = False
    detach: bool = False
    timeout: float = DEFAULT_TIMEOUT
    poll: float = POLL


@dataclasses.dataclass
class Placement:
    """Everything `run` resolved and checked, before it uploads or creates anything."""
    config: object
    dc: vim.Datacenter
    datastore: vim.Datastore
    pool: vim.ResourcePool
    host: vim.HostSystem | None
    folder: vim.Folder
    networks: dict[str, object]          # vSphere network name -> object
    nics: list[S.Nic]
    iso_local: str | None
    iso_path: str                        # where the ISO is (or will be, after upload)
    containerfs: str | None
    name: str


@dataclasses.dataclass
class RunResult:
    name: str
    exit_code: int
    started: str | None                  # the primary's `started` as read back
    guestinfo: dict[str, str]            # the final extraConfig, as the port layer reads it
    output: bytes | None                 # the COM3 file, iolog framing
    message: str = ""
    kept: bool = False


# --------------------------------------------------------------------------- run

def iso_name(local_path: str) -> str:
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"bootstrap-{digest.hexdigest()[:16]}.iso"


def default_name(config) -> str:
    return f"{config.common.name or config.id or 'container'}-{secrets.token_hex(4)}"


def annotation_for(config) -> str:
    return f"{S.ANNOTATION_TAG}: container VM of config {config.id!r}, created by `tether vsphere run`"


def is_ours(annotation: str | None) -> bool:
    return bool(annotation) and annotation.startswith(S.ANNOTATION_TAG + ":")


def place(conn: Connection, config, options: RunOptions) -> Placement:
    """Resolve and check every name; raise VsphereError naming what is missing."""
    if config.id not in (config.sessions or {}):
        raise VsphereError(f"the config has no primary session (a session with the config's "
                           f"ID {config.id!r}): nothing would report the container's start")
    dc = conn.datacenter(options.datacenter)
    datastore = conn.datastore(dc, options.datastore)
    host = conn.host(dc, options.host)
    if host is not None and not options.resource_pool:
        pool = host.parent.resourcePool         # the root pool of the host's cluster
    else:
        pool = conn.resource_pool(dc, options.resource_pool)
    folder = conn.folder(dc, options.folder)
    try:
        wanted = S.endpoint_networks(config, options.networks, options.default_network)
    except S.SpecError as err:
        raise VsphereError(str(err)) from None
    available = conn.networks(dc)
    for endpoint, network in wanted.items():
        if network not in available:
            raise VsphereError(
                f"network {network!r} (for endpoint {endpoint!r}) not found in datacenter "
                f"{dc.name} (there: {', '.join(sorted(available)) or 'none'}); map it with "
                f"--network {endpoint}=NETWORK")
    try:
        nics = S.assign_nics(config, wanted)
    except S.SpecError as err:
        raise VsphereError(str(err)) from None

    if options.iso:
        ds_name, path = split_datastore_path(options.iso)
        iso_ds = conn.datastore(dc, ds_name)
        if not conn.file_exists(dc, iso_ds, path):
            raise VsphereError(f"--iso {options.iso}: no such file")
        iso_local, iso_path = None, options.iso
    else:
        iso_local = os.path.join(options.image_dir, "bootstrap.iso")
        if not os.path.isfile(iso_local):
            raise VsphereError(f"no {iso_local}: build the image (make image) or pass --iso "
                               "with the ISO's datastore path")
        iso_path = f"[{datastore.name}] {ISO_DIRECTORY}/{iso_name(iso_local)}"

    containerfs = options.containerfs
    if containerfs is None and config.layer_id:
        containerfs = f"[{datastore.name}] {IMAGE_DIRECTORY}/{config.layer_id}/{config.layer_id}.vmdk"
    if containerfs is not None:
        ds_name, path = split_datastore_path(containerfs)
        if not conn.file_exists(dc, conn.datastore(dc, ds_name), path):
            source = "--containerfs" if options.containerfs else f"the config's layer_id"
            raise VsphereError(f"{source}: image disk {containerfs} not found")

    name = options.name or default_name(config)
    if any(vm.name == name for vm in conn.virtual_machines(folder)):
        raise VsphereError(f"a VM named {name!r} already exists in {conn.inventory_path(folder)}")
    return Placement(config, dc, datastore, pool, host, folder,
                     {n: available[n] for n in set(wanted.values())}, nics, iso_local,
                     iso_path, containerfs, name)


def ensure_iso(conn: Connection, placement: Placement, log=None) -> bool:
    """Upload the ISO unless its content is there already; True when it was uploaded.
    It goes to a temporary name first and is renamed, so a cut upload is never used."""
    if placement.iso_local is None:
        return False
    dc, ds = placement.dc, placement.datastore
    _, path = split_datastore_path(placement.iso_path)
    if conn.file_exists(dc, ds, path):
        return False
    conn.make_directory(dc, ds, ISO_DIRECTORY)
    partial = f"{ISO_DIRECTORY}/.{os.path.basename(path)}.{secrets.token_hex(4)}.part"
    if log:
        log(f"uploading {placement.iso_local} to {placement.iso_path}")
    try:
        conn.upload(dc, ds, partial, placement.iso_local)
        conn.move_file(dc, ds, partial, path)
    except VsphereError:
        try:
            conn.delete_file(dc, ds, partial)
        except VsphereError:
            pass
        if conn.file_exists(dc, ds, path):     # another run uploaded it meanwhile
            return False
        raise
    return True


def plan_for(placement: Placement, options: RunOptions) -> S.VmPlan:
    from tether.extension import encode_config
    return S.VmPlan(
        name=placement.name, datastore=placement.datastore.name, iso=placement.iso_path,
        nics=placement.nics, extra_config=extra_config_values(encode_config(placement.config)),
        containerfs_parent=placement.containerfs, attach_uri=options.attach_uri,
        memory_mb=options.memory_mb, cpus=options.cpus,
        annotation=annotation_for(placement.config))


def create_vm(conn: Connection, placement: Placement, plan: S.VmPlan) -> vim.VirtualMachine:
    backings = {name: S.nic_backing(net) for name, net in placement.networks.items()}
    config_spec = S.config_spec(plan, backings)
    task = placement.folder.CreateVM_Task(config=config_spec, pool=placement.pool,
                                          host=placement.host)
    return conn.wait(task, f"creating VM {plan.name}")


def started_key(config) -> str:
    """The guestinfo key of the primary session's `started`, which the agent writes last."""
    from extraconfig import calculate_key
    return calculate_key(config, ["Sessions", config.id, "Started"])


def vm_state(conn: Connection, vm) -> tuple[str, dict[str, str]]:
    rows = conn.properties([vm], vim.VirtualMachine, ["runtime.powerState", "config.extraConfig"])
    if not rows:
        raise VsphereError(f"VM {vm} is gone")
    return rows[0].get("runtime.powerState"), host_map(rows[0].get("config.extraConfig"))


def power_state(conn: Connection, vm) -> str:
    rows = conn.properties([vm], vim.VirtualMachine, ["runtime.powerState"])
    return rows[0].get("runtime.powerState") if rows else OFF


def wait_started(conn: Connection, vm, key: str, deadline: float, poll: float):
    """(started value, power state): the value once the guest wrote it, None at the
    deadline or when the VM powered off first."""
    while True:
        state, values = vm_state(conn, vm)
        value = values.get(key) or None
        if value is not None or state != ON or time.monotonic() >= deadline:
            return value, state
        time.sleep(poll)


def wait_powered_off(conn: Connection, vm, deadline: float, poll: float) -> bool:
    while True:
        if power_state(conn, vm) != ON:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def power_off(conn: Connection, vm) -> None:
    if power_state(conn, vm) == ON:
        try:
            conn.wait(vm.PowerOffVM_Task(), f"powering off {vm.name}")
        except VsphereError:
            if power_state(conn, vm) == ON:
                raise


def destroy(conn: Connection, vm) -> None:
    """Power off and delete the VM with its files (serial logs included)."""
    name = vm.name
    power_off(conn, vm)
    conn.wait(vm.Destroy_Task(), f"removing VM {name}")


def run(conn: Connection, config, options: RunOptions, log=None) -> RunResult:
    """The whole of `tether vsphere run`. `log(text)` is told of each step."""
    log = log or (lambda text: None)
    placement = place(conn, config, options)
    if ensure_iso(conn, placement, log):
        log(f"uploaded {placement.iso_path}")
    plan = plan_for(placement, options)
    vm = create_vm(conn, placement, plan)
    keep = options.keep
    log(f"created VM {plan.name} ({plan.vmx_path})")
    try:
        conn.wait(vm.PowerOnVM_Task(), f"powering on {plan.name}")
        log(f"powered on {plan.name}")
        deadline = time.monotonic() + options.timeout
        started, state = wait_started(conn, vm, started_key(config), deadline, options.poll)
        if started is not None and options.detach:
            keep = True
            final = guestinfo_view(vm_state(conn, vm)[1], plan.extra_config)
            code = 0 if started == "true" else EXIT_NOT_STARTED
            return RunResult(plan.name, code, started, final, None,
                             "" if code == 0 else f"the primary did not start: {started}", True)
        message, timed_out = "", False
        if started is None and state == ON:
            message, timed_out = f"the primary did not start within {options.timeout:g} s", True
        elif started is None:
            message = "the VM powered off before the primary started"
        elif not wait_powered_off(conn, vm, deadline, options.poll):
            message = f"the VM did not power off within {options.timeout:g} s"
            timed_out = True
        if timed_out:
            power_off(conn, vm)
        final = guestinfo_view(vm_state(conn, vm)[1], plan.extra_config)
        _, code, reason = primary_outcome(final)
        if timed_out:
            code = EXIT_TIMEOUT
        output = fetch_file(conn, placement.dc, vm, S.OUTPUT_LOG)
        return RunResult(plan.name, code, started, final, output, message or reason, keep)
    finally:
        if not keep:
            destroy(conn, vm)
            log(f"removed VM {plan.name}")


# --------------------------------------------------------------------------- the others

@dataclasses.dataclass
class Container:
    vm: vim.VirtualMachine
    name: str
    power: str
    id: str
    started: str
    status: str


def containers(conn: Connection, dc: vim.Datacenter) -> list[Container]:
    """The VMs `run` created, with the primary's state read from guestinfo."""
    from extraconfig import decode
    from tether.config import ExecutorConfig
    vms = conn.virtual_machines(dc.vmFolder)
    rows = conn.properties(vms, vim.VirtualMachine, ["name", "config.annotation"])
    ours = [row["obj"] for row in rows if is_ours(row.get("config.annotation"))]
    out = []
    for row in conn.properties(ours, vim.VirtualMachine,
                               ["name", "runtime.powerState", "config.extraConfig"]):
        values = host_map(row.get("config.extraConfig"))
        ident = started = status = ""
        try:
            decoded = decode(values, ExecutorConfig)
            ident = decoded.id
            primary = (decoded.sessions or {}).get(decoded.id)
            if primary is not None:
                started = primary.started
                status = str(primary.exit_status) if primary.started else ""
        except Exception:   # noqa: BLE001 - list it anyway
            pass
        out.append(Container(row["obj"], row["name"], row.get("runtime.powerState"), ident,
                             started, status))
    return sorted(out, key=lambda c: c.name)


def find_container(conn: Connection, dc: vim.Datacenter, name: str) -> vim.VirtualMachine:
    for vm in conn.virtual_machines(dc.vmFolder):
        if vm.name == name:
            if not is_ours(vm.config.annotation if vm.config else None):
                raise VsphereError(f"VM {name!r} was not created by tether vsphere; "
                                   "leaving it alone")
            return vm
    raise VsphereError(f"no container VM named {name!r} in datacenter {dc.name}")


def serial_files(vm) -> list[str]:
    """The datastore paths of the VM's file-backed serial ports, in device order."""
    devices = vm.config.hardware.device if vm.config else []
    return [d.backing.fileName for d in devices
            if isinstance(d, vim.vm.device.VirtualSerialPort)
            and isinstance(d.backing, vim.vm.device.VirtualSerialPort.FileBackingInfo)]


def fetch_file(conn: Connection, dc, vm, basename: str) -> bytes | None:
    """A serial port's file (`output.log`, `tether.debug`); None when it is not there."""
    for path in serial_files(vm):
        if path.rsplit("/", 1)[-1] == basename:
            ds_name, rel = split_datastore_path(path)
            return conn.download(dc, conn.datastore(dc, ds_name), rel)
    return None


def stop(conn: Connection, vm, timeout: float = DEFAULT_STOP_TIMEOUT, poll: float = POLL,
         log=None) -> str:
    """Ask the guest to halt (the agent answers the tools' OS_Halt with the stop signal),
    power off when it has not within `timeout`. Returns what happened."""
    log = log or (lambda text: None)
    if power_state(conn, vm) != ON:
        return "already powered off"
    try:
        vm.ShutdownGuest()
    except (vim.fault.ToolsUnavailable, vim.fault.InvalidState, vmodl.MethodFault) as err:
        log(f"the guest cannot be asked to halt ({fault_text(err)}): powering off")
        power_off(conn, vm)
        return "powered off (guest halt unavailable)"
    if wait_powered_off(conn, vm, time.monotonic() + timeout, poll):
        return "halted by the guest"
    log(f"the guest did not halt within {timeout:g} s: powering off")
    power_off(conn, vm)
    return "powered off after the timeout"


def remove(conn: Connection, vm, force: bool = False) -> None:
    if power_state(conn, vm) == ON and not force:
        raise VsphereError(f"{vm.name} is running: stop it first, or use --force")
    destroy(conn, vm)
