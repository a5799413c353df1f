"""The virtio-serial guestinfo transport and the host's VMX side, without a VM.

The guest transport runs over a real socketpair against the launcher's own request
handler on a thread, so both ends of the wire format meet here; the VM tests
(test_vm.py) run the same code over a real virtio-serial port.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading

import pytest

from extraconfig import decode, encode
from extraconfig import virtio
from extraconfig.transport import GuestSink, GuestSource, MapTransport, parse_vmx, snapshot
from tether.config import ExecutorConfig
from tether.jsonform import config_from_json
from tether.vm import (CONTAINERFS_SLOT, Disk, MachineSpec, VmError, VmxGuestinfo,
                       assign_nics, backend_options, qemu_argv)


# ---------------------------------------------------------------- framing (sans-IO)

def test_frame_and_deframe_byte_by_byte():
    messages = ["info-get guestinfo.a", "info-set guestinfo.b two words\nand a newline", "1 ", "é ✓"]
    stream = b"".join(virtio.frame(m) for m in messages)
    deframer = virtio.Deframer()
    got = []
    for i in range(len(stream)):
        got += deframer.feed(stream[i:i + 1])
    assert got == messages
    assert deframer.pending == 0


def test_deframer_refuses_an_oversized_announcement():
    deframer = virtio.Deframer()
    with pytest.raises(virtio.FramingError, match="limit"):
        deframer.feed((virtio.MAX_MESSAGE + 1).to_bytes(4, "big"))
    with pytest.raises(virtio.FramingError):
        virtio.frame("x" * (virtio.MAX_MESSAGE + 1))


def test_requests_parse_like_the_vmx_splits_them():
    assert virtio.parse_request("info-get guestinfo.k") == ("info-get", "guestinfo.k", None)
    assert virtio.parse_request("info-set guestinfo.k a b  c") == ("info-set", "guestinfo.k", "a b  c")
    assert virtio.parse_request("info-set guestinfo.k ") == ("info-set", "guestinfo.k", "")
    for bad in ("info-get", "info-set guestinfo.k", "tools.capability.x", ""):
        with pytest.raises(ValueError):
            virtio.parse_request(bad)
    with pytest.raises(ValueError):
        virtio.info_get_request("key with space")


def test_answer_follows_the_vmx():
    store = {"guestinfo.present": "v a l", "hidden": "secret"}
    get, set_ = store.get, store.__setitem__
    assert virtio.answer("info-get guestinfo.present", get, set_) == "1 v a l"
    assert virtio.answer("info-get guestinfo.missing", get, set_) == "0 No value found"
    # Only guestinfo.* keys exist for the guest: no reading or writing anything else.
    assert virtio.answer("info-get hidden", get, set_).startswith("0 ")
    assert virtio.answer("info-set hidden x", get, set_).startswith("0 ")
    assert store["hidden"] == "secret"
    assert virtio.answer("info-set guestinfo.new x y", get, set_) == "1 "
    assert store["guestinfo.new"] == "x y"
    assert virtio.answer("bogus", get, set_) == "0 Unknown command"
    # info-dump is ours: a host that cannot list its keys answers as the VMX would
    assert virtio.answer("info-dump guestinfo.", get, set_) == "0 Unknown command"
    assert virtio.parse_reply("1 v") == (True, "v")
    assert virtio.parse_reply("0 No value found") == (False, "No value found")
    with pytest.raises(virtio.GuestinfoError):
        virtio.parse_reply("garbage")


def test_info_dump_answers_the_prefix_keys_as_vmx_lines():
    store = {"guestinfo.vice./a": 'x "q" |y\nz', "guestinfo.vice./b": "<nil>",
             "guestinfo.other": "o", "hidden": "secret"}
    get, set_ = store.get, store.__setitem__
    reply = virtio.answer("info-dump guestinfo.vice.", get, set_, store.items)
    ok, text = virtio.parse_reply(reply)
    assert ok and parse_vmx(text) == {"guestinfo.vice./a": 'x "q" |y\nz',
                                      "guestinfo.vice./b": "<nil>"}
    everything = parse_vmx(virtio.answer("info-dump guestinfo.", get, set_, store.items)[2:])
    assert "hidden" not in everything and len(everything) == 3
    # only guestinfo.* keys exist for the guest
    assert virtio.answer("info-dump hid", get, set_, store.items) == "0 Permission denied"
    # a dump that would not fit one message is refused; the guest then reads key by key
    store["guestinfo.big"] = "x" * virtio.MAX_MESSAGE
    assert virtio.answer("info-dump guestinfo.", get, set_, store.items).startswith(
        "0 Too large: ")


# ---------------------------------------------------------------- guest transport over a socket

class HostEnd:
    """The launcher's guestinfo handling on the far end of a socketpair, on a thread."""

    def __init__(self, sock: socket.socket, store: VmxGuestinfo, silent: bool = False,
                 dump: bool = True):
        self.sock, self.store, self.silent = sock, store, silent
        self.items = store.items if dump else None   # dump=False: a host without info-dump
        self.verbs: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        deframer = virtio.Deframer()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:     # the test closed its end
                return
            if not data:
                return
            for request in deframer.feed(data):
                self.verbs.append(request.partition(" ")[0])
                if not self.silent:
                    self.sock.sendall(virtio.frame(virtio.answer(
                        request, self.store.info_get, self.store.info_set, self.items)))


@pytest.fixture
def wire():
    guest_sock, host_sock = socket.socketpair()
    guest_fd = os.dup(guest_sock.fileno())
    guest_sock.close()
    transport = virtio.VirtioSerialTransport(guest_fd, timeout=10, path="socketpair")
    try:
        yield transport, host_sock
    finally:
        transport.close()
        host_sock.close()


def test_transport_get_set_roundtrip(wire):
    transport, host_sock = wire
    store = VmxGuestinfo({"guestinfo.a": "alpha beta", "guestinfo.empty": ""})
    HostEnd(host_sock, store)
    assert transport.info_get("guestinfo.a") == "alpha beta"
    assert transport.info_get("guestinfo.empty") == "<nil>"   # vmomi stores "" as <nil>
    assert transport.info_get("guestinfo.nothere") is None
    transport.info_set("guestinfo.out", "multi\nline value")
    assert store.final_map()["guestinfo.out"] == "multi\nline value"
    big = "x" * 200_000
    transport.info_set("guestinfo.big", big)
    assert transport.info_get("guestinfo.big") == big


def test_transport_refused_set_raises(wire):
    transport, host_sock = wire
    HostEnd(host_sock, VmxGuestinfo({}))
    with pytest.raises(virtio.GuestinfoError, match="refused"):
        transport.info_set("notguestinfo", "x")


def test_transport_times_out_with_an_actionable_error(wire):
    transport, host_sock = wire
    HostEnd(host_sock, VmxGuestinfo({}), silent=True)
    transport.timeout = 0.5
    with pytest.raises(virtio.GuestinfoError, match="tether vm"):
        transport.info_get("guestinfo.a")


def test_a_request_may_wait_longer_than_the_transport_or_without_a_limit(wire):
    """A host may hold a reply back on purpose (the resume answer of a VM template,
    tether/resume.py): `timeout=None` waits as long as it takes."""
    transport, host_sock = wire
    transport.timeout = 0.2
    store = VmxGuestinfo({"guestinfo.late": "at last"})
    requests = []

    def late_host():
        deframer = virtio.Deframer()
        while not requests:
            requests.extend(deframer.feed(host_sock.recv(65536)))
        import time
        time.sleep(1.0)    # five times the transport's own timeout
        host_sock.sendall(virtio.frame(virtio.answer(requests[0], store.info_get,
                                                     store.info_set)))
    host = threading.Thread(target=late_host, daemon=True)
    host.start()
    assert transport.info_get("guestinfo.late", timeout=None) == "at last"
    host.join()
    # a request's own limit is its own, and the error names it
    HostEnd(host_sock, store, silent=True)
    with pytest.raises(virtio.GuestinfoError, match="within 0.3 s"):
        transport.info_get("guestinfo.late", timeout=0.3)


def test_late_reply_does_not_answer_the_next_request(wire):
    transport, host_sock = wire
    # A reply nobody asked for is already waiting: the next request must not take it.
    host_sock.sendall(virtio.frame("1 stale"))
    HostEnd(host_sock, VmxGuestinfo({"guestinfo.a": "fresh"}))
    import time
    time.sleep(0.1)
    assert transport.info_get("guestinfo.a") == "fresh"


def test_config_decodes_through_the_wire_as_the_agent_reads_it(wire):
    """The launcher's encoding, the VMX store, the wire, GuestSource: the agent's view."""
    transport, host_sock = wire
    config = config_from_json({
        "common": {"id": "c1", "name": "box"},
        "sessions": {"c1": {"cmd": {"path": "/bin/echo", "args": ["/bin/echo", "a b", ""],
                                    "env": ["X="], "dir": "/"}}},
    })
    store = VmxGuestinfo(encode(config))
    HostEnd(host_sock, store)
    decoded = decode(GuestSource(transport), ExecutorConfig)
    assert decoded.sessions["c1"].cmd.args == ["/bin/echo", "a b", ""]
    assert decoded.sessions["c1"].cmd.env == ["X="]
    assert decoded.common.id == "c1"
    # The guest's writes come back through the vmomi read path.
    sink = GuestSink(transport)
    sink("guestinfo.vice..sessions|c1.started", "true")
    sink("guestinfo.vice..sessions|c1.detail.stoptime", "")
    final = store.final_map()
    assert final["guestinfo.vice..sessions|c1.started"] == "true"
    assert final["guestinfo.vice..sessions|c1.detail.stoptime"] == ""
    assert store.data["guestinfo.vice..sessions|c1.detail.stoptime"] == "<nil>"


def test_the_config_decodes_the_same_from_one_dump(wire):
    """snapshot(): the whole config in one info-dump, decoded as key by key would."""
    transport, host_sock = wire
    config = config_from_json({
        "common": {"id": "c1", "name": "box"},
        "sessions": {"c1": {"cmd": {"path": "/bin/echo", "args": ["/bin/echo", "a b", ""],
                                    "env": ["X=", "Y=1 2"], "dir": "/"}}},
    })
    store = VmxGuestinfo(encode(config))
    host = HostEnd(host_sock, store)
    one_by_one = decode(GuestSource(transport), ExecutorConfig)
    asked = len(host.verbs)
    assert asked > 10 and set(host.verbs) == {"info-get"}
    from_dump = decode(GuestSource(snapshot(transport)), ExecutorConfig)
    assert host.verbs[asked:] == ["info-dump"]
    assert encode(from_dump) == encode(one_by_one) == encode(config)


def test_a_host_without_info_dump_is_read_key_by_key(wire):
    transport, host_sock = wire
    HostEnd(host_sock, VmxGuestinfo({"guestinfo.a": "1"}), dump=False)
    assert transport.info_dump("guestinfo.") is None
    assert snapshot(transport) is None
    assert snapshot(MapTransport({"guestinfo.a": "1"})) is None   # no info_dump at all


def test_a_host_answering_info_dump_with_no_reply_is_read_key_by_key(wire):
    """A host (a port layer of its own) that answers the request it does not know with
    neither "0 ..." nor "1 ...": the guest reads key by key, as from a host without it."""
    transport, host_sock = wire
    store = VmxGuestinfo({"guestinfo.a": "1"})

    def serve():
        deframer = virtio.Deframer()
        while data := host_sock.recv(65536):
            for request in deframer.feed(data):
                reply = ("ERROR: unknown request" if request.startswith("info-dump") else
                         virtio.answer(request, store.info_get, store.info_set))
                host_sock.sendall(virtio.frame(reply))
    threading.Thread(target=serve, daemon=True).start()
    assert snapshot(transport) is None
    assert transport.info_get("guestinfo.a") == "1"   # the same port, key by key


def test_the_agent_reads_its_config_in_one_request(wire):
    """Agent.load_config over our virtio port: one info-dump, not a request a key (the
    boot timeline's `config` phase was ~60 round trips under TCG)."""
    from tether import agent
    from tether.extension import encode_config
    transport, host_sock = wire
    config = config_from_json({
        "common": {"id": "c1", "name": "box"},
        "sessions": {"c1": {"cmd": {"path": "/bin/true", "args": ["/bin/true"]}}},
    })
    host = HostEnd(host_sock, VmxGuestinfo(encode_config(config)))
    the_agent = agent.Agent(transport, agent.Options(
        mode=agent.RunMode.PROCESS, attach_endpoints=[], vic_attach=[]))
    try:
        the_agent.load_config()
    finally:
        the_agent.loop.close()
    assert the_agent.config.sessions["c1"].cmd.args == ["/bin/true"]
    assert host.verbs.count("info-dump") == 1
    # what is left: the write-back's look at its own error key (a GuestSource, which
    # reads guestinfo.ovfEnv first)
    assert host.verbs.count("info-get") <= 2, host.verbs


# ---------------------------------------------------------------- finding the port (sysfs tree)

def make_sysfs(root, ports: dict[str, str], console_device: bool = True):
    for port, name in ports.items():
        d = root / "class" / "virtio-ports" / port
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
    dev = root / "bus" / "virtio" / "devices" / "virtio1"
    dev.mkdir(parents=True)
    (dev / "device").write_text("0x0003\n" if console_device else "0x0001\n")


def test_find_port_maps_the_name_through_sysfs(tmp_path):
    make_sysfs(tmp_path, {"vport1p1": "org.tether.output", "vport1p2": virtio.PORT_NAME})
    assert virtio.find_port(virtio.PORT_NAME, str(tmp_path), "/dev") == "/dev/vport1p2"
    assert virtio.find_port("org.other", str(tmp_path), "/dev") is None
    assert virtio.has_console_device(str(tmp_path))


def test_a_vm_with_the_port_uses_it_without_probing_the_backdoor(tmp_path):
    from tether.guestinfo import candidates
    sys_root, dev_root = str(tmp_path / "sys"), str(tmp_path / "dev")
    probe_first = ("extraconfig.backdoor", "extraconfig.virtio")
    assert candidates(sys_root, dev_root, args=[]) == probe_first   # no port (yet): probe
    make_sysfs(tmp_path / "sys", {"vport1p1": "org.tether.guestinfo"})
    assert candidates(sys_root, dev_root, args=["quiet"]) == ("extraconfig.virtio",)
    assert candidates(sys_root, dev_root, args=["tether.probe_backdoor=1"]) == probe_first


def test_open_transport_none_without_the_port(tmp_path):
    make_sysfs(tmp_path, {"vport1p1": "org.tether.output"}, console_device=False)
    messages = []
    assert virtio.open_transport(messages.append, sys_root=str(tmp_path), wait=5) is None


def test_open_transport_opens_the_named_device(tmp_path):
    # The "device" is a real socket end standing in for /dev/vportNpM.
    make_sysfs(tmp_path, {"vport1p2": virtio.PORT_NAME})
    devdir = tmp_path / "dev"
    devdir.mkdir()
    fifo = devdir / "vport1p2"
    os.mkfifo(fifo)
    messages = []
    keep_open = os.open(fifo, os.O_RDWR)     # so the open below does not wait for a peer
    try:
        transport = virtio.open_transport(messages.append, sys_root=str(tmp_path),
                                          dev_root=str(devdir))
        assert transport is not None and transport.path == str(fifo)
        assert any(virtio.PORT_NAME in m for m in messages)
        transport.close()
    finally:
        os.close(keep_open)


# ---------------------------------------------------------------- the launcher's plain parts

def net_config(networks):
    return config_from_json({"common": {"id": "n", "name": "n"},
                             "sessions": {"n": {"cmd": {"path": "/bin/true"}}},
                             "networks": networks})


def test_nics_get_fixed_slots_and_ids():
    config = net_config({
        "b": {"network": {"type": "bridge"}},
        "a": {"common": {"id": "0000:00:07.0"}, "network": {"type": "external"}},
        "c": {"common": {"id": "52:54:00:aa:bb:cc"}, "network": {"type": "bridge"}},
    })
    nics = assign_nics(config, {"b": "tap:tap9"}, mac_prefix="52:54:00:01:02")
    by_name = {n.network: n for n in nics}
    assert by_name["a"].slot == 0x07
    assert by_name["b"].slot == 0x05 and by_name["c"].slot == 0x06
    assert config.networks["b"].common.id == "0000:00:05.0"      # set for the agent
    assert config.networks["c"].common.id == "52:54:00:aa:bb:cc"  # MAC IDs stay
    assert by_name["c"].mac == "52:54:00:aa:bb:cc"
    assert by_name["b"].mac == "52:54:00:01:02:05"
    assert by_name["b"].backend == "tap,ifname=tap9,script=no,downscript=no"
    assert backend_options("user") == "user,restrict=on"


def test_nic_errors_are_actionable():
    with pytest.raises(VmError, match="both ask"):
        assign_nics(net_config({"a": {"common": {"id": "0000:00:07.0"}},
                                "b": {"common": {"id": "7"}}}))
    with pytest.raises(VmError, match="outside the NIC range"):
        assign_nics(net_config({"a": {"common": {"id": "0000:00:1e.0"}}}))
    with pytest.raises(VmError, match="names no network"):
        assign_nics(net_config({"a": {}}), {"zzz": "user"})


def test_qemu_argv_has_the_ports_disks_and_nics():
    config = net_config({"a": {"network": {"type": "bridge"}}})
    nics = assign_nics(config, mac_prefix="52:54:00:00:00")
    spec = MachineSpec(iso="/i.iso", disks=[Disk("/c.img", CONTAINERFS_SLOT, snapshot=True)],
                       nics=nics, netns="ns1")
    sockets = {name: f"/tmp/{name}.sock" for name in
               ("console", "org.tether.guestinfo", "org.tether.output", "org.tether.attach")}
    argv = qemu_argv(spec, sockets)
    line = " ".join(argv)
    assert argv[:4] == ["ip", "netns", "exec", "ns1"]
    assert "-accel tcg" in line and "-no-reboot" in line and "-nodefaults" in line
    for port in ("org.tether.guestinfo", "org.tether.output", "org.tether.attach"):
        assert f"name={port}" in line and f"path=/tmp/{port}.sock" in line
    assert "file=/c.img,if=none,id=disk0,format=raw,snapshot=on" in line
    assert "addr=0x10" in line
    assert "virtio-net-pci,netdev=net0,addr=0x5,mac=52:54:00:00:00:05,romfile=" in line
    assert "-boot d" in line


def test_vmx_store_stores_empty_as_nil():
    store = VmxGuestinfo({"guestinfo.a": "", "b": "x"})
    assert store.data == {"guestinfo.a": "<nil>", "b": "x"}
    store.info_set("guestinfo.c", "<nil>")
    assert store.final_map() == {"b": "x", "guestinfo.a": "", "guestinfo.c": ""}


def test_tether_vm_without_an_image_says_how_to_build_it(tmp_path, capsys):
    import json
    from tether import vm
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"common": {"id": "a"}, "sessions": {"a": {"cmd": {"path": "/bin/true"}}}}))
    with pytest.raises(VmError, match="init/build"):
        vm.VmRun(config_from_json(json.loads(config.read_text())), str(tmp_path / "nothing"))
    if shutil.which("qemu-system-x86_64"):
        assert vm.main([str(config), "--image", str(tmp_path / "nothing")]) == 2
        assert "init/build" in capsys.readouterr().err
    assert vm.main([str(tmp_path / "missing.json")]) == 2
