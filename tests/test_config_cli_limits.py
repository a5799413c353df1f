"""`tether config encode` (and the other JSON readers) on JSON nested too deeply for
Python's parser: a one-line error, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO


DEEP_LIST = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"annotations":' + '{"a":' * 5000 + "1" + "}" * 5001


@pytest.mark.parametrize("command, text", [(["config", "encode"], DEEP_LIST),
                                           (["config", "encode"], DEEP_OBJECT),
                                           (["ports"], DEEP_OBJECT)])
def test_deeply_nested_json_is_a_clear_error(tmp_path, text, command):
    path = tmp_path / "deep.json"
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "tether", *command, str(path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "nested too deeply" in run.stderr
    assert len(run.stderr.splitlines()) == 1
