"""`tether vm`: boot an ExecutorConfig in a QEMU VM, playing the VIC port layer's part.

    tether vm CONFIG.json [--image build/] [--rootfs-disk IMG] [--attach] [--out FILE]
              [--timeout S] [--net NAME=BACKEND] [--disk IMG] [--netns NS] ...

The config is encoded to guestinfo keys (vmomi rules: `""` stored as `<nil>`), QEMU
(TCG) boots the bootstrap ISO with the containerfs disk, one virtio-net NIC per network
endpoint at a fixed PCI address, and virtio-serial ports backed by unix sockets this
process listens on before QEMU starts (a guest write on an unconnected port blocks):

    org.tether.guestinfo   info-get / info-set, answered here like the VMX would
    org.tether.output      session output (iolog framing), the primary's echoed to stdout
    org.tether.attach      the attach protocol, for --attach

It waits for the primary's `started`, optionally attaches to the primary, waits for the
guest to power off, prints the final guestinfo map (VMX lines, `<nil>` read back as
empty) and exits with the primary's status. A VM still running at --timeout is killed
and the end of its serial console is shown. SIGTERM or ctrl-c stops it gracefully:
ctrl-alt-del over QMP, which the agent takes as a stop; killed after --stop-timeout.
Every run has its own temporary directory, so several VMs can run at once.

`--template` starts from a snapshot of the same machine booted up to its config, saved by
the first such run (tether/vmtemplate.py).

Boot: the image's kernel directly (PVH entry of `vmlinux`, else `vmlinuz`) on a q35
machine with stage 0 and the project layer as initrd and the root as ext4 on a virtio
disk; `--vic-serial` boots the ISO through isolinux on a pc (i440FX) machine, as ESX would.

PCI layout (root bus): 02 the root disk (direct boot), 03 virtio-rng, 04 virtio-serial,
05-0f NICs (endpoints in name order unless their ID names a slot), 10 the containerfs
disk, 11-1e further disks (1f is q35's LPC bridge).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tether.boottime import CLOCK_KEY
from tether.outcome import EXIT_NOT_STARTED, EXIT_TIMEOUT, primary_outcome
from tether.resume import RESUME_KEY

GUESTINFO_PORT = "org.tether.guestinfo"
OUTPUT_PORT = "org.tether.output"
ATTACH_PORT = "org.tether.attach"
ROOT_SLOT = 0x02
RNG_SLOT = 0x03
SERIAL_SLOT = 0x04
FIRST_NIC_SLOT, LAST_NIC_SLOT = 0x05, 0x0F
CONTAINERFS_SLOT = 0x10
FIRST_DISK_SLOT, LAST_DISK_SLOT = 0x11, 0x1E
NIL = "<nil>"
DEFAULT_TIMEOUT = 120.0
# What the guest's info-sets may add to the host's store, as vSphere bounds what a VM
# writes to its VMX (tools.setInfo.sizeLimit, 1 MB by default). Ours is larger: the
# write-back of a config of a thousand sessions counts 1.55 MB here. A key costs its text
# and STORED_KEY_COST (the dict entry and the two str objects), so many small keys are
# bounded as a few large values are.
GUEST_WRITE_LIMIT = 16 << 20
STORED_KEY_COST = 100
# console.log's size: past it the log moves to console.log.1 (replacing the one before)
# and starts again, so a guest writing to its console without end fills no disk and the
# end of the console, where a failure shows, is kept.
CONSOLE_LOG_LIMIT = 8 << 20
OUTPUT_LOG_LIMIT = 64 << 20     # output.log the same way (the agent's file log's size)
DEFAULT_STOP_TIMEOUT = 30.0    # ctrl-alt-del to power-off: the agent's 10 s grace and more

# The ISO's own kernel arguments besides the console (init/build, FAST_BOOT_ARGS). The
# keyboard stays: ctrl-alt-del on it is how `tether vm` asks the agent to stop.
# `initcall_blacklist` skips two built-in initcalls a container VM never needs and that
# cost ~25 ms of TCG time together: kprobe trace events and the KDF108 self-test.
# `noreplace-smp`: with one CPU the kernel would rewrite every LOCK prefix of its text
# (tens of thousands, each through text_poke and a TLB flush): ~140 ms under TCG.
FAST_BOOT_ARGS = ("i8042.noaux=1 i8042.nopnp=1 cryptomgr.notests no_timer_check "
                  "tsc=reliable rcupdate.rcu_expedited=1 noreplace-smp "
                  "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init")
# Only for QEMU's TCG machine (not the ISO's command line, which ESX boots): no local
# APIC timer. Without a hypervisor that tells the guest the timer's frequency, the kernel
# measures it against the HPET for 100 ms (LAPIC_CAL_LOOPS); the HPET then drives the
# ticks of the one CPU.
TCG_BOOT_ARGS = "nolapic_timer"
# The machine of a direct boot. Linux evaluates the PCI root's _PRT for each device it
# enables; i440FX's is an AML loop building 128 entries (~0.2 s of TCG time each, about
# 1 s for the 4 devices of a plain boot), q35's a static table. The ISO boots on pc: its
# stage 0 reads the CD through ata_piix.
DIRECT_MACHINE = "q35"
# The firmware of a direct boot: qboot (QEMU's minimal BIOS, in qemu-system-data) jumps to
# the kernel QEMU loaded about 40 ms sooner than SeaBIOS under TCG. The ISO keeps SeaBIOS:
# isolinux needs its disk services.
QBOOT = "/usr/share/qemu/qboot.rom"

_PCI_ADDRESS = re.compile(r"^(?:0000:)?00:([0-9a-fA-F]{2})\.0$")
PRIVATE_MAC_PREFIX = "52:54:00:12:34"   # QEMU's own default NIC MAC is 52:54:00:12:34:56
_MAC = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")


class VmError(RuntimeError):
    """Something the user can fix: a missing image, a bad option, a NIC that does not fit."""


# --------------------------------------------------------------------------- plain data

@dataclasses.dataclass
class Nic:
    network: str        # the endpoint's name in the config
    slot: int           # PCI device number on the root bus
    mac: str
    backend: str        # QEMU -netdev options without the id
    mac_per_run: bool = False   # a random MAC, so that VMs on one shared network differ

    @property
    def pci_address(self) -> str:
        return f"0000:00:{self.slot:02x}.0"


@dataclasses.dataclass
class Disk:
    path: str
    slot: int
    snapshot: bool = False      # writes go to a throw-away overlay; the image stays as it is
    readonly: bool = False


@dataclasses.dataclass
class MachineSpec:
    iso: str | None                 # attached as a CD when booting it (no kernel given)
    disks: list[Disk]
    nics: list[Nic]
    memory_mb: int = 512
    cpus: int = 1
    kernel: str | None = None       # direct kernel boot (to pass kernel arguments); the ISO
    initrd: str | None = None       # still carries the root image
    kernel_args: str = ""
    netns: str | None = None
    qemu: str = "qemu-system-x86_64"
    extra_args: list[str] = dataclasses.field(default_factory=list)   # appended as given
    vic_serial: bool = False        # VIC's serial layout: COM1 attach, COM2 console, COM3 log


def backend_options(backend: str) -> str:
    """`user` (isolated slirp), `tap:IFNAME`, or raw QEMU -netdev options."""
    if backend in ("", "user"):
        return "user,restrict=on"
    if backend.startswith("tap:"):
        return f"tap,ifname={backend[4:]},script=no,downscript=no"
    return backend


def _slot_of(endpoint_id: str) -> int | None:
    match = _PCI_ADDRESS.match(endpoint_id)
    if match:
        return int(match.group(1), 16)
    if endpoint_id.isdigit():       # a VMware PCI slot number: only root-bus slots map here
        number = int(endpoint_id)
        if number >> 5 == 0:
            return number
        raise VmError(f"endpoint ID {endpoint_id} is a VMware slot behind a PCI bridge; "
                      "under QEMU use a root-bus slot or a PCI address like 0000:00:05.0")
    return None


def assign_nics(config, backends: dict[str, str] | None = None,
                mac_prefix: str | None = None) -> list[Nic]:
    """One NIC per network endpoint, as the port layer would add them. An endpoint whose
    ID names a PCI slot (address or VMware slot number) gets that slot, one whose ID is a
    MAC gets that MAC; the others get the next free slot, and their ID (empty, or a name)
    is set to the PCI address so the agent finds the NIC by it. Mutates `config.networks` accordingly."""
    backends = dict(backends or {})
    endpoints = {name: ep for name, ep in sorted((config.networks or {}).items()) if ep is not None}
    unknown = set(backends) - set(endpoints)
    if unknown:
        raise VmError(f"--net names no network endpoint of the config: {', '.join(sorted(unknown))}")
    prefix = mac_prefix or "52:54:00:%02x:%02x" % tuple(os.urandom(2))
    taken: dict[int, str] = {}
    wanted: dict[str, int | None] = {}
    for name, endpoint in endpoints.items():
        slot = _slot_of(endpoint.common.id or "")
        if slot is not None:
            if not FIRST_NIC_SLOT <= slot <= LAST_NIC_SLOT:
                raise VmError(f"network {name}: PCI slot {slot:#04x} is outside the NIC range "
                              f"{FIRST_NIC_SLOT:#04x}-{LAST_NIC_SLOT:#04x}")
            if slot in taken:
                raise VmError(f"networks {taken[slot]} and {name} both ask for PCI slot {slot:#04x}")
            taken[slot] = name
        wanted[name] = slot
    free = (s for s in range(FIRST_NIC_SLOT, LAST_NIC_SLOT + 1) if s not in taken)
    nics = []
    for name, endpoint in endpoints.items():
        endpoint_id = endpoint.common.id or ""
        slot = wanted[name]
        if slot is None:
            slot = next(free, None)
            if slot is None:
                raise VmError(f"too many networks: at most {LAST_NIC_SLOT - FIRST_NIC_SLOT + 1}")
        backend = backend_options(backends.get(name, "user"))
        # A user-mode network (slirp) is the VM's alone: its NICs' MACs need not differ
        # from other VMs', and stay the same from run to run (a VM template keeps them).
        if _MAC.match(endpoint_id):
            mac, per_run = endpoint_id.lower(), False
        elif backend.startswith("user") and mac_prefix is None:
            mac, per_run = f"{PRIVATE_MAC_PREFIX}:{slot:02x}", False
        else:
            mac, per_run = f"{prefix}:{slot:02x}", mac_prefix is None
        nic = Nic(name, slot, mac, backend, mac_per_run=per_run)
        if wanted[name] is None and not _MAC.match(endpoint_id):
            # A name (the JSON form defaults the ID to the network's name) is no stable
            # handle under QEMU: the port layer hands the agent the slot it picked.
            endpoint.common.id = nic.pci_address
        nics.append(nic)
    return nics


def qemu_argv(spec: MachineSpec, sockets: dict[str, str]) -> list[str]:
    """The QEMU command line. `sockets`: console and each port name -> unix socket path
    (and, in VIC's layout, `com1`: the socket QEMU listens on for the host's attach)."""
    machine = DIRECT_MACHINE if spec.kernel else "pc"
    argv = [spec.qemu, "-nodefaults", "-no-user-config", "-machine", machine, "-accel", "tcg",
            "-m", str(spec.memory_mb), "-smp", str(spec.cpus), "-display", "none", "-no-reboot"]
    if spec.vic_serial:
        # As VIC wires a container VM: COM1 to the port layer (here a socket the host
        # connects to), COM2 the console, COM3 the session output log.
        argv += ["-chardev", f"socket,id=com1,path={sockets['com1']},server=on,wait=off",
                 "-serial", "chardev:com1",
                 "-chardev", f"socket,id=console,path={sockets['console']}",
                 "-serial", "chardev:console",
                 "-chardev", f"socket,id=com3,path={sockets[OUTPUT_PORT]}",
                 "-serial", "chardev:com3"]
        ports = (GUESTINFO_PORT,)       # QEMU has no RPCI: guestinfo stays on virtio
        console = "ttyS1"
    else:
        argv += ["-chardev", f"socket,id=console,path={sockets['console']}",
                 "-serial", "chardev:console"]
        ports = (GUESTINFO_PORT, OUTPUT_PORT, ATTACH_PORT)
        console = "ttyS0"
    if not spec.kernel:
        argv += ["-drive", f"file={spec.iso},media=cdrom,readonly=on,if=ide,index=2"]
    argv += ["-device", f"virtio-rng-pci,addr={RNG_SLOT:#x}",
            "-device", f"virtio-serial-pci,id=vser0,addr={SERIAL_SLOT:#x}"]
    if spec.kernel:
        if os.path.isfile(QBOOT):
            argv += ["-bios", QBOOT]
        argv += ["-kernel", spec.kernel, "-initrd", spec.initrd or "",
                 "-append", kernel_command_line(console, spec.kernel_args)]
    else:
        argv += ["-boot", "d"]          # the ISO's own command line (console=ttyS1)
    for index, port in enumerate(ports):
        argv += ["-chardev", f"socket,id=port{index},path={sockets[port]}",
                 "-device", f"virtserialport,bus=vser0.0,chardev=port{index},name={port}"]
    for index, disk in enumerate(spec.disks):
        options = f"file={disk.path},if=none,id=disk{index},format=raw"
        if disk.snapshot:
            options += ",snapshot=on"
        if disk.readonly:
            options += ",readonly=on"
        argv += ["-drive", options,
                 "-device", f"virtio-blk-pci,drive=disk{index},addr={disk.slot:#x}"]
    for index, nic in enumerate(spec.nics):
        argv += ["-netdev", f"{nic.backend},id=net{index}",
                 "-device", f"virtio-net-pci,netdev=net{index},addr={nic.slot:#x},mac={nic.mac},romfile="]
    if sockets.get("qmp"):       # QMP: how a stop request reaches the machine
        argv += ["-qmp", f"unix:{sockets['qmp']},server=on,wait=off"]
    argv += spec.extra_args
    if spec.netns:
        argv = ["ip", "netns", "exec", spec.netns] + argv
    return argv


def socket_paths(spec: MachineSpec, workdir: str) -> dict[str, str]:
    """The unix sockets of a machine: console and ports (we listen, QEMU connects),
    com1 in VIC's layout (QEMU listens; "" otherwise) and QMP (QEMU listens)."""
    names = ("console", GUESTINFO_PORT, OUTPUT_PORT) + (
        () if spec.vic_serial else (ATTACH_PORT,))
    paths = {name: os.path.join(workdir, f"{name}.sock") for name in names}
    paths["com1"] = os.path.join(workdir, "com1.sock") if spec.vic_serial else ""
    paths["qmp"] = os.path.join(workdir, "qmp.sock")
    return paths


def kernel_command_line(console: str, extra: str = "") -> str:
    """A direct kernel boot's arguments: the ISO's (init/build) with our console, and
    the root: the disk at ROOT_SLOT."""
    return (f"console={console} panic=-1 quiet {FAST_BOOT_ARGS} {TCG_BOOT_ARGS} "
            f"tether.root=pci:0000:00:{ROOT_SLOT:02x}.0 {extra}").strip()


# --------------------------------------------------------------------------- the VMX's part

class VmxGuestinfo:
    """The VM's extraConfig as vSphere keeps it: values `""` are stored as `<nil>` (an empty
    OptionValue would delete the key), and read back through vmomi as `""`."""

    def __init__(self, keys: dict[str, str], on_set=None, guest_limit: int = GUEST_WRITE_LIMIT):
        self._lock = threading.Lock()
        self.data = {key: (NIL if value == "" else value) for key, value in keys.items()}
        self.on_set = on_set
        self.requests = 0
        self.guest_limit = guest_limit
        self.guest_bytes = 0       # what the guest's writes added (less what they freed)

    def info_get(self, key: str) -> str | None:
        with self._lock:
            self.requests += 1
            return self.data.get(key)

    def info_set(self, key: str, value: str) -> None:
        """Store the guest's write; virtio.Refused when it would take the guest's writes
        past `guest_limit` (a smaller value in place of a larger one always fits)."""
        from extraconfig.virtio import Refused
        with self._lock:
            self.requests += 1
            old = self.data.get(key)
            growth = _stored_cost(key, value) - (0 if old is None else _stored_cost(key, old))
            if growth > 0 and self.guest_bytes + growth > self.guest_limit:
                raise Refused(f"Too large: the guest's writes would pass the host's "
                              f"{self.guest_limit}-byte limit")
            self.guest_bytes += growth
            self.data[key] = value
        if self.on_set is not None:
            self.on_set(key, value)

    def items(self) -> list[tuple[str, str]]:
        """The stored keys and values, as read (`info-dump`: the agent's whole config)."""
        with self._lock:
            self.requests += 1
            return list(self.data.items())

    def final_map(self) -> dict[str, str]:
        with self._lock:
            return {key: ("" if value == NIL else value) for key, value in sorted(self.data.items())}


def _stored_cost(key: str, value: str) -> int:
    return STORED_KEY_COST + len(key) + len(value)


def primary_started_key(config) -> str:
    from extraconfig import calculate_key
    return calculate_key(config, ["Sessions", config.id, "Started"])


# --------------------------------------------------------------------------- the machine

class Machine:
    """One QEMU process and the host ends of its serial ports, served on a thread."""

    def __init__(self, spec: MachineSpec, guestinfo: VmxGuestinfo, workdir: str,
                 echo_console=None, on_output=None):
        self.spec = spec
        self.guestinfo = guestinfo
        self.workdir = workdir
        self.echo_console = echo_console    # callable(bytes) or None
        self.on_output = on_output          # callable(entry) or None
        paths = socket_paths(spec, workdir)
        # VIC's layout: QEMU listens on com1 for the host's side of COM1 (handshake + SSH)
        self.com1_socket = paths.pop("com1") or None
        self.qmp_socket = paths.pop("qmp")
        self.sockets = paths         # the ones we listen on, QEMU connecting
        self.console_log = os.path.join(workdir, "console.log")
        self.console_limit = CONSOLE_LOG_LIMIT
        self.console_dropped = 0        # bytes of the console no longer kept
        self.output_log = os.path.join(workdir, "output.log")
        self.output_limit = OUTPUT_LOG_LIMIT
        self.output_dropped = 0         # bytes of session output no longer kept
        self.process: subprocess.Popen | None = None
        self.marks: dict[str, float] = {}
        self.attach_connected = threading.Event()
        self.attach_sock: socket.socket | None = None
        self.console_connected = threading.Event()
        self._console_conn: socket.socket | None = None
        self._console_lock = threading.Lock()
        self._listeners: dict[str, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files = {}
        # The agent's resume request of a template boot (tether/vmtemplate.py) is not
        # answered by the port thread: `on_resume()` is called, once (the first request
        # only), and the answer goes later through `answer_resume`.
        self.on_resume = None
        self.incoming_args: list[str] = []   # `-incoming ...`: start from a template
        self.guestinfo_connected = threading.Event()
        self._guestinfo_conn: socket.socket | None = None
        # One request at a time, as the guest sends them: the requests read and not
        # answered yet, and the reply bytes QEMU has not taken (the port thread and
        # `answer_resume` write them, under the lock). While a reply waits, the port
        # thread watches the port for room instead of reading more requests.
        self._guestinfo_requests: collections.deque[str] = collections.deque()
        self._guestinfo_out = bytearray()
        self._guestinfo_lock = threading.Lock()
        self._guestinfo_events = selectors.EVENT_READ

    # -- lifecycle
    def start(self) -> None:
        from extraconfig.virtio import Deframer
        self._deframer = Deframer()
        self._files["console"] = open(self.console_log, "wb")
        self._files["output"] = open(self.output_log, "wb")
        from tether.iolog import EntryReader
        self._output_reader = EntryReader()
        for name, path in self.sockets.items():
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            listener.setblocking(False)
            self._listeners[name] = listener
            self._selector.register(listener, selectors.EVENT_READ, ("accept", name))
        argv = qemu_argv(self.spec, socket_paths(self.spec, self.workdir)) + self.incoming_args
        with open(os.path.join(self.workdir, "qemu.argv"), "w") as f:
            f.write(" ".join(argv) + "\n")
        self.marks["qemu_start"] = time.monotonic()
        self._qemu_stderr = open(os.path.join(self.workdir, "qemu.stderr"), "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._qemu_stderr,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._thread = threading.Thread(target=self._serve, name="tether-vm-ports", daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> int | None:
        """QEMU's exit status, or None when it still runs after `timeout` seconds."""
        try:
            code = self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        self.marks.setdefault("qemu_exit", time.monotonic())
        # QEMU is gone: let the port thread read what the sockets still hold.
        deadline = time.monotonic() + 2.0
        while self._thread.is_alive() and self._open_connections() and time.monotonic() < deadline:
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)     # QEMU leads its own group
            except ProcessLookupError:
                pass
            self.process.wait()

    def send_ctrl_alt_del(self, timeout: float = 10.0) -> None:
        """Press ctrl-alt-del on the guest's keyboard (QMP send-key): the agent, PID 1,
        gets SIGINT and stops gracefully. Raises VmError when QMP cannot do it."""
        qmp_command(self.qmp_socket, "send-key", {"keys": [
            {"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"},
            {"type": "qcode", "data": "delete"}]}, timeout=timeout)

    def close(self) -> None:
        self.kill()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()
        if self.attach_sock is not None:
            self.attach_sock.close()
        for f in self._files.values():
            f.close()
        if getattr(self, "_qemu_stderr", None):
            self._qemu_stderr.close()

    def console_text(self) -> str:
        """The console as kept: at most the last two logs' worth (see CONSOLE_LOG_LIMIT)."""
        self._files["console"].flush()
        data = b""
        for path in (self.console_log + ".1", self.console_log):
            try:
                with open(path, "rb") as f:
                    data += f.read()
            except FileNotFoundError:
                continue
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")
        if self.console_dropped:
            text = (f"[tether vm: the first {self.console_dropped} bytes of the console "
                    "are not kept]\n") + text
        return text

    def qemu_errors(self) -> str:
        self._qemu_stderr.flush()
        with open(os.path.join(self.workdir, "qemu.stderr"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def send_console(self, data: bytes, timeout: float = 30.0) -> None:
        """Type into the guest's serial console (ttyS0): the debug image's shell reads it."""
        import select
        if not self.console_connected.wait(timeout):
            raise VmError("QEMU never connected the console")
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with self._console_lock:
            while view and time.monotonic() < deadline:
                conn = self._console_conn
                if conn is None or conn.fileno() < 0:
                    raise VmError("the console is closed")
                select.select([], [conn], [], 0.5)
                try:
                    view = view[conn.send(view):]
                except BlockingIOError:
                    continue

    # -- the port thread
    def _open_connections(self) -> bool:
        return any(data[0] == "read" for data in
                   (key.data for key in self._selector.get_map().values()))

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, events in self._selector.select(timeout=0.2):
                kind, name = key.data
                try:
                    if kind == "accept":
                        self._accept(key.fileobj, name)
                    elif events & selectors.EVENT_READ:
                        self._read(key.fileobj, name)
                    else:               # room for the guestinfo reply waiting
                        self._answer_guestinfo()
                except Exception as err:   # noqa: BLE001 - keep serving the other ports
                    print(f"tether vm: port {name}: {err}", file=sys.stderr)
                    self._drop(key.fileobj)
            self._watch_guestinfo()
            if self.process is not None and self.process.poll() is not None \
                    and not self._open_connections():
                return

    def _accept(self, listener: socket.socket, name: str) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        self._selector.unregister(listener)
        listener.close()
        if name == ATTACH_PORT:        # the attach client (main thread) owns this one
            conn.setblocking(True)
            self.attach_sock = conn
            self.attach_connected.set()
            return
        conn.setblocking(False)
        self._selector.register(conn, selectors.EVENT_READ, ("read", name))
        if name == "console":
            self._console_conn = conn
            self.console_connected.set()
        elif name == GUESTINFO_PORT:
            self._guestinfo_conn = conn
            self.guestinfo_connected.set()

    def _drop(self, conn) -> None:
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        if conn is self._guestinfo_conn:
            with self._guestinfo_lock:
                self._guestinfo_conn = None
                self._guestinfo_out.clear()
            self._guestinfo_requests.clear()
        conn.close()

    def _read(self, conn: socket.socket, name: str) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self._drop(conn)
            return
        now = time.monotonic()
        if name == "console":
            self.marks.setdefault("console_first", now)
            self._log_console(data)
            if self.echo_console is not None:
                self.echo_console(data)
        elif name == OUTPUT_PORT:
            self._log_output(data, self._read_entries(data))
        elif name == GUESTINFO_PORT:
            self.marks.setdefault("agent_start", now)
            self._guestinfo_requests.extend(self._deframer.feed(data))
            self._answer_guestinfo()

    def _answer_guestinfo(self) -> None:
        """Answer the requests read, one at a time: the next once QEMU has taken the
        last reply whole (a guest sending requests ahead without reading the replies
        gets no more of them built than its port holds)."""
        from extraconfig.virtio import answer, frame, info_get_request
        while self._flush_guestinfo() and self._guestinfo_requests:
            request = self._guestinfo_requests.popleft()
            if self.on_resume is not None and request == info_get_request(RESUME_KEY):
                # Only the agent's request before its config is the template's: a
                # later one (the container's) must not save this run's VM as it.
                on_resume, self.on_resume = self.on_resume, None
                self.marks.setdefault("resume_request", time.monotonic())
                on_resume()
                continue
            reply = frame(answer(request, self.guestinfo.info_get, self.guestinfo.info_set,
                                 self.guestinfo.items))
            with self._guestinfo_lock:
                self._guestinfo_out += reply
        self._watch_guestinfo()

    def _flush_guestinfo(self) -> bool:
        """Write what QEMU takes of the replies waiting; True when none is left."""
        with self._guestinfo_lock:
            conn = self._guestinfo_conn
            if self._guestinfo_out and conn is not None:
                try:
                    sent = conn.send(self._guestinfo_out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                del self._guestinfo_out[:sent]
            return not self._guestinfo_out

    def _watch_guestinfo(self) -> None:
        """The port thread's interest in the guestinfo port: room while a reply waits
        (not the guest's next requests), else its requests."""
        conn = self._guestinfo_conn
        if conn is None:
            return
        with self._guestinfo_lock:
            events = selectors.EVENT_WRITE if self._guestinfo_out else selectors.EVENT_READ
        if events != self._guestinfo_events:
            self._selector.modify(conn, events, ("read", GUESTINFO_PORT))
            self._guestinfo_events = events

    def _log_console(self, data: bytes) -> None:
        log = self._files["console"]
        if log.tell() + len(data) > self.console_limit:
            self.console_dropped += self._rotate("console", self.console_log)
            log = self._files["console"]
        log.write(data)
        log.flush()

    def _rotate(self, name: str, path: str) -> int:
        """The log `name` moves to PATH.1 (replacing the one before) and starts again at
        `path`; returns the size of the PATH.1 it replaced: bytes no longer kept."""
        self._files[name].close()
        try:
            dropped = os.path.getsize(path + ".1")
        except FileNotFoundError:
            dropped = 0
        os.replace(path, path + ".1")
        self._files[name] = open(path, "wb")
        return dropped

    def answer_resume(self, value: str) -> None:
        """Answer the agent's pending resume request (from any thread; what QEMU does
        not take at once, the port thread writes)."""
        from extraconfig.virtio import answer, frame, info_get_request
        reply = frame(answer(info_get_request(RESUME_KEY), lambda _key: value,
                             self.guestinfo.info_set))
        with self._guestinfo_lock:
            if self._guestinfo_conn is None:
                raise VmError("the guestinfo port is not connected")
            self._guestinfo_out += reply
        self._flush_guestinfo()

    def _read_entries(self, data: bytes) -> int:
        """Hand on the entries `data` completes; returns where in `data` the last one
        ends (0: none ends in it)."""
        from tether.iolog import FramingError
        reader = self._output_reader
        try:
            for entry in reader.feed(data):
                self.marks.setdefault("output_first", time.monotonic())
                if self.on_output is not None:
                    self.on_output(entry)
        except FramingError:
            reader.skip()     # not iolog framing: drop it, keep running
            return 0
        return max(0, len(data) - reader.pending)

    def _log_output(self, data: bytes, entries_end: int) -> None:
        """output.log as the port sent it. Past `output_limit` it moves to output.log.1
        at the end of an entry (each file reads whole in `tether logs`) and starts again:
        a guest printing without end fills no disk, as the agent's own file log rotates."""
        log = self._files["output"]
        if entries_end and log.tell() + entries_end > self.output_limit:
            log.write(data[:entries_end])
            self.output_dropped += self._rotate("output", self.output_log)
            log = self._files["output"]
            data = data[entries_end:]
        log.write(data)
        log.flush()


def qmp_command(path: str, command: str, arguments: dict | None = None,
                timeout: float = 10.0) -> dict:
    """One QMP command on QEMU's monitor socket: greeting, capabilities, the command;
    its `return` value (events on the way are skipped). Raises VmError."""
    import json
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            while True:   # QEMU makes the socket as it starts
                try:
                    sock.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            lines = sock.makefile("rb")

            def reply() -> dict:
                while time.monotonic() < deadline:
                    line = lines.readline()
                    if not line:
                        raise VmError("QMP closed the connection")
                    message = json.loads(line)
                    if "error" in message:
                        raise VmError(f"QMP {command}: {message['error'].get('desc')}")
                    if "return" in message or "QMP" in message:
                        return message
                raise VmError(f"QMP {command}: no answer within {timeout:g}s")

            reply()                                   # the greeting
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            reply()
            request = {"execute": command, **({"arguments": arguments} if arguments else {})}
            sock.sendall(json.dumps(request).encode() + b"\n")
            return reply().get("return", {})
    except (OSError, ValueError) as err:
        raise VmError(f"QMP {command} on {path}: {err}") from None


# --------------------------------------------------------------------------- a whole run

@dataclasses.dataclass
class VmResult:
    exit_code: int
    qemu_status: int | None         # None: killed at the timeout
    guestinfo: dict[str, str]       # the final map, as the port layer reads it back
    config: object | None           # the final map decoded (None if it does not decode)
    console: str
    marks: dict[str, float]
    workdir: str
    message: str = ""
    template: str = ""              # "created" or "restored" with --template, else ""


class VmRun:
    """Boots one config and collects the result: the library form of `tether vm`."""

    def __init__(self, config, image_dir: str, *, rootfs_disk: str | None = None,
                 disks: list[str] | None = None, nets: dict[str, str] | None = None,
                 netns: str | None = None, debug_image: bool = False,
                 kernel_args: str = "", extra_guestinfo: dict[str, str] | None = None,
                 memory_mb: int = 512, echo_console=None, on_output=None,
                 workdir: str | None = None, qemu_args: list[str] | None = None,
                 vic_serial: bool = False, cpus: int = 1, template: bool = False,
                 template_root: str | None = None):
        image_dir = os.path.abspath(image_dir)
        # The ISO's command line puts the console on ttyS1 (VIC's layout). Our own layout
        # keeps it on ttyS0, so it boots the image's kernel directly with our arguments;
        # --vic-serial boots the ISO through isolinux as ESX would.
        direct = bool(kernel_args) or not vic_serial
        iso = os.path.join(image_dir, "bootstrap-debug.iso" if debug_image else "bootstrap.iso")
        kernel = os.path.join(image_dir, "vmlinux")
        if not os.path.isfile(kernel):        # no PVH kernel extracted: the bzImage
            kernel = os.path.join(image_dir, "vmlinuz")
        initrd, root = os.path.join(image_dir, "initrd.img"), os.path.join(image_dir, "root.ext4")
        # The debug initrd carries busybox (stage 0's shells) and the CD stack; the plain
        # one leaves them out, as the kernel unpacks every byte of it (init/build).
        debug_initrd = os.path.join(image_dir, "initrd-debug.img")
        if (debug_image or "tether.shell=" in kernel_args) and os.path.isfile(debug_initrd):
            initrd = debug_initrd
        for part in (kernel, initrd, root) if direct else (iso,):
            if not os.path.isfile(part):
                raise VmError(f"no {part}: build the image first (init/build, or make image)")
        self.config = config
        self.nics = assign_nics(config, nets)
        self.workdir = workdir or tempfile.mkdtemp(prefix="tether-vm-")
        os.makedirs(self.workdir, exist_ok=True)
        disk_list = [Disk(root, ROOT_SLOT, readonly=True)] if direct else []
        if rootfs_disk is None:
            default = os.path.join(image_dir, "containerfs.img")
            if os.path.isfile(default):
                disk_list.append(Disk(default, CONTAINERFS_SLOT, snapshot=True))
        else:
            if not os.path.isfile(rootfs_disk):
                raise VmError(f"--rootfs-disk {rootfs_disk}: no such file")
            disk_list.append(Disk(os.path.abspath(rootfs_disk), CONTAINERFS_SLOT))
        for index, path in enumerate(disks or []):
            if FIRST_DISK_SLOT + index > LAST_DISK_SLOT:
                raise VmError("too many disks")
            if not os.path.isfile(path):
                raise VmError(f"--disk {path}: no such file")
            disk_list.append(Disk(os.path.abspath(path), FIRST_DISK_SLOT + index))
        if not direct:
            kernel = initrd = None
        elif debug_image:
            # what bootstrap-debug.iso's own command line adds
            kernel_args = f"loglevel=7 tether.image=debug tether.debug=1 {kernel_args}"
        self.spec = MachineSpec(iso=None if direct else iso, disks=disk_list, nics=self.nics,
                                memory_mb=memory_mb, cpus=cpus,
                                kernel=kernel, initrd=initrd, kernel_args=kernel_args, netns=netns,
                                extra_args=list(qemu_args or []), vic_serial=vic_serial)
        from tether.extension import encode_config
        keys = encode_config(config)   # VIC's keys and our extension's
        keys.update(extra_guestinfo or {})
        self.started_key = primary_started_key(config) if config.id in (config.sessions or {}) else None
        self.started = threading.Event()
        self._stop_requested = threading.Event()
        self._stop_killed = False
        self.timeline_clock: tuple[float, str] | None = None
        self.guestinfo = VmxGuestinfo(keys, on_set=self._on_set)
        self._machine_args = dict(echo_console=echo_console, on_output=on_output)
        self.template = None            # tether.vmtemplate.Template, with --template
        self.template_mode = ""         # with a template: "create" or "restore" it
        self.template_result = ""       # what happened: "created" or "restored"
        self.template_note = ""         # what became of --template, for the user
        if template:
            self._choose_template(template_root)
        self.machine = Machine(self.spec, self.guestinfo, self.workdir, **self._machine_args)

    # -- templates (tether/vmtemplate.py)
    def _choose_template(self, root: str | None) -> None:
        from tether import vmtemplate
        why = vmtemplate.unsuitable(self.spec)
        if why:
            self._note(f"no VM template: {why}")
            return
        self.spec.kernel_args = f"{self.spec.kernel_args} {vmtemplate.KERNEL_ARG}".strip()
        # The key: the command line as the guest sees it (socket paths relative) and
        # every file it names.
        self._template_argv = qemu_argv(self.spec, socket_paths(self.spec, ""))
        files = [self.spec.kernel, self.spec.initrd] + [d.path for d in self.spec.disks]
        files += [path for path in (shutil.which(self.spec.qemu), QBOOT)
                  if path and os.path.isfile(path)]
        key = vmtemplate.template_key(self._template_argv, files)
        self.template = vmtemplate.Template(root or vmtemplate.cache_root(), key)
        self.template_mode = "restore" if self.template.exists() else "create"

    def _restore(self) -> bool:
        """Start QEMU from the template; once the state is loaded, answer the agent's
        resume request it carries. False when QEMU could not load it."""
        from tether.vmtemplate import CAPTURE_TIMEOUT, resume_value, wait_for_migration
        self.machine.incoming_args = self.template.incoming_args()
        self.machine.start()

        def status() -> str | None:
            try:
                return qmp_command(self.machine.qmp_socket, "query-migrate",
                                   timeout=2.0).get("status")
            except VmError:
                return None          # the monitor is not up yet
        loaded = wait_for_migration(status, CAPTURE_TIMEOUT, interval=0.005,
                                    running=lambda: self.machine.process.poll() is None)
        if loaded != "completed":
            return False
        self.machine.marks["restored"] = time.monotonic()
        if not self.machine.guestinfo_connected.wait(10.0):
            return False
        self.machine.answer_resume(resume_value())
        self.template_result = "restored"
        return True

    def _start_over_cold(self) -> None:
        """The template would not load: drop it, and boot this run cold (saving a new
        template on the way)."""
        errors = self.machine.qemu_errors().strip().splitlines()
        self.machine.close()
        self.template.remove()
        self._note("the VM template did not load ("
                   f"{errors[-1] if errors else 'QEMU said nothing'}); removed it and booted cold")
        for path in socket_paths(self.spec, self.workdir).values():
            if path and os.path.exists(path):
                os.unlink(path)
        self.machine = Machine(self.spec, self.guestinfo, self.workdir, **self._machine_args)
        self.template_mode = "create"

    def _capture_template(self) -> None:
        """The agent waits for its resume answer: save the guest, then answer (on a
        thread of its own: the port thread goes on serving)."""
        threading.Thread(target=self._capture, name="tether-vm-template", daemon=True).start()

    def _capture(self) -> None:
        from tether.vmtemplate import TemplateError, resume_value

        def qmp(command: str, arguments: dict | None) -> dict:
            return qmp_command(self.machine.qmp_socket, command, arguments)
        try:
            size = self.template.capture(qmp, self._template_argv)
            self.template_result = "created"
            self._note(f"saved a VM template ({size / 2**20:.0f} MiB, "
                       f"{self.template.directory}); later runs of this machine start from it")
        except (TemplateError, VmError, OSError) as err:
            self._note(f"no VM template saved: {err}")
        try:
            qmp("cont", None)     # QEMU pauses the guest at the end of a migration
        except VmError as err:
            self._note(f"the guest could not be continued: {err}")
        self.machine.marks["template_saved"] = time.monotonic()
        try:
            self.machine.answer_resume(resume_value(cold=True))
        except (OSError, VmError) as err:
            self._note(f"the agent was not answered: {err}")

    def _note(self, text: str) -> None:
        self.template_note = f"{self.template_note}; {text}" if self.template_note else text

    def _on_set(self, key: str, value: str) -> None:
        if key == self.started_key and value not in ("", NIL):
            self.machine.marks.setdefault("started", time.monotonic())
            self.started.set()
        elif key == CLOCK_KEY:      # the guest's boot clock, as it wrote its timeline
            self.timeline_clock = (time.monotonic(), value)

    def start(self) -> None:
        if self.template_mode == "restore":
            if self._restore():
                return
            self._start_over_cold()
        if self.template_mode == "create":
            self.machine.on_resume = self._capture_template
        self.machine.start()

    def wait_started(self, timeout: float) -> str | None:
        """The primary's `started` value once written (`true` or the error), else None."""
        if self.started.wait(timeout):
            return self.guestinfo.final_map().get(self.started_key)
        return None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """A graceful stop, from any thread: ctrl-alt-del to the guest (the agent stops
        its sessions, writes back and powers off); QEMU is killed if it still runs after
        `timeout` seconds, or at once when the key cannot be sent. A second call kills."""
        if self._stop_requested.is_set():
            self._stop_killed = True
            self.machine.kill()
            return
        self._stop_requested.set()

        def stop_it() -> None:
            started_by = time.monotonic() + timeout
            while self.machine.process is None:     # a signal before QEMU started
                if time.monotonic() > started_by:
                    return
                time.sleep(0.05)
            try:
                self.machine.send_ctrl_alt_del()
            except VmError as err:
                print(f"tether vm: cannot ask the guest to stop ({err}); killing it",
                      file=sys.stderr)
                self._stop_killed = True
                self.machine.kill()
                return
            if self.machine.wait(timeout) is None:
                self._stop_killed = True
                self.machine.kill()
        threading.Thread(target=stop_it, name="tether-vm-stop", daemon=True).start()

    def finish(self, timeout: float) -> VmResult:
        """Wait for the guest to power off (kill it at the timeout) and collect."""
        qemu_status = self.machine.wait(timeout)
        message = ""
        if self._stop_killed:
            message = "the VM did not power off after ctrl-alt-del; killed"
        elif qemu_status is None:
            self.machine.kill()
            message = "the VM did not power off within the timeout; killed"
        elif qemu_status != 0:
            message = f"QEMU exited with status {qemu_status}: {self.machine.qemu_errors().strip()}"
        final = self.guestinfo.final_map()
        final.update(self._host_timeline())
        decoded, code, reason = primary_outcome(final)
        if qemu_status is None:
            code = EXIT_TIMEOUT
        if reason and not message:
            message = reason
        return VmResult(code, qemu_status, final, decoded, self.machine.console_text(),
                        dict(self.machine.marks), self.workdir, message,
                        template=self.template_result)

    def _host_timeline(self) -> dict[str, str]:
        """Our marks (QEMU start, first console byte, first guestinfo request, started)
        on the guest's boot clock, for the timeline the guest wrote back."""
        if self.timeline_clock is None:
            return {}
        from tether.bootchart import host_keys
        arrived, value = self.timeline_clock
        try:
            return host_keys(self.machine.marks, arrived, float(value))
        except ValueError:
            return {}

    def close(self, keep: bool = False) -> None:
        self.machine.close()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- attach

def attach_primary(run: VmRun, deadline: float, stdin=None, stdout=None,
                   stderr=None) -> int | None:
    """Attach to the primary over org.tether.attach: stdin in, output out, until it exits
    (the interactive loop of `tether attach`, without detach keys). Returns the exit code
    the attach stream reported, if any."""
    from tether.attach import transports
    from tether.attach.client import Client, ClientError
    from tether.attach.terminal import file_writer, interact
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = file_writer(sys.stdout.buffer if stdout is None else stdout)
    stderr = file_writer(sys.stderr.buffer) if stderr is None else file_writer(stderr)
    if not run.machine.attach_connected.wait(max(0.0, deadline - time.monotonic())):
        raise VmError("QEMU never connected the attach port")
    sock = run.machine.attach_sock
    sock.setblocking(False)
    # The host end of a virtio port is a line like the guest's: checked frames both ways.
    conn = transports.Conn(sock.fileno(), "virtio-serial org.tether.attach", sock=sock,
                           persistent=True)
    client = Client(conn, run.config.key or b"", timeout=max(1.0, deadline - time.monotonic()))
    run.machine.attach_sock = None      # the client owns (and closes) it now
    try:
        client.handshake()
        primary = run.config.id
        while True:
            try:   # attached first, then RunBlock released: no output is missed
                stream = client.attach(primary, replay=True,
                                       unblock=run.config.sessions[primary].run_block)
                break
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # Input is for the process: hold it until the agent reports the primary started
        # (a RunBlock session starts only after the unblock), showing output meanwhile.
        while not run.started.is_set() and not stream.closed and time.monotonic() < deadline:
            client.pump(0.2)
            for kind, value in stream.pending():
                if kind == "exit":
                    return value
                (stderr if kind == "stderr" else stdout)(value)
        return interact(client, stream,
                        stdin_fd=stdin.fileno() if stdin is not False else None,
                        stdout=stdout, stderr=stderr, detach_keys=None, deadline=deadline)
    finally:
        client.close()


def attach_primary_vic(run: VmRun, deadline: float) -> None:
    """--vic-serial --attach: the port layer's way in, over COM1 (handshake, SSH, unblock)."""
    import asyncio
    from tether.attach.vic.client import attach
    while not os.path.exists(run.machine.com1_socket):
        if time.monotonic() > deadline:
            raise VmError("QEMU never made the COM1 socket")
        time.sleep(0.1)
    asyncio.run(attach("unix:" + run.machine.com1_socket, run.config.id,
                       timeout=max(1.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- the command

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tether vm", description="Boot a config in a QEMU VM, playing the port layer.")
    parser.add_argument("config", help="the ExecutorConfig in JSON form")
    parser.add_argument("--image", default="build", help="directory of init/build's outputs (build/)")
    parser.add_argument("--rootfs-disk", help="container image disk (ext4 labelled containerfs); "
                        "default: the image's containerfs.img, with writes discarded")
    parser.add_argument("--disk", action="append", default=[], help="another disk (e.g. for a "
                        "label:// volume), PCI slot 0x11 onwards; repeatable")
    parser.add_argument("--net", action="append", default=[], metavar="NAME=BACKEND",
                        help="network endpoint backend: user (isolated slirp, default), "
                        "tap:IFNAME, or raw -netdev options")
    parser.add_argument("--netns", help="run QEMU in this network namespace (for tap backends)")
    parser.add_argument("--attach", action="store_true", help="attach stdin/stdout to the primary")
    parser.add_argument("--out", help="write the final guestinfo map here as VMX lines "
                        "(default: stdout); `tether config decode FILE` reads it")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"kill the VM after this many seconds (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                        help="on SIGTERM or ctrl-c the guest gets ctrl-alt-del (a graceful "
                        "stop); kill it if it has not powered off after this many seconds "
                        f"(default {DEFAULT_STOP_TIMEOUT:g}); a second signal kills at once")
    parser.add_argument("--guestinfo", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra guestinfo key, e.g. guestinfo.bootstrap-shell=true")
    parser.add_argument("--debug-image", action="store_true",
                        help="boot bootstrap-debug.iso (a shell when guestinfo bootstrap-shell=true)")
    parser.add_argument("--kernel-args", default="", help="extra kernel arguments, e.g. "
                        "tether.debug=2 (boots the image's kernel directly; root still on the ISO)")
    parser.add_argument("--qemu-arg", action="append", default=[], dest="qemu_args",
                        help="an extra QEMU argument (repeat for each word), e.g. "
                        "--qemu-arg=-machine --qemu-arg=vmport=on")
    # the VM-wide limits (the port layer's SetLimits(memoryMb, cpuMhz)); per-session limits
    # are the config's `limits` (docs/config.md)
    parser.add_argument("--memory", type=int, default=512, help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, default=1, help="guest vCPUs (default 1)")
    parser.add_argument("--console", action="store_true", help="show the serial console on "
                        "stderr and send stdin to it (without --attach)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, sockets)")
    parser.add_argument("--timeline", metavar="FILE.svg|-", help="draw the boot timeline (the "
                        "guest's phases and ours) as an SVG chart, or '-' for a text table "
                        "on stderr")
    parser.add_argument("--template", action="store_true",
                        help="start from a snapshot of this machine booted up to its config "
                        "(saved by the first run, in $TETHER_CACHE/vm-templates): about "
                        "three times faster; clones share the template's kernel layout "
                        "(docs/vm.md, Templates)")
    parser.add_argument("--vic-serial", action="store_true",
                        help="VIC's serial layout: boot the ISO as is (console on ttyS1), COM1 "
                        "a unix socket for VIC's attach (tether attach --vic unix:PATH ID), "
                        "COM3 the output log; with --attach, attach over COM1")
    return parser.parse_args(argv)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VmError(f"{what} {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from tether.jsonform import ConfigError, load_config
    try:
        config = load_config(args.config)
        nets = _pairs(args.net, "--net")
        extra = _pairs(args.guestinfo, "--guestinfo")
    except (ConfigError, VmError, OSError) as err:
        print(f"tether vm: {err}", file=sys.stderr)
        return 2
    if args.memory < 16 or args.cpus < 1:
        print("tether vm: --memory is at least 16 (MiB) and --cpus at least 1",
              file=sys.stderr)
        return 2
    if shutil.which("qemu-system-x86_64") is None:
        print("tether vm: qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 2

    def echo_console(data: bytes) -> None:
        sys.stderr.buffer.write(data.replace(b"\r\n", b"\n"))
        sys.stderr.buffer.flush()

    def echo_output(entry) -> None:
        if entry.session is None:      # the primary's output, as docker run shows it
            stream = sys.stdout.buffer if entry.stream == 0 else sys.stderr.buffer
            stream.write(entry.data)
            stream.flush()

    try:
        run = VmRun(config, args.image, rootfs_disk=args.rootfs_disk, disks=args.disk,
                    nets=nets, netns=args.netns, debug_image=args.debug_image,
                    kernel_args=args.kernel_args, extra_guestinfo=extra, memory_mb=args.memory,
                    qemu_args=args.qemu_args, vic_serial=args.vic_serial, cpus=args.cpus,
                    template=args.template, echo_console=echo_console if args.console else None,
                    on_output=None if args.attach else echo_output)
    except VmError as err:
        print(f"tether vm: {err}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: run.stop(args.stop_timeout))
    try:
        run.start()
        if args.console and not args.attach:
            _forward_stdin_to_console(run.machine)
        if args.vic_serial:
            print(f"tether vm: COM1 (VIC attach): unix:{run.machine.com1_socket}",
                  file=sys.stderr)
        if args.attach:
            try:
                if args.vic_serial:
                    attach_primary_vic(run, deadline)
                else:
                    attach_primary(run, deadline)
            except Exception as err:   # noqa: BLE001 - the VM result still counts
                print(f"tether vm: attach failed: {shown(str(err))}", file=sys.stderr)
        result = run.finish(deadline - time.monotonic())
    except KeyboardInterrupt:
        run.close(keep=args.keep)
        return 130
    if run.template_note:
        print(f"tether vm: {run.template_note}", file=sys.stderr)
    try:
        report(result, args.out, show_console=not args.console)
        if args.timeline:
            show_timeline(result, args.timeline)
    finally:
        run.close(keep=args.keep)
        if args.keep:
            print(f"tether vm: run directory kept: {run.workdir}", file=sys.stderr)
    return result.exit_code


def _forward_stdin_to_console(machine: Machine) -> None:
    """--console: what is typed goes to the serial console (for the debug image's shell)."""
    def pump():
        try:
            while True:
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    return
                machine.send_console(data)
        except (OSError, VmError, ValueError):
            return
    threading.Thread(target=pump, name="tether-vm-console-in", daemon=True).start()


def show_timeline(result: VmResult, target: str) -> None:
    from tether import bootchart
    phases = bootchart.read_phases(result.guestinfo)
    if not phases:
        print("tether vm: no boot timeline: the agent writes it once the primary has started",
              file=sys.stderr)
        return
    if target == "-":       # stdout carries the map: the table goes with the messages
        sys.stderr.write(shown(bootchart.text_table(phases), keep=CONSOLE_KEEP))
        return
    bootchart.write(phases, target, f"Boot timeline: {result.config.id if result.config else ''}")
    print(f"tether vm: boot timeline in {target}", file=sys.stderr)


def report(result: VmResult, out: str | None, show_console: bool = True) -> None:
    """The final map as VMX lines (as `tether sandbox` writes it) to `out` or stdout."""
    from extraconfig.transport import format_vmx
    # Bytes: a guest may write keys and values that are not UTF-8; they come back as they
    # came (as a VMX file keeps them, and VmxFileTransport writes them).
    data = format_vmx(result.guestinfo).encode("utf-8", "surrogateescape")
    if out:
        with open(out, "wb") as f:
            f.write(data)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    sys.stdout.flush()
    if result.message:
        print(f"tether vm: {shown(result.message)}", file=sys.stderr)
    failed = result.qemu_status != 0 or result.exit_code in (EXIT_TIMEOUT, EXIT_NOT_STARTED)
    if failed and show_console:
        tail = "\n".join(result.console.splitlines()[-60:])
        print(f"tether vm: serial console (last lines):\n{shown(tail, keep=CONSOLE_KEEP)}",
              file=sys.stderr)


CONSOLE_KEEP = "\n\t"      # a console tail keeps its lines and tabs


def shown(text: str, keep: str = "") -> str:
    """Guest text in our own lines on the user's terminal (tether.console)."""
    from tether.console import escape_unprintable
    return escape_unprintable(text, keep)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
