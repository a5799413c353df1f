"""`tether sandbox`: the final guestinfo map. The executor Key is not printed on stdout;
a map that cannot be written does not cost the primary's exit status."""
from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

from helpers import REPO, executor_config, require_namespaces, session_config, sid, \
    write_config


@pytest.fixture
def run(tmp_path):
    require_namespaces()

    def run(config, *args):
        path = write_config(config, str(tmp_path))
        return subprocess.run([sys.executable, "-m", "tether", "sandbox", path, *args],
                              capture_output=True, text=True, cwd=REPO, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    return run


def test_the_key_is_redacted_on_stdout_and_kept_in_the_out_file(run, tmp_path):
    config = executor_config(session_config(sid(), ["/bin/true"]))
    config.key = b"-----BEGIN RSA PRIVATE KEY----- very secret"
    secret = base64.b64encode(config.key).decode()
    shown = run(config)
    assert shown.returncode == 0, shown.stderr
    assert secret not in shown.stdout
    assert 'guestinfo.vice./key = "<redacted>"' in shown.stdout
    out = tmp_path / "map.vmx"
    written = run(config, "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert secret in out.read_text()
    assert out.stat().st_mode & 0o077 == 0


def test_an_out_that_cannot_be_written_keeps_the_exit_status(run):
    config = executor_config(session_config(sid(), ["/bin/sh", "-c", "exit 3"]))
    late = run(config, "--out", "/dev/full")          # opens fine, every write fails
    assert late.returncode == 3, late.stderr
    assert "cannot write the guestinfo map to /dev/full" in late.stderr
    assert "Traceback" not in late.stderr
    early = run(config, "--out", "/nonexistent-dir/map.vmx")
    assert early.returncode == 2 and "--out /nonexistent-dir/map.vmx" in early.stderr
    assert "started: pid" not in early.stderr             # nothing was run
