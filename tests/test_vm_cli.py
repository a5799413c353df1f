"""`tether vm`'s output without booting anything: the final map it writes with --out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from extraconfig import encode
from extraconfig.transport import parse_vmx
from tether.jsonform import config_from_json
from tether.vm import VmResult, report

REPO = Path(__file__).resolve().parents[1]


def test_out_is_vmx_lines_that_config_decode_reads(tmp_path, capsys):
    cfg = config_from_json({"common": {"id": "cli"}, "sessions": {"cli": {"cmd": {
        "path": "/bin/sh", "args": ["/bin/sh", "-c", "exit 5"]}}}})
    cfg.sessions["cli"].started = "true"
    cfg.sessions["cli"].exit_status = 5
    final = dict(sorted(encode(cfg).items()))
    result = VmResult(exit_code=5, qemu_status=0, guestinfo=final, config=cfg, console="",
                      marks={}, workdir=str(tmp_path))
    out = tmp_path / "final.vmx"
    report(result, str(out))
    assert parse_vmx(out.read_text()) == final            # VMX lines, as `tether sandbox --out`
    report(result, None)
    assert capsys.readouterr().out == out.read_text()     # the same text as on stdout
    decoded = subprocess.run([sys.executable, "-m", "tether", "config", "decode", str(out)],
                             capture_output=True, text=True, cwd=REPO, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert decoded.returncode == 0, decoded.stderr
    session = json.loads(decoded.stdout)["sessions"]["cli"]
    assert session["started"] == "true" and session["exit_status"] == 5
