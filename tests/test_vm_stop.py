"""A graceful stop of `tether vm`: SIGTERM (or ctrl-c) to it sends the guest ctrl-alt-del
over QMP; the agent, PID 1, gets it as SIGINT (it turned the kernel's hard reboot off),
stops the sessions with their stop signal, writes back and powers off. Marker `vm`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from extraconfig.transport import parse_vmx
from test_vm import BOOT_TIMEOUT, REPO, session, single

pytestmark = pytest.mark.vm


def test_sigterm_to_tether_vm_stops_the_guest_gracefully(image_dir, tmp_path):  # noqa: F811
    config = tmp_path / "c.json"
    config.write_text(json.dumps(single("long", session("/bin/sh", "-c",
                                                        "echo up; exec sleep 100000"))))
    out = tmp_path / "final.vmx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "vm", str(config), "--image", str(image_dir),
         "--out", str(out), "--console", "--timeout", str(BOOT_TIMEOUT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        line = b""
        while line != b"up\n" and time.monotonic() < deadline:
            line = proc.stdout.readline()      # the primary's output, echoed
            if not line:
                break
        assert line == b"up\n", proc.communicate(timeout=60)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=BOOT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    console = stderr.decode(errors="replace")
    from extraconfig import decode
    from tether.config import ExecutorConfig
    long = decode(parse_vmx(out.read_text()), ExecutorConfig).sessions["long"]
    assert long.exit_status == -1, console
    assert long.diagnostics.exit_logs[-1].message == "killed by SIGTERM", console
    assert proc.returncode == 128 + signal.SIGTERM, console
    assert "stopping: signal SIGINT" in console           # ctrl-alt-del, as the agent saw it
    assert "reboot: Restarting system" not in console     # no hard reset by the kernel
    ours = [line for line in console.splitlines() if line.startswith("tether vm:")]
    assert not any("killed" in line for line in ours), ours   # it powered off by itself
