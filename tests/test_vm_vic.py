"""VIC's serial layout in a real VM: `tether vm --vic-serial` boots the ISO as ESX would
(its own command line, console=ttyS1), and the host attaches over COM1 with the sync
handshake and SSH, as the port layer does. Marker `vm` (root, QEMU, init/build)."""
from __future__ import annotations

import base64
import os
import select
import socket
import time

import pytest

from test_vm import boot, session, single
from test_vic_attach_sandbox import port_layer_key
import vicssh_client as vc

pytestmark = pytest.mark.vm


def test_vic_serial_attach_over_com1_to_a_runblock_cat(image_dir):   # noqa: F811
    config = single("vicecho", session("/bin/cat", attach=True, open_stdin=True,
                                       run_block=True))
    config["key"] = base64.b64encode(port_layer_key()).decode()
    seen = {}

    def attach(run, deadline):
        path = run.machine.com1_socket
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "QEMU made no COM1 socket"
            time.sleep(0.1)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        # Until the agent serves COM1, the guest says nothing there: the kernel and the
        # agent's log go to COM2 (the console).
        early = b""
        while "VIC attach on the line /dev/ttyS0" not in run.machine.console_text():
            assert time.monotonic() < deadline, run.machine.console_text()[-4000:]
            if select.select([sock], [], [], 0.2)[0]:
                early += sock.recv(65536)
        seen["early"] = early
        vc.handshake_head(sock, timeout=max(1.0, deadline - time.monotonic()))
        client = vc.VicClient(sock)
        try:
            assert client.version() == 10
            assert client.container_ids() == ["vicecho"]
            chan = client.attach("vicecho")
            assert client.request(chan, "unblock", b"Unblock") is True
            line = b"over COM1 \x1b[1mbold\x1b[0m \xff\n"
            chan.sendall(line)
            seen["echo"] = vc.read_until(chan, lambda d: d.endswith(b"\n"), timeout=120)
            assert client.request(chan, "close-stdin") is True
            chan.shutdown_write()
            vc.read_all(chan, timeout=120)
        finally:
            client.close()

    vm = boot(image_dir, config, attach=attach, vic_serial=True)
    assert seen.get("early") == b"", seen
    assert seen.get("echo") == b"over COM1 \x1b[1mbold\x1b[0m \xff\n", (seen, vm.explain())
    assert vm.result.exit_code == 0, vm.explain()
    console = vm.result.console
    # booted from the ISO with its own command line: the console is ttyS1
    assert "kernel console ttyS1" in console, vm.explain()
    with open(os.path.join(vm.result.workdir, "qemu.argv")) if os.path.exists(
            os.path.join(vm.result.workdir, "qemu.argv")) else open(os.devnull) as f:
        argv = f.read()
    assert "-kernel" not in argv
    # the session's output reached COM3 (the output log) too
    assert "over COM1" in vm.text(), vm.explain()
    assert vm.session_key("vicecho", "runblock") == "false"
