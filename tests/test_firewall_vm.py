"""The firewall in the real image: a published port reached from the host through QEMU's
user-mode networking (hostfwd), an unpublished one not."""
from __future__ import annotations

import socket
import time

import pytest

from test_vm import boot, session, single

pytestmark = pytest.mark.vm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_banner(port: int, timeout: float) -> bytes:
    """What the guest sends on a connection through hostfwd (b"" when it never answers:
    slirp accepts on the host side, then closes when the guest does not)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.settimeout(timeout)
            data = b""
            while True:
                chunk = c.recv(100)
                if not chunk:
                    return data
                data += chunk
    except OSError:
        return b""


def test_published_port_reachable_through_hostfwd(image_dir):
    published, unpublished = free_port(), free_port()
    script = ("nc -ll -p 8081 -e echo unpublished & "
              "echo ready; echo published | nc -l -p 8080; echo served")
    config = single("web", session("/bin/sh", "-c", script), networks={"public": {
        "static": True, "ip": "10.0.2.15/24",
        "network": {"type": "external", "default": True, "gateway": "10.0.2.2/24"},
        "ports": ["8080/tcp"]}})
    backend = (f"user,restrict=on,hostfwd=tcp:127.0.0.1:{published}-10.0.2.15:8080,"
               f"hostfwd=tcp:127.0.0.1:{unpublished}-10.0.2.15:8081")
    seen = {}

    def probe(run, deadline):
        assert run.wait_started(deadline - time.monotonic()) == "true"
        time.sleep(2)    # both listeners up (the session starts them first thing)
        seen["unpublished"] = read_banner(unpublished, 5.0)
        while time.monotonic() < deadline:
            seen["published"] = read_banner(published, 5.0)
            if seen["published"]:
                return
            time.sleep(1)

    vm = boot(image_dir, config, nets={"public": backend}, attach=probe)
    assert seen.get("published") == b"published\n", vm.explain()
    assert seen.get("unpublished") == b"", vm.explain()
    assert vm.result.exit_code == 0, vm.explain()
