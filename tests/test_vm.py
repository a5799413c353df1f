"""End to end: the real bootstrap ISO booted under QEMU (TCG), driven by `tether vm`'s code.

The image is built once per run by the `image_dir` fixture (`init/build`, cached under
/var/cache/tether).
Each test boots its own VM in its own temporary directory; network tests create their
own namespace, bridge, tap and dnsmasq with unique names and tear them down always.
Marker `vm`; needs root, QEMU and the image build tools (scripts/install-deps).
"""
from __future__ import annotations

import io
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import REPO, require_tool
from tether.jsonform import config_from_json
from tether.vm import EXIT_NOT_STARTED, EXIT_TIMEOUT, VmRun, attach_primary

pytestmark = pytest.mark.vm
BOOT_TIMEOUT = 240.0     # TCG on a busy 2-core machine: generous, never asserted on


class Booted:
    """One VM run's result plus what its sessions wrote on the output port."""

    def __init__(self, result, output, run):
        self.result = result
        self.output = output        # list of (session or None, stream, bytes)
        self.run = run              # the VmRun, closed (its plan: template, workdir)
        self.nics = list(run.nics)  # the NICs the launcher gave QEMU (slot, MAC)
        self.map = result.guestinfo

    def text(self, session: str | None = None) -> str:
        return b"".join(d for s, _, d in self.output if s == session).decode(errors="replace")

    def session_key(self, session: str, field: str) -> str:
        return self.map.get(f"guestinfo.vice..sessions|{session}.{field}")

    def explain(self) -> str:
        return (f"exit {self.result.exit_code}, qemu {self.result.qemu_status}, "
                f"{self.result.message}\n--- console ---\n{self.result.console[-6000:]}")


def boot(image_dir: Path, config_json: dict, timeout: float = BOOT_TIMEOUT, attach=None,
         **kwargs) -> Booted:
    config = config_from_json(config_json)
    output = []
    lock = threading.Lock()

    def on_output(entry):
        with lock:
            output.append((entry.session, entry.stream, entry.data))

    run = VmRun(config, str(image_dir), on_output=on_output, **kwargs)
    try:
        deadline = time.monotonic() + timeout
        run.start()
        if attach is not None:
            attach(run, deadline)
        result = run.finish(deadline - time.monotonic())
    finally:
        run.close()
    return Booted(result, output, run)


def session(path, *args, **extra):
    cmd = {"path": path, "args": [path, *args], "env": ["PATH=/usr/bin:/bin:/usr/sbin:/sbin"],
           "dir": "/"}
    return {"cmd": cmd, **extra}


def ip_of(ip: bytes):
    """A Go net.IP (4 bytes, or 16 with an IPv4 inside) as an ipaddress object."""
    ip = bytes(ip)
    if len(ip) == 16 and ip[:12] == b"\0" * 10 + b"\xff\xff":
        ip = ip[12:]
    return ipaddress.ip_address(ip)


def single(sid: str, sess: dict, **more) -> dict:
    return {"common": {"id": sid, "name": sid}, "sessions": {sid: sess}, **more}


# ------------------------------------------------------------------------ the acceptance list

def test_hello_world_in_the_busybox_container(image_dir):
    vm = boot(image_dir, single("hello", session("/bin/echo", "hello", "world")))
    assert vm.result.exit_code == 0, vm.explain()
    assert vm.session_key("hello", "started") == "true"
    assert vm.session_key("hello", "status") == "0"
    assert vm.text() == "hello world\n"
    # the container is busybox only: the agent's Python is not in there
    assert vm.result.qemu_status == 0


def test_stage0_raises_the_root_disks_readahead(image_dir):
    """Stage 0 sets the root disk's readahead to 4 MiB (fewer virtio requests while
    Python faults itself in); the container disk keeps the kernel's default."""
    script = ("cat /sys/bus/pci/devices/0000:00:02.0/virtio*/block/*/queue/read_ahead_kb "
              "/sys/bus/pci/devices/0000:00:10.0/virtio*/block/*/queue/read_ahead_kb")
    vm = boot(image_dir, single("ra", session("/bin/sh", "-c", script)))
    assert vm.result.exit_code == 0, vm.explain()
    root, container = vm.text().split()
    assert root == "4096" and container != "4096", vm.text()


def test_container_has_no_python_and_runs_chrooted(image_dir):
    vm = boot(image_dir, single("probe", session(
        "/bin/sh", "-c", "ls /usr/bin/python3 2>&1; readlink /bin/ls; exit 3")))
    assert vm.result.exit_code == 3, vm.explain()
    assert "No such file" in vm.text() and "/bin/busybox" in vm.text()


def test_missing_binary_reports_started_error_and_powers_off(image_dir):
    vm = boot(image_dir, single("nobin", session("/bin/no-such-binary")))
    started = vm.session_key("nobin", "started")
    assert started and started != "true", vm.explain()
    assert "no-such-binary" in started or "not found" in started.lower() or "no such" in started.lower()
    assert vm.result.exit_code == EXIT_NOT_STARTED
    assert vm.result.qemu_status == 0, vm.explain()   # powered off by itself, not killed


def test_two_sessions_one_restarting(image_dir):
    config = {
        "common": {"id": "main", "name": "two"},
        "sessions": {
            "main": session("/bin/sh", "-c", "sleep 6; echo main done"),
            "flaky": session("/bin/sh", "-c", "echo flaky run; exit 2", restart=True),
        },
    }
    vm = boot(image_dir, config)
    assert vm.result.exit_code == 0, vm.explain()
    assert vm.session_key("main", "started") == "true"
    assert vm.session_key("flaky", "started") == "true"
    assert int(vm.session_key("flaky", "diagnostics.resurrections") or 0) >= 1, vm.explain()
    assert "main done" in vm.text()
    assert "flaky run" in vm.text("flaky")


def test_static_network_on_a_fixed_pci_slot(image_dir):
    # Two NICs whose names sort the other way round from their slots: each address must
    # land on the NIC at its endpoint's PCI address, whatever order the guest finds them.
    wanted = {"a": ("0000:00:08.0", "172.31.8.2/24"), "b": ("0000:00:07.0", "172.31.7.2/24")}
    networks = {name: {"common": {"id": pci}, "static": True, "ip": ip,
                       "network": {"type": "bridge"}} for name, (pci, ip) in wanted.items()}
    networks["b"]["network"].update(default=True, gateway="172.31.7.1/24")
    config = single("net", session("/bin/sh", "-c",
                                   "ip -o addr show; ip -o link show; ip route"),
                    networks=networks)
    vm = boot(image_dir, config)
    assert vm.result.exit_code == 0, vm.explain()
    text = vm.text()
    assert "default via 172.31.7.1" in text, text
    for name, (_, ip) in wanted.items():
        assigned = vm.result.config.networks[name].assigned
        assert ip_of(assigned.ip) == ipaddress.ip_address(ip.split("/")[0]), assigned
    # The guest's links by MAC, and the addresses on each link.
    by_mac = {m.group(2): m.group(1) for m in re.finditer(
        r"^\d+: ([^:@\s]+)[:@].* link/ether ([0-9a-f:]{17}) ", text, re.M)}
    inet = {(m.group(1), m.group(2)) for m in re.finditer(
        r"^\d+: (\S+)\s+inet (\S+) ", text, re.M)}
    assert {nic.network for nic in vm.nics} == set(wanted)
    for nic in vm.nics:
        pci, ip = wanted[nic.network]
        assert nic.pci_address == pci and nic.mac.endswith(f":{nic.slot:02x}"), nic
        assert nic.mac in by_mac, f"no guest link with the MAC QEMU gave {pci}:\n{text}"
        assert (by_mac[nic.mac], ip) in inet, (nic, text)


@pytest.fixture
def dhcp_netns():
    """A private namespace with a bridge, a tap for QEMU and dnsmasq serving DHCP on it."""
    require_tool("dnsmasq", "ip")
    suffix = uuid.uuid4().hex[:8]
    ns, subnet = f"tvm{suffix}", 10 + int(suffix[:2], 16) % 200
    net = f"10.{subnet}.{int(suffix[2:4], 16) % 250}"
    workdir = Path(f"/tmp/tether-vm-dhcp-{suffix}")
    workdir.mkdir()
    dnsmasq = None

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "addr", "add", f"{net}.1/24", "dev", "br0")
        ip("-n", ns, "link", "set", "br0", "up")
        ip("-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        ip("-n", ns, "link", "set", "tap0", "master", "br0")
        ip("-n", ns, "link", "set", "tap0", "up")
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", ns, "dnsmasq", "--conf-file=/dev/null", "--keep-in-foreground",
             "--port=0", "--interface=br0", "--bind-interfaces", "--except-interface=lo",
             f"--dhcp-range={net}.100,{net}.150,255.255.255.0,1h",
             f"--dhcp-option=option:router,{net}.1",
             f"--dhcp-leasefile={workdir}/leases", f"--pid-file={workdir}/dnsmasq.pid",
             "--log-dhcp", f"--log-facility={workdir}/dnsmasq.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield ns, net, workdir
    finally:
        if dnsmasq is not None:
            dnsmasq.terminate()
            try:
                dnsmasq.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dnsmasq.kill()
                dnsmasq.wait()
            # `ip netns exec` execs dnsmasq, so the PID is dnsmasq's own.
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def test_dhcp_from_dnsmasq_on_a_tap_in_a_test_namespace(image_dir, dhcp_netns):
    ns, net, workdir = dhcp_netns
    config = single("dhcp", session("/bin/sh", "-c", "ip -o addr show"),
                    networks={"external": {"network": {"type": "external", "default": True}}})
    vm = boot(image_dir, config, nets={"external": "tap:tap0"}, netns=ns)
    assert vm.result.exit_code == 0, vm.explain()
    assigned = ip_of(vm.result.config.networks["external"].assigned.ip)
    assert assigned in ipaddress.ip_network(f"{net}.0/24"), vm.explain()
    assert 100 <= int(str(assigned).rsplit(".", 1)[1]) <= 150     # from dnsmasq's range
    assert f"inet {assigned}/24" in vm.text(), vm.text() + vm.explain()
    # dnsmasq handed it out (the agent releases the lease at power-off, so read its log)
    dhcp_log = (workdir / "dnsmasq.log").read_text()
    assert f"DHCPACK(br0) {assigned} " in dhcp_log, dhcp_log


def test_label_volume_on_a_second_disk(image_dir, tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    (content / "marker").write_text("volume ok\n")
    disk = tmp_path / "data.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "data", "-d", str(content),
                    str(disk), "16M"], check=True, capture_output=True)
    config = single("vol", session("/bin/sh", "-c", "cat /data/marker; echo written > /data/out"),
                    mounts={"data": {"source": "label://data", "path": "/data", "mode": "rw"}})
    vm = boot(image_dir, config, disks=[str(disk)])
    assert vm.result.exit_code == 0, vm.explain()
    assert "volume ok" in vm.text(), vm.text() + vm.explain()
    # the write reached the disk image
    dump = subprocess.run(["debugfs", "-R", "cat /out", str(disk)], capture_output=True, text=True)
    assert dump.stdout.strip() == "written", dump.stderr


def test_attach_over_virtio_serial_to_a_runblock_session(image_dir):
    config = single("echoer", session("/bin/sh", "-c",
                                      'read line; echo "got: $line"; read second; echo "and: $second"',
                                      attach=True, open_stdin=True, run_block=True))
    stdin_r, stdin_w = os.pipe()
    out = io.BytesIO()
    codes = []

    def attach(run, deadline):
        os.write(stdin_w, b"ping\npong\n")
        os.close(stdin_w)
        with open(stdin_r, "rb", buffering=0) as stdin:
            codes.append(attach_primary(run, deadline, stdin=stdin, stdout=out))

    vm = boot(image_dir, config, attach=attach)
    assert vm.result.exit_code == 0, vm.explain()
    text = out.getvalue().decode(errors="replace")
    assert "got: ping" in text and "and: pong" in text, text + vm.explain()
    assert vm.session_key("echoer", "started") == "true"


def test_primary_exit_powers_off_with_its_status(image_dir):
    config = {
        "common": {"id": "main", "name": "off"},
        "sessions": {
            "main": session("/bin/sh", "-c", "sleep 2; exit 7"),
            "daemon": session("/bin/sleep", "1000"),
        },
    }
    vm = boot(image_dir, config)
    assert vm.result.qemu_status == 0, vm.explain()     # QEMU ended because the guest powered off
    assert vm.result.exit_code == 7, vm.explain()
    assert vm.session_key("main", "status") == "7"
    assert "power" in vm.result.console.lower()
    # the agent's modules came from the image's boot blob (tether/bootblob.py)
    assert re.search(r"code: \d+ modules from the boot blob", vm.result.console), vm.explain()


def test_several_vms_at_once(image_dir):
    results = {}

    def one(name):
        results[name] = boot(image_dir, single(name, session("/bin/echo", name)))

    threads = [threading.Thread(target=one, args=(f"vm{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, vm in results.items():
        assert vm.result.exit_code == 0, vm.explain()
        assert vm.text() == f"{name}\n"
    assert len({vm.result.workdir for vm in results.values()}) == 2


def test_hung_vm_is_killed_at_the_timeout_with_the_console(image_dir):
    vm = boot(image_dir, single("hang", session("/bin/sleep", "100000")), timeout=45)
    assert vm.result.qemu_status is None
    assert vm.result.exit_code == EXIT_TIMEOUT
    assert "timeout" in vm.result.message
    assert vm.result.console    # the serial log is there to show


def test_tether_vm_command_line(image_dir, tmp_path):
    """The command as a person runs it: output on stdout, the map in --out, the status."""
    import json
    config = tmp_path / "c.json"
    config.write_text(json.dumps(single("cli", session("/bin/sh", "-c", "echo from cli; exit 5"))))
    out = tmp_path / "map.vmx"
    proc = subprocess.run([sys.executable, "-m", "tether", "vm", str(config), "--image",
                           str(image_dir), "--out", str(out), "--timeout", str(BOOT_TIMEOUT)],
                          capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, cwd=REPO)
    assert proc.returncode == 5, proc.stderr
    assert "from cli" in proc.stdout
    from extraconfig.transport import parse_vmx
    final = parse_vmx(out.read_text())                 # VMX lines, as the sandbox's --out
    assert final["guestinfo.vice..sessions|cli.started"] == "true"
    assert final["guestinfo.vice..sessions|cli.status"] == "5"
    decoded = subprocess.run([sys.executable, "-m", "tether", "config", "decode", str(out)],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout)["sessions"]["cli"]["started"] == "true"


def test_debug_image_gives_a_shell_when_guestinfo_asks(image_dir):
    """bootstrap-debug.iso with guestinfo bootstrap-shell=true: a shell on the console
    first; when it exits, the agent runs the config as usual."""
    def type_into_shell(run, deadline):
        while "shell on the console" not in run.machine.console_text():
            assert time.monotonic() < deadline, run.machine.console_text()[-3000:]
            time.sleep(0.3)
        run.machine.send_console(b"echo shell-$((6*7)) > /dev/console; exit\n")

    vm = boot(image_dir, single("dbg", session("/bin/echo", "agent ran")), attach=type_into_shell,
              debug_image=True, extra_guestinfo={"guestinfo.bootstrap-shell": "true"})
    assert "shell-42" in vm.result.console, vm.explain()
    assert vm.result.exit_code == 0, vm.explain()
    assert vm.text() == "agent ran\n"


def test_debug_image_without_the_key_starts_the_agent(image_dir):
    vm = boot(image_dir, single("dbg2", session("/bin/echo", "straight")), debug_image=True)
    assert vm.result.exit_code == 0, vm.explain()
    assert "shell on the console" not in vm.result.console
    assert vm.text() == "straight\n"


def test_image_contents_and_size(image_dir, tmp_path):
    """The ISO carries the kernel, stage0 and both layers, under the 60 MB budget; the
    project layer holds the agent; the container image has busybox and no Python."""
    iso = image_dir / "bootstrap.iso"
    assert iso.stat().st_size < 60 * 1000 * 1000
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-find", "/", "-type", "f"],
                             capture_output=True, text=True, check=True).stdout
    for name in ("/boot/vmlinuz", "/boot/stage0", "/root.sqfs", "/tether.sqfs",
                 "/isolinux/isolinux.bin", "/isolinux/isolinux.cfg"):
        assert f"'{name}'" in listing, listing
    # the ISO's command line has the fast-boot arguments tether vm passes (FAST_BOOT_ARGS)
    from tether.vm import FAST_BOOT_ARGS
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract",
                    "/isolinux/isolinux.cfg", str(tmp_path / "isolinux.cfg")],
                   capture_output=True, check=True)
    cfg = (tmp_path / "isolinux.cfg").read_text()
    assert FAST_BOOT_ARGS in cfg, cfg
    layer = subprocess.run(["unsquashfs", "-l", str(image_dir / "tether.sqfs")],
                           capture_output=True, text=True, check=True).stdout
    assert "dist-packages/tether/agent.py" in layer
    assert "dist-packages/extraconfig/virtio.py" in layer
    root = subprocess.run(["unsquashfs", "-l", str(image_dir / "root.sqfs")],
                          capture_output=True, text=True, check=True).stdout
    assert "usr/bin/python3" in root and "dist-packages/pyroute2/" in root
    assert "usr/share/doc/" not in root.replace("usr/share/doc\n", "")
    files = subprocess.run(["debugfs", "-R", "ls -p /usr/bin", str(image_dir / "containerfs.img")],
                           capture_output=True, text=True, check=True).stdout
    assert "python" not in files
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(image_dir / "containerfs.img")],
                           capture_output=True, text=True).stdout.strip()
    assert label == "containerfs"


def cpio_names(data: bytes) -> list[str]:
    """The member names of (concatenated) newc cpio archives."""
    names, at = [], 0
    while (at := data.find(b"070701", at)) >= 0 and at + 110 <= len(data):
        size, name_size = int(data[at + 54:at + 62], 16), int(data[at + 94:at + 102], 16)
        name = data[at + 110:at + 110 + name_size - 1].decode(errors="replace")
        names.append(name)
        at = (((at + 110 + name_size + 3) & ~3) + size + 3) & ~3
    return names


def test_direct_boot_parts(image_dir):
    """What tether vm boots: stage 0 (static, with its module tables) and the project
    layer in one uncompressed initrd, the root as ext4, the kernel with its PVH entry."""
    initrd = (image_dir / "initrd.img").read_bytes()
    debug = (image_dir / "initrd-debug.img").read_bytes()
    for image in (initrd, debug):
        assert image[:6] == b"070701"                       # newc cpio, not compressed
        for name in (b"init", b"stage0/modules", b"stage0/aliases", b"stage0/cd",
                     b"virtio_blk.ko", b"overlay.ko", b"code/usr/local/sbin/tether-agent",
                     b"code/usr/local/lib/python3.11/dist-packages/tether/boottime.py"):
            assert name + b"\0" in image, name
        assert b"pci:v00001AF4d*" in image and b"virtio:d00000003v* virtio_console" in image
        # the modules carry no signature: verifying one hashes it all under TCG
        assert b"~Module signature appended~" not in image
    # the kernel unpacks every byte: the plain boot's has no shell and no CD stack
    plain, full = cpio_names(initrd), cpio_names(debug)
    for name in ("bin/busybox", "ata_piix.ko", "sr_mod.ko", "squashfs.ko"):
        assert not any(n.endswith(name) for n in plain), name
        assert any(n.endswith(name) for n in full), name
    root = image_dir / "root.ext4"
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(root)],
                           capture_output=True, text=True).stdout.strip()
    assert label == "tether-root"
    # 4 KiB blocks (not mke2fs's 1 KiB for a small filesystem), no metadata checksums
    header = subprocess.run(["dumpe2fs", "-h", str(root)], capture_output=True, text=True).stdout
    assert re.search(r"^Block size:\s+4096$", header, re.M), header
    assert "metadata_csum" not in header and "has_journal" not in header
    python = subprocess.run(["debugfs", "-R", "stat /usr/bin/python3.11", str(root)],
                            capture_output=True, text=True).stdout
    assert "Type: regular" in python
    vmlinux = image_dir / "vmlinux"
    if shutil.which("lz4") is not None:      # the build unpacks it only with lz4 (.ci/run)
        notes = subprocess.run(["readelf", "-n", str(vmlinux)], capture_output=True,
                               text=True, check=True).stdout
        assert "0x00000012" in notes                     # Xen's PHYS32_ENTRY: PVH


def test_attach_a_terminal_to_a_tty_session(image_dir, tmp_path):
    """`tether vm --attach` in a real terminal (tmux): a shell in the container, typed into."""
    import json
    require_tool("tmux")
    config = tmp_path / "term.json"
    config.write_text(json.dumps(single("term", session("/bin/sh", tty=True, attach=True,
                                                        open_stdin=True))))
    rc_file, out = tmp_path / "rc", tmp_path / "map.vmx"
    server = f"tvm{uuid.uuid4().hex[:8]}"
    command = (f"cd {REPO} && {sys.executable} -m tether vm {config} --image {image_dir} "
               f"--attach --out {out} --timeout {BOOT_TIMEOUT:g}; echo $? > {rc_file}")

    def tmux(*args):
        return subprocess.run(["tmux", "-L", server, *args], capture_output=True, text=True)

    def screen():
        return tmux("capture-pane", "-p", "-t", "vm").stdout

    def wait_for(predicate, what):
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not predicate():
            assert time.monotonic() < deadline, f"no {what} on the screen:\n{screen()}"
            time.sleep(0.5)

    try:
        assert tmux("new-session", "-d", "-s", "vm", "-x", "100", "-y", "30", command).returncode == 0
        wait_for(lambda: "/ #" in screen(), "shell prompt")
        tmux("send-keys", "-t", "vm", "echo $((6*7)); stty size", "Enter")
        wait_for(lambda: "\n42" in screen(), "command output")
        # the pane is 100 columns (its rows are 30 less tmux's status line)
        wait_for(lambda: re.search(r"\n(29|30) 100\b", screen()), "terminal size")
        tmux("send-keys", "-t", "vm", "exit", "Enter")
        wait_for(rc_file.exists, "exit status")
    finally:
        tmux("kill-server")
    assert rc_file.read_text().strip() == "0"
    from extraconfig.transport import parse_vmx
    assert parse_vmx(out.read_text())["guestinfo.vice..sessions|term.started"] == "true"


# ------------------------------------------------------------------------ boot paths, timeline

def test_boot_timeline_is_written_back_in_order_and_drawn(image_dir):
    """The agent writes its boot timeline once the primary has started; tether vm adds its
    own marks on the guest's clock; the chart has one bar per phase."""
    import xml.etree.ElementTree as ET
    from tether import bootchart
    vm = boot(image_dir, single("timed", session("/bin/sh", "-c", "sleep 3; echo timed")))
    assert vm.result.exit_code == 0, vm.explain()
    phases = bootchart.read_phases(vm.map)
    names = [p.name for p in phases]
    guest = [p for p in phases if not p.host]
    expected = ["kernel", "stage0.modules", "stage0.root", "stage0.exec", "python", "imports",
                "guestinfo", "agent", "config", "rootfs", "networks", "volumes", "exec:timed"]
    assert [p.name for p in guest if p.name in expected] == expected, names
    assert "attach" not in names    # the attach servers start after the primary's launch
    for before, after in zip(guest, guest[1:]):
        assert before.start <= before.end <= after.start + 1e-6, (before, after)
    assert guest[0].start == 0.0
    host = {p.name: p for p in phases if p.host}
    assert set(host) == {"host.qemu", "host.console", "host.guestinfo", "host.started"}, names
    assert host["host.qemu"].start < 0 == host["host.qemu"].end     # QEMU starts before the kernel
    # the host saw started=true after the guest's exec, and within a few tenths of a second
    exec_end = guest[-1].end
    assert exec_end <= host["host.started"].start + 0.05 < exec_end + 2, (exec_end, host)
    assert host["host.guestinfo"].start < exec_end
    # written once the primary started, not when it ended (it sleeps 3 s)
    clock = float(vm.map["guestinfo.tether.boot.clock"])
    assert exec_end <= clock < exec_end + 2, (exec_end, clock)
    root = ET.fromstring(bootchart.svg(phases))
    bars = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "bar"]
    assert len(bars) == len([p for p in phases if not p.point])


def test_iso_boots_hello_via_isolinux(image_dir):
    """bootstrap.iso as ESX boots it: isolinux loads the kernel and stage 0 from the CD,
    stage 0 loads the CD stack and loop-mounts root.sqfs and tether.sqfs (VIC's serial
    layout: its command line has console=ttyS1)."""
    import json
    from tether.jsonform import config_from_json
    from tether.vm import qemu_argv
    output = []
    run = VmRun(config_from_json(json.loads((REPO / "examples" / "hello.json").read_text())),
                str(image_dir), vic_serial=True, on_output=lambda e: output.append(e.data))
    try:
        argv = " ".join(qemu_argv(run.spec, run.machine.sockets | {"com1": "/c"}))
        assert "-kernel" not in argv and "-boot d" in argv and "bootstrap.iso" in argv
        run.start()
        result = run.finish(BOOT_TIMEOUT)
    finally:
        run.close()
    assert result.exit_code == 0, (result.message, result.console[-4000:])
    assert result.guestinfo["guestinfo.vice..sessions|hello.started"] == "true"
    assert b"".join(output) == b"hello\n"
    # stage 0 found its root on the CD: its steps are in the timeline
    assert "guestinfo.tether.boot.stage0.root" in result.guestinfo


def test_debug_iso_via_isolinux_starts_the_agent(image_dir):
    vm = boot(image_dir, single("dbgiso", session("/bin/echo", "from the debug iso")),
              debug_image=True, vic_serial=True)
    assert vm.result.exit_code == 0, vm.explain()
    assert "shell on the console" not in vm.result.console
    assert "tether-debug-init" in vm.result.console or vm.text() == "from the debug iso\n"
    assert vm.text() == "from the debug iso\n"
