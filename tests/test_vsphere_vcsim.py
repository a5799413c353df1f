"""`tether vsphere` against vcsim, govmomi's vSphere API simulator (tests/vcsim).

The tool runs as a command, as a user runs it. vcsim runs no guest, so `GuestStandIn`
plays the agent's side through the same API: it reads its config from guestinfo, writes
`started`, the exit status and the session output log (the COM3 file, iolog framing) as
the agent would, and powers the VM off. Every check reads vSphere's state through a
separate plain pyVmomi session: the devices, the extraConfig byte for byte, the event log
(each create, reconfigure, power transition and removal the tool caused), the datastore.
"""
from __future__ import annotations

import json
import re
import secrets
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from extraconfig.transport import GuestSource, parse_vmx
from helpers import missing
from tether import iolog
from vcsim import harness

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.json"))
TOOL_TIMEOUT = 180
WAIT = 60.0
VMX_OPTIONS = {   # what VIC's port layer set beside the config (lib/spec/spec.go), as we keep it
    "answer.msg.serial.file.open": "Append",
    "answer.msg.disk.duplicateUUID": "Yes",
    "disk.EnableUUID": "true",
    "serial0.hardwareFlowControl": "TRUE",
    "tools.remindInstall": "FALSE",
    "tools.upgrade.policy": "manual",
}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def vcsim(tmp_path_factory):
    reason = harness.missing()
    if reason:
        missing("vcsim", reason)
    sim = harness.Vcsim(harness.build(), tmp_path_factory.mktemp("vcsim"))
    try:
        yield sim
    finally:
        sim.stop()


class Api:
    """A plain pyVmomi session of the test's own, to look at what the tool did."""

    def __init__(self, sim):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.si = SmartConnect(host=sim.host, port=int(sim.port), user=harness.USER,
                               pwd=harness.PASSWORD, sslContext=context)
        self.content = self.si.RetrieveContent()
        self.dc = self.content.rootFolder.childEntity[0]
        self.datastore = self.dc.datastore[0]
        self.root = Path(self.datastore.info.url)   # vcsim keeps a datastore in a local dir

    def vms(self) -> list:
        view = self.content.viewManager.CreateContainerView(self.dc.vmFolder,
                                                            [vim.VirtualMachine], True)
        try:
            return list(view.view)
        finally:
            view.DestroyView()

    def vm_named(self, name: str):
        return next((vm for vm in self.vms() if vm.name == name), None)

    def wait_for_vm(self, prefix: str, old=(), timeout: float = WAIT):
        """The VM the tool created (name prefix, tether's annotation, not in `old`), once
        powered on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for vm in self.vms():
                if vm.name.startswith(prefix) and vm.name not in old and (
                        vm.config.annotation or "").startswith(
                        "tether-vsphere:") and vm.runtime.powerState == "poweredOn":
                    return vm
            time.sleep(0.2)
        raise AssertionError(f"no powered-on VM {prefix}* within {timeout:g} s")

    def extra(self, vm) -> dict[str, str]:
        """extraConfig as stored, the last of repeated keys winning (vcsim appends)."""
        return {o.key: o.value for o in vm.config.extraConfig}

    def events(self, vm) -> list:
        spec = vim.event.EventFilterSpec(maxCount=1000, entity=vim.event.EventFilterSpec.ByEntity(
            entity=vm, recursion="self"))
        return sorted(self.content.eventManager.QueryEvents(spec), key=lambda e: e.key)

    def event_names(self, vm) -> list[str]:
        return [type(e).__name__.rsplit(".", 1)[-1] for e in self.events(vm)]

    def local(self, datastore_path: str) -> Path:
        name, rest = datastore_path[1:].split("]", 1)
        assert name == self.datastore.name
        return self.root / rest.strip()

    def wait(self, task) -> None:
        """A task's end. Only info.state and info.error are read: a whole TaskInfo may name
        an entity pyVmomi's types reject (vcsim's disk and file tasks name their manager)."""
        from pyVmomi import vmodl
        collector = self.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(
                type=vim.Task, pathSet=["info.state", "info.error"])])
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            props = {p.name: p.val for p in collector.RetrieveContents([spec])[0].propSet}
            if props["info.state"] == "success":
                return
            assert props["info.state"] != "error", props.get("info.error")
            time.sleep(0.05)
        raise AssertionError("task did not finish")

    def destroy(self, vm) -> None:
        if vm.runtime.powerState == "poweredOn":
            self.wait(vm.PowerOffVM_Task())
        self.wait(vm.Destroy_Task())

    def close(self) -> None:
        Disconnect(self.si)


@pytest.fixture(scope="session")
def api(vcsim):
    session = Api(vcsim)
    yield session
    session.close()


@pytest.fixture
def image(tmp_path):
    """A bootstrap.iso stand-in: vcsim never boots it, so any bytes do; fresh per test, so
    an upload is visible by its hash."""
    directory = tmp_path / "image"
    directory.mkdir()
    (directory / "bootstrap.iso").write_bytes(b"CD001 tether test " + secrets.token_bytes(4096))
    return directory


@pytest.fixture
def cleanup(api):
    """VMs a test keeps: removed at the end whatever happens."""
    names: list[str] = []
    yield names
    for name in names:
        vm = api.vm_named(name)
        if vm is not None:
            api.destroy(vm)


def tool_argv(vcsim, *args, url=None, insecure=True) -> list[str]:
    argv = [sys.executable, "-m", "tether", "vsphere", *args, "--url", url or vcsim.url_with()]
    return argv + (["--insecure"] if insecure else [])


def tool(vcsim, *args, url=None, insecure=True, timeout=TOOL_TIMEOUT):
    return subprocess.run(tool_argv(vcsim, *args, url=url, insecure=insecure), cwd=REPO,
                          capture_output=True, timeout=timeout)


def start_tool(vcsim, *args):
    return subprocess.Popen(tool_argv(vcsim, *args), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(process, timeout=TOOL_TIMEOUT):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the tool did not finish: {err.decode()}")
    return process.returncode, out, err.decode()


# --------------------------------------------------------------------------- the guest

class GuestStandIn:
    """The agent's side of a container VM, through the API (vcsim boots nothing).

    Guestinfo goes through the agent's own reader and writer (extraconfig's GuestSource,
    tether's WriteBack) over a transport that is the VM's extraConfig: a read is what the
    guest's `info-get` would return, a write is a reconfigure of that key, which is what
    an `info-set` from the guest amounts to. The output log is written into the COM3
    file on the datastore, where the VMX would put what the guest writes to ttyS2.
    """

    def __init__(self, api: Api, vm):
        self.api = api
        self.vm = vm
        self.writes: list[tuple[str, str]] = []

    # the transport
    def info_get(self, key: str) -> str | None:
        return self.api.extra(self.vm).get(key)

    def info_set(self, key: str, value: str) -> None:
        self.writes.append((key, value))
        self._reconfigure({key: value})

    def _reconfigure(self, values: dict[str, str]) -> None:
        spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=k, value=v)
                                              for k, v in values.items()])
        self.api.wait(self.vm.ReconfigVM_Task(spec))

    # what the agent does
    def config(self):
        from extraconfig import decode
        from tether.config import ExecutorConfig
        return decode(GuestSource(self), ExecutorConfig)

    def tools_running(self) -> None:
        """The agent's toolbox registered: the VMX reports tools running (vcsim's SET. key)."""
        self._reconfigure({"SET.guest.toolsRunningStatus": "guestToolsRunning"})

    def publish(self, config, session_id: str) -> None:
        from tether.writeback import WriteBack
        writeback = WriteBack(self)
        writeback.session(config, config.sessions[session_id])
        assert writeback.failures == 0

    def start(self, started: str = "true"):
        config = self.config()
        primary = config.sessions[config.id]
        primary.started = started
        primary.detail.start_time = int(time.time())
        self.publish(config, config.id)
        return config

    def exit(self, config, status: int) -> None:
        primary = config.sessions[config.id]
        primary.exit_status = status
        primary.detail.stop_time = int(time.time())
        self.publish(config, config.id)

    def write_output(self, *entries: tuple[str | None, int, bytes]) -> None:
        path = self.com3()
        blob = b"".join(iolog.encode_entry(data, stream, session=session)
                        for session, stream, data in entries)
        with open(path, "ab") as f:
            f.write(blob)

    def com3(self) -> Path:
        ports = [d for d in self.vm.config.hardware.device
                 if isinstance(d, vim.vm.device.VirtualSerialPort)]
        return self.api.local(ports[2].backing.fileName)

    def power_off(self) -> None:
        self.api.wait(self.vm.PowerOffVM_Task())


def play(api, prefix, script):
    """Run `script(guest)` on a thread once the tool's VM is powered on; `.result()` joins."""
    box: dict = {}
    old = {vm.name for vm in api.vms()}

    def body():
        try:
            vm = api.wait_for_vm(prefix, old)
            box["vm"] = vm
            box["name"] = vm.name
            box["extra"] = api.extra(vm)
            box["devices"] = list(vm.config.hardware.device)
            box["annotation"] = vm.config.annotation
            script(GuestStandIn(api, vm))
        except BaseException as err:   # noqa: BLE001 - re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def result():
        thread.join(WAIT * 2)
        if "error" in box:
            raise box["error"]
        return box
    return result


def encoded(path: Path) -> dict[str, str]:
    """`tether config encode FILE` as the extraConfig values it stands for."""
    run = subprocess.run([sys.executable, "-m", "tether", "config", "encode", str(path)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return parse_vmx(run.stdout)


def vmx_lines(text: str) -> dict[str, str]:
    return parse_vmx("\n".join(line for line in text.splitlines() if " = \"" in line))


def iso_files(api) -> list[str]:
    directory = api.root / "tether"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def iso_name(image: Path) -> str:
    import hashlib
    return "bootstrap-" + hashlib.sha256((image / "bootstrap.iso").read_bytes()).hexdigest()[:16] + ".iso"


# --------------------------------------------------------------------------- run

def test_run_hello_creates_waits_reports_and_removes(vcsim, api, image):
    def guest(g: GuestStandIn):
        config = g.start()
        g.write_output((None, iolog.STDOUT, b"hello\n"))
        g.exit(config, 0)
        g.power_off()

    seen = play(api, "hello-", guest)
    code, out, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image",
                                       str(image), "--timeout", "60"))
    box = seen()
    assert code == 0, err
    name, vm = box["name"], box["vm"]

    # the primary's output (from the COM3 file), then the final guestinfo as VMX lines
    assert out.startswith(b"hello\n"), out[:200]
    final = vmx_lines(out.decode())
    assert final["guestinfo.vice..sessions|hello.started"] == "true"
    assert final["guestinfo.vice..sessions|hello.status"] == "0"
    assert "govcsim" not in final and "tools.upgrade.policy" not in final   # VMX's own keys
    assert f"created VM {name}" in err and f"removed VM {name}" in err

    # what vSphere saw, in order: created, on, the guest's writes, off (by the guest), removed
    events = [e for e in api.event_names(vm) if e != "VmReconfiguredEvent"]
    assert events == ["VmBeingCreatedEvent", "VmInstanceUuidAssignedEvent",
                      "VmUuidAssignedEvent", "VmCreatedEvent", "VmStartingEvent",
                      "VmPoweredOnEvent", "VmStoppingEvent", "VmPoweredOffEvent",
                      "VmRemovedEvent"]
    assert api.vm_named(name) is None
    assert not (api.root / name).exists(), "the VM's directory (logs) is left behind"

    # the extraConfig it was created with: `tether config encode`, byte for byte, + VMX options
    assert box["extra"] == {"govcsim": "TRUE", **VMX_OPTIONS, **encoded(REPO / "examples/hello.json")}
    assert box["annotation"].startswith("tether-vsphere:")
    assert iso_files(api).count(iso_name(image)) == 1


@pytest.mark.parametrize("status", [3, 255])
def test_run_exits_with_the_primary_status(vcsim, api, image, status):
    def guest(g):
        config = g.start()
        g.exit(config, status)
        g.power_off()

    seen = play(api, "hello-", guest)
    code, out, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(image)))
    seen()
    assert code == status, err
    assert vmx_lines(out.decode())["guestinfo.vice..sessions|hello.status"] == str(status)


def test_run_out_writes_the_final_map_as_vmx_lines(vcsim, api, image, tmp_path):
    """--out FILE: the same form as `tether vm --out` and `tether sandbox --out`."""
    def guest(g):
        config = g.start()
        g.write_output((None, iolog.STDOUT, b"hello\n"))
        g.exit(config, 3)
        g.power_off()

    seen = play(api, "hello-", guest)
    out_file = tmp_path / "final.vmx"
    code, out, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image",
                                       str(image), "--out", str(out_file)))
    seen()
    assert code == 3, err
    assert out == b"hello\n"          # the primary's output; the map went to the file
    final = parse_vmx(out_file.read_text())
    assert final["guestinfo.vice..sessions|hello.started"] == "true"
    assert final["guestinfo.vice..sessions|hello.status"] == "3"


def test_run_reports_a_primary_that_failed_to_start(vcsim, api, image):
    def guest(g):
        g.start("fork/exec /bin/echo: no such file or directory")
        g.power_off()

    seen = play(api, "hello-", guest)
    code, out, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(image)))
    seen()
    assert code == 127, err
    assert "the primary did not start: fork/exec /bin/echo" in err


def test_run_timeout_powers_off_and_removes(vcsim, api, image):
    """No guest answers: at --timeout the tool powers the VM off itself, then removes it."""
    seen = play(api, "hello-", lambda g: None)
    code, out, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(image),
                                       "--timeout", "3"))
    box = seen()
    assert code == 124, err
    assert "the primary did not start within 3 s" in err
    events = [e for e in api.event_names(box["vm"]) if e != "VmReconfiguredEvent"]
    assert events[-4:] == ["VmPoweredOnEvent", "VmStoppingEvent", "VmPoweredOffEvent",
                           "VmRemovedEvent"]
    assert api.vm_named(box["name"]) is None


def test_keep_then_ps_logs_rm(vcsim, api, image, cleanup, tmp_path):
    def guest(g):
        config = g.start()
        g.write_output((None, iolog.STDOUT, b"hello\n"), ("sidecar", iolog.STDERR, b"warn\n"))
        g.exit(config, 0)
        g.power_off()

    seen = play(api, "hello-", guest)
    code, out, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image",
                                       str(image), "--keep"))
    box = seen()
    name = box["name"]
    cleanup.append(name)
    assert code == 0, err
    assert f"kept VM {name}" in err
    assert api.vm_named(name).runtime.powerState == "poweredOff"

    listing = tool(vcsim, "ps")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.decode().splitlines()]
    assert rows[0] == ["NAME", "ID", "POWER", "STARTED", "STATUS"]
    assert [name, "hello", "poweredOff", "true", "0"] in rows
    assert not any(row[0].startswith("DC0_") for row in rows), "lists VMs it did not create"

    logs = tool(vcsim, "logs", name)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.decode().splitlines()
    assert re.fullmatch(r"\S+Z primary stdout hello", lines[0]), lines
    assert re.fullmatch(r"\S+Z sidecar stderr warn", lines[1]), lines
    raw = tool(vcsim, "logs", name, "--session", "primary", "--raw")
    assert raw.stdout == b"hello\n"
    saved = tmp_path / "output.log"
    assert tool(vcsim, "logs", name, "--save", str(saved)).returncode == 0
    reader = subprocess.run([sys.executable, "-m", "tether", "logs", str(saved)], cwd=REPO,
                            capture_output=True)
    assert reader.returncode == 0 and reader.stdout == logs.stdout

    removed = tool(vcsim, "rm", name)
    assert removed.returncode == 0, removed.stderr
    assert api.vm_named(name) is None
    assert name not in tool(vcsim, "ps").stdout.decode()


def test_iso_is_uploaded_once_per_content(vcsim, api, image, tmp_path):
    def guest(g):
        g.exit(g.start(), 0)
        g.power_off()

    for attempt in range(2):
        seen = play(api, "hello-", guest)
        code, _, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(image)))
        seen()
        assert code == 0, err
        assert ("uploading" in err) == (attempt == 0), err
    name = iso_name(image)
    assert (api.root / "tether" / name).read_bytes() == (image / "bootstrap.iso").read_bytes()
    assert not [f for f in iso_files(api) if f.endswith(".part")]

    other = tmp_path / "other"
    other.mkdir()
    (other / "bootstrap.iso").write_bytes(b"another image " + secrets.token_bytes(64))
    seen = play(api, "hello-", guest)
    code, _, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(other)))
    seen()
    assert code == 0 and "uploading" in err, err
    assert iso_name(other) in iso_files(api) and name in iso_files(api)

    # --iso: an ISO already on the datastore, no local image needed
    uploaded = f"[{api.datastore.name}] tether/{name}"
    seen = play(api, "hello-", guest)
    code, _, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--iso", uploaded,
                                     "--image", str(tmp_path / "nowhere")))
    box = seen()
    assert code == 0 and "uploading" not in err, err
    cdrom = next(d for d in box["devices"] if isinstance(d, vim.vm.device.VirtualCdrom))
    assert cdrom.backing.fileName == uploaded
    missing = tool(vcsim, "run", "examples/hello.json", "--iso", f"[{api.datastore.name}] tether/no.iso")
    assert missing.returncode == 1
    assert "no such file" in _one_line(missing.stderr.decode())


# --------------------------------------------------------------------------- the VM's layout

NETWORKED = {
    "common": {"id": "web", "name": "web"},
    "layer_id": "layer0",
    "sessions": {"web": {"cmd": {"path": "/bin/true", "args": ["/bin/true"]}}},
    "networks": {
        "public": {"network": {"type": "external", "default": True}},
        "backend": {"static": True, "ip": "10.1.0.2/24", "network": {"type": "bridge"}},
        "fixed": {"common": {"id": "1504"}, "network": {"type": "bridge"}},
    },
}


def test_devices_nics_disk_and_extraconfig(vcsim, api, image, cleanup, tmp_path):
    """Three endpoints on two kinds of network, a layer: the VM's devices are VIC's layout."""
    config_path = tmp_path / "web.json"
    config_path.write_text(json.dumps(NETWORKED))
    api.content.fileManager.MakeDirectory(name=f"[{api.datastore.name}] tether/images/layer0",
                                          datacenter=api.dc, createParentDirectories=True)
    task = api.content.virtualDiskManager.CreateVirtualDisk_Task(
        name=f"[{api.datastore.name}] tether/images/layer0/layer0.vmdk", datacenter=api.dc,
        spec=vim.VirtualDiskManager.FileBackedVirtualDiskSpec(
            diskType="thin", adapterType="lsiLogic", capacityKb=65536))
    api.wait(task)

    seen = play(api, "web-", lambda g: g.start())
    code, out, err = finish(start_tool(
        vcsim, "run", str(config_path), "--image", str(image), "--detach",
        "--network", "public=VM Network", "--network", "DC0_DVPG0"))
    box = seen()
    cleanup.append(box["name"])
    assert code == 0, err
    assert "(running)" in err
    name, vm, devices = box["name"], box["vm"], box["devices"]
    assert vm.runtime.powerState == "poweredOn"

    cdroms = [d for d in devices if isinstance(d, vim.vm.device.VirtualCdrom)]
    assert len(cdroms) == 1
    assert cdroms[0].backing.fileName == f"[{api.datastore.name}] tether/{iso_name(image)}"
    assert cdroms[0].connectable.startConnected
    ide = next(d for d in devices if d.key == cdroms[0].controllerKey)
    assert isinstance(ide, vim.vm.device.VirtualIDEController)
    assert vm.config.bootOptions.bootOrder[0].__class__.__name__.endswith("BootableCdromDevice")

    serial = [d for d in devices if isinstance(d, vim.vm.device.VirtualSerialPort)]
    assert len(serial) == 3
    assert isinstance(serial[0].backing, vim.vm.device.VirtualSerialPort.URIBackingInfo)
    assert serial[0].backing.direction == "client"
    assert not serial[0].connectable.startConnected       # no --attach-uri: left unconnected
    assert [s.backing.fileName for s in serial[1:]] == [
        f"[{api.datastore.name}] {name}/tether.debug", f"[{api.datastore.name}] {name}/output.log"]
    assert all(s.connectable.startConnected and s.yieldOnPoll for s in serial[1:])

    nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [type(n).__name__.rsplit(".", 1)[-1] for n in nics] == ["VirtualVmxnet3"] * 3
    assert [n.deviceInfo.label for n in nics] == ["backend", "public", "fixed"]   # slot order
    assert [n.slotInfo.pciSlotNumber for n in nics] == [1184, 1216, 1504]
    assert isinstance(nics[0].backing,
                      vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo)
    dvpg = next(n for n in api.dc.network if n.name == "DC0_DVPG0")
    assert nics[0].backing.port.portgroupKey == dvpg.key
    assert nics[0].backing.port.switchUuid == dvpg.config.distributedVirtualSwitch.uuid
    assert isinstance(nics[1].backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo)
    assert nics[1].backing.deviceName == "VM Network"
    assert nics[2].backing.port.portgroupKey == dvpg.key

    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    assert len(disks) == 1
    disk = disks[0]
    assert disk.backing.fileName == f"[{api.datastore.name}] {name}/containerfs.vmdk"
    assert disk.backing.parent.fileName == f"[{api.datastore.name}] tether/images/layer0/layer0.vmdk"
    assert disk.backing.thinProvisioned and disk.backing.diskMode == "persistent"
    controller = next(d for d in devices if d.key == disk.controllerKey)
    assert isinstance(controller, vim.vm.device.ParaVirtualSCSIController)

    # extraConfig: `tether config encode` of the same config with the endpoint IDs the port
    # layer assigned (the slots), byte for byte; nothing else but the VMX options
    assigned = json.loads(json.dumps(NETWORKED))
    assigned["networks"]["backend"]["common"] = {"id": "1184"}
    assigned["networks"]["public"]["common"] = {"id": "1216"}
    assigned_path = tmp_path / "assigned.json"
    assigned_path.write_text(json.dumps(assigned))
    assert box["extra"] == {"govcsim": "TRUE", **VMX_OPTIONS, **encoded(assigned_path)}
    plain = encoded(config_path)
    assert {k for k in plain if box["extra"][k] != plain[k]} == {
        "guestinfo.vice./networks|backend/Common/id", "guestinfo.vice./networks|public/Common/id"}


def test_attach_uri_connects_com1_and_host_places_the_vm(vcsim, api, image, cleanup):
    seen = play(api, "hello-", lambda g: g.start())
    code, _, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(image),
                                     "--detach", "--attach-uri", "tcp://192.0.2.10:2377",
                                     "--host", "DC0_C0_H1"))
    box = seen()
    cleanup.append(box["name"])
    assert code == 0, err
    vm = box["vm"]
    assert vm.runtime.host.name == "DC0_C0_H1"
    assert vm.resourcePool == vm.runtime.host.parent.resourcePool
    com1 = [d for d in box["devices"] if isinstance(d, vim.vm.device.VirtualSerialPort)][0]
    assert com1.backing.serviceURI == "tcp://192.0.2.10:2377"
    assert com1.backing.direction == "client"
    assert com1.connectable.startConnected


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_extraconfig_equals_config_encode(vcsim, api, image, example, cleanup, tmp_path):
    """Every example config: the keys written are `tether config encode`'s, key for key
    (endpoint IDs: the slots the port layer gave them), and no secret key among them."""
    config = json.loads(example.read_text())
    networks = []
    for endpoint in sorted(config.get("networks") or {}):
        networks += ["--network", f"{endpoint}=VM Network"]
    prefix = (config.get("common", {}).get("name") or config["common"]["id"]) + "-"
    seen = play(api, prefix, lambda g: g.start())
    code, _, err = finish(start_tool(vcsim, "run", str(example), "--image", str(image),
                                     "--detach", *networks))
    box = seen()
    cleanup.append(box["name"])
    assert code == 0, err
    for slot, endpoint in zip(range(1184, 2048, 32), sorted(config.get("networks") or {})):
        config["networks"][endpoint].setdefault("common", {})["id"] = str(slot)
    assigned = tmp_path / example.name
    assigned.write_text(json.dumps(config))
    expected = encoded(assigned)
    written = {k: v for k, v in box["extra"].items() if k not in VMX_OPTIONS and k != "govcsim"}
    assert written == expected
    assert "guestinfo.ovfEnv" not in written and not any("@secret" in k for k in written)
    if not config.get("networks"):
        assert expected == encoded(example)


# --------------------------------------------------------------------------- failures

def _nothing_behind(api, before, image):
    assert sorted(vm.name for vm in api.vms()) == before
    assert iso_name(image) not in iso_files(api)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_network_fails_before_creating_anything(vcsim, api, image):
    before = sorted(vm.name for vm in api.vms())
    run = tool(vcsim, "run", "examples/dhcp-network.json", "--image", str(image))
    assert run.returncode == 1
    line = _one_line(run.stderr.decode())
    assert "network 'external'" in line and "not found" in line, line
    _nothing_behind(api, before, image)


def test_missing_mapped_network_is_named(vcsim, api, image):
    before = sorted(vm.name for vm in api.vms())
    run = tool(vcsim, "run", "examples/dhcp-network.json", "--image", str(image),
               "--network", "external=no-such-net")
    assert run.returncode == 1
    assert "network 'no-such-net' (for endpoint 'external')" in _one_line(run.stderr.decode())
    _nothing_behind(api, before, image)


@pytest.mark.parametrize("option,message", [
    ("--datastore", "datastore 'nope' not found in datacenter DC0 (there: LocalDS_0)"),
    ("--host", "host 'nope' not found in datacenter DC0"),
    ("--resource-pool", "resource pool 'nope' not found"),
    ("--folder", "VM folder 'nope' not found"),
    ("--datacenter", "datacenter 'nope' not found (there: DC0)"),
    ("--iso", "'nope' is not a datastore path"),
])
def test_missing_datastore_and_other_names(vcsim, api, image, option, message):
    before = sorted(vm.name for vm in api.vms())
    run = tool(vcsim, "run", "examples/hello.json", "--image", str(image), option, "nope")
    assert run.returncode == 1
    assert message in _one_line(run.stderr.decode())
    _nothing_behind(api, before, image)


def test_bad_credentials(vcsim, api, image):
    before = sorted(vm.name for vm in api.vms())
    run = tool(vcsim, "run", "examples/hello.json", "--image", str(image),
               url=vcsim.url_with(password="wrong"))
    assert run.returncode == 1
    line = _one_line(run.stderr.decode())
    assert "login as 'tether' failed: incorrect user name or password" in line, line
    assert "wrong" not in line
    _nothing_behind(api, before, image)


def test_unreachable_url(vcsim, api, image):
    import socket
    with socket.socket() as probe:          # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = sorted(vm.name for vm in api.vms())
    run = tool(vcsim, "run", "examples/hello.json", "--image", str(image),
               url=f"https://tether:x@127.0.0.1:{port}/sdk")
    assert run.returncode == 1
    line = _one_line(run.stderr.decode())
    assert f"cannot reach https://127.0.0.1:{port}/sdk" in line, line
    _nothing_behind(api, before, image)


def test_untrusted_certificate_needs_insecure(vcsim, api, image):
    run = tool(vcsim, "ps", insecure=False)
    assert run.returncode == 1
    line = _one_line(run.stderr.decode())
    assert "certificate is not trusted" in line and "--insecure" in line, line


def test_missing_image_disk(vcsim, api, image, tmp_path):
    config = dict(NETWORKED, networks=None, layer_id="no-such-layer")
    path = tmp_path / "layer.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    before = sorted(vm.name for vm in api.vms())
    run = tool(vcsim, "run", str(path), "--image", str(image))
    assert run.returncode == 1
    line = _one_line(run.stderr.decode())
    assert "tether/images/no-such-layer/no-such-layer.vmdk not found" in line, line
    _nothing_behind(api, before, image)


# --------------------------------------------------------------------------- stop and rm

def _running(vcsim, api, image, cleanup, tools_running: bool):
    def guest(g):
        g.start()
        if tools_running:
            g.tools_running()
    seen = play(api, "hello-", guest)
    code, _, err = finish(start_tool(vcsim, "run", "examples/hello.json", "--image", str(image),
                                     "--detach"))
    box = seen()
    cleanup.append(box["name"])
    assert code == 0, err
    return box["name"], box["vm"]


def test_stop_powers_off_when_the_guest_cannot_be_asked(vcsim, api, image, cleanup):
    name, vm = _running(vcsim, api, image, cleanup, tools_running=False)
    run = tool(vcsim, "stop", name)
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().strip() == f"{name}: powered off (guest halt unavailable)"
    assert "ToolsUnavailable" in run.stderr.decode()
    assert vm.runtime.powerState == "poweredOff"


def test_stop_asks_the_guest_then_powers_off_after_the_timeout(vcsim, api, image, cleanup):
    name, vm = _running(vcsim, api, image, cleanup, tools_running=True)
    run = tool(vcsim, "stop", name, "--timeout", "1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().strip() == f"{name}: powered off after the timeout"
    events = [e for e in api.event_names(vm) if e != "VmReconfiguredEvent"]
    assert events[-3:] == ["VmGuestShutdownEvent", "VmStoppingEvent", "VmPoweredOffEvent"]
    assert vm.runtime.powerState == "poweredOff"


def test_stop_returns_when_the_guest_halts(vcsim, api, image, cleanup):
    name, vm = _running(vcsim, api, image, cleanup, tools_running=True)
    guest = GuestStandIn(api, vm)

    def agent():      # answers OS_Halt: the primary gets its stop signal, exits, power off
        deadline = time.monotonic() + WAIT
        while "VmGuestShutdownEvent" not in api.event_names(vm):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        config = guest.config()
        guest.exit(config, 143)
        guest.power_off()

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    run = tool(vcsim, "stop", name, "--timeout", "60")
    thread.join(WAIT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().strip() == f"{name}: halted by the guest"
    listing = tool(vcsim, "ps").stdout.decode()
    assert [name, "hello", "poweredOff", "true", "143"] in [l.split() for l in listing.splitlines()]


def test_rm_refuses_a_running_vm_without_force(vcsim, api, image, cleanup):
    name, vm = _running(vcsim, api, image, cleanup, tools_running=False)
    run = tool(vcsim, "rm", name)
    assert run.returncode == 1
    assert "is running" in _one_line(run.stderr.decode())
    assert api.vm_named(name) is not None
    run = tool(vcsim, "rm", "--force", name)
    assert run.returncode == 0, run.stderr
    assert api.vm_named(name) is None
    assert not (api.root / name).exists()


def test_leaves_vms_it_did_not_create_alone(vcsim, api):
    other = next(vm.name for vm in api.vms() if vm.name.startswith("DC0_"))
    for command in (["rm", "--force", other], ["stop", other], ["logs", other]):
        run = tool(vcsim, *command)
        assert run.returncode == 1
        assert "was not created by tether vsphere" in _one_line(run.stderr.decode())
    assert api.vm_named(other) is not None
