"""VIC attach against Go's golang.org/x/crypto/ssh, the SSH library of the reference's
port layer, limited to what its vendored copy offers (host key `ssh-rsa` only, its key
exchanges, ciphers and MACs): tests/vicgo/main.go, built offline from Debian's
golang-go and golang-golang-x-crypto-dev, against the real agent in the sandbox."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import REPO, executor_config, missing, require_tool, session_config, sid, unique
from test_vic_attach_sandbox import port_layer_key

GOPATH = "/usr/share/gocode"


@pytest.fixture(scope="module")
def vicgo(tmp_path_factory) -> str:
    require_tool("go")
    if not os.path.isdir(f"{GOPATH}/src/golang.org/x/crypto/ssh"):
        missing("golang.org/x/crypto/ssh", "golang.org/x/crypto/ssh is not installed (Debian "
                "package golang-golang-x-crypto-dev; scripts/install-deps installs it)")
    work = tmp_path_factory.mktemp("vicgo")
    shutil.copy(REPO / "tests" / "vicgo" / "main.go", work / "main.go")
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=str(work / "cache"),
               GOFLAGS="", CGO_ENABLED="0")
    build = subprocess.run(["go", "build", "-o", str(work / "vicgo"), "."], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    return str(work / "vicgo")


def test_the_port_layers_go_ssh_client(sandbox, vicgo):
    primary = session_config(sid(), ["/bin/cat"], attach=True, open_stdin=True,
                             run_block=True)
    cfg = executor_config(primary)
    cfg.key = port_layer_key()
    path = f"/tmp/tether-vicgo-{unique()}.sock"
    try:
        box = sandbox.start(cfg, extra_args=["--vic-attach", path])
        box.wait_for_log(r"serving \d+ session")
        run = subprocess.run([vicgo, path, primary.id], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, (run.stderr, box.log_text())
        seen = json.loads(run.stdout)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert seen["host_key_type"] == "ssh-rsa"
    assert seen["ids"] == [primary.id]
    assert seen["version"] == 10
    assert (seen["unknown_ok"], seen["unknown_text"]) == (
        False, "unknown global request type: no-such-request")
    assert (seen["refused_code"], seen["refused_text"]) == (1, "session no-such-session is invalid")
    assert seen["ping_ok"] and seen["unblock_ok"] and seen["close_stdin_ok"]
    assert seen["echo"] == "from go \x1b[1mbold\x1b[0m\n"
    # close-stdin, then CloseWrite: cat sees EOF, says its last words and ends
    assert seen["rest"] == "last words\n"
    result = box.wait(60)
    assert result.returncode == 0
    assert result.guestinfo.get(f"guestinfo.vice..sessions|{primary.id}.runblock") == "false"
