"""Secrets do not linger: with guestinfo over the (simulated) VMware backdoor, the agent
empties the Key after reading it, and logs no secret below debug level 3."""
from __future__ import annotations

import base64
import uuid

import pytest

from tether.jsonform import config_from_json

TIMEOUT = 120.0
KEY = b"-----BEGIN RSA PRIVATE KEY-----\nnot-a-real-key-but-a-secret\n-----END RSA PRIVATE KEY-----\n"
KEY_KEY = "guestinfo.vice./key"
SECRET_ENV = "DB_PASSWORD=hunter2-" + uuid.uuid4().hex[:8]
SECRET_ARG = "--token=tok-" + uuid.uuid4().hex[:8]


def host_view(cfg) -> dict[str, str]:
    """What vSphere shows the guest: guestinfo.* keys only, "" stored as <nil>."""
    from tether.extension import encode_config
    return {k: ("<nil>" if v == "" else v) for k, v in encode_config(cfg).items()
            if k.startswith("guestinfo.")}


def the_config(tmp_path, debug: int = 0, **extra):
    out = tmp_path / "seen"
    return config_from_json({
        "common": {"id": "main"}, "key": base64.b64encode(KEY).decode(),
        "diagnostics": {"debug_level": debug},
        "sessions": {"main": {"cmd": {
            "path": "/bin/sh",
            "args": ["sh", "-c", f'echo "$DB_PASSWORD" > {out}; exec sleep 600', SECRET_ARG],
            "env": ["PATH=/usr/bin:/bin", SECRET_ENV]}}}, **extra}), out


def start(sandbox, sim, path, cfg):
    sim.guestinfo.update(host_view(cfg))
    started = "guestinfo.vice..sessions|main.started"
    box = sandbox.start(cfg, extra_args=["--backdoor-sim", path], stop_grace=2)
    assert sim.wait_for(lambda s: s.guestinfo.get(started) == "true", TIMEOUT), box.log_text()
    return box


def test_the_key_reads_back_empty_and_the_session_still_got_its_config(sandbox, hypervisor,
                                                                       tmp_path):
    sim, path = hypervisor
    cfg, seen = the_config(tmp_path)
    assert sim.guestinfo.get(KEY_KEY) is None
    box = start(sandbox, sim, path, cfg)
    assert sim.guestinfo[KEY_KEY] == ""
    # what any process in the guest would get back over the backdoor: nothing
    from extraconfig.backdoor.bridge import SocketPorts
    from extraconfig.backdoor.rpci import RpciTransport
    guest = RpciTransport(SocketPorts(path))
    try:
        assert guest.info_get(KEY_KEY) == ""
    finally:
        guest.close()
    assert "emptied 1 secret key(s) after reading them: guestinfo.vice./key" in box.log_text()
    box.signal(15)
    result = box.wait()
    assert seen.read_text().strip() == SECRET_ENV.split("=", 1)[1]
    assert result.returncode == 128 + 15


def test_scrub_secrets_false_leaves_the_key(sandbox, hypervisor, tmp_path):
    sim, path = hypervisor
    cfg, _ = the_config(tmp_path, scrub_secrets=False)
    box = start(sandbox, sim, path, cfg)
    assert base64.b64decode(sim.guestinfo[KEY_KEY]) == KEY
    box.signal(15)
    box.wait()


@pytest.mark.parametrize("debug", [2, 3])
def test_no_secret_in_the_log_below_debug_3(sandbox, hypervisor, tmp_path, debug):
    sim, path = hypervisor
    cfg, _ = the_config(tmp_path, debug=debug)
    box = start(sandbox, sim, path, cfg)
    box.signal(15)
    log = box.wait().log
    secrets = [SECRET_ENV.split("=", 1)[1], SECRET_ARG, base64.b64encode(KEY).decode(),
               "not-a-real-key-but-a-secret"]
    shown = [s for s in secrets if s in log]
    if debug < 3:
        assert shown == [], log
    else:   # level 3 shows the config as it is: the test can see them when they are there
        assert SECRET_ENV.split("=", 1)[1] in shown and SECRET_ARG in shown, log


def test_a_reload_that_does_not_decode_still_empties_a_new_key(sandbox, hypervisor, tmp_path):
    """The scrub ran on the decoded config, so a config that did not decode left its
    secrets readable: a host that wrote a new Key with a broken session list had the
    Key there for any process in the guest until a good config came. The Key's place
    needs no decoding: it is emptied all the same."""
    import signal
    sim, path = hypervisor
    cfg, _ = the_config(tmp_path)
    box = start(sandbox, sim, path, cfg)
    assert sim.guestinfo[KEY_KEY] == ""
    broken = host_view(cfg)
    broken["guestinfo.vice./sessions"] = "main|main"          # a name twice: no decode
    sim.guestinfo.update(broken)
    assert base64.b64decode(sim.guestinfo[KEY_KEY]) == KEY
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"configuration cannot be decoded")
    assert sim.guestinfo[KEY_KEY] == "", box.log_text()
    box.signal(signal.SIGTERM)
    box.wait()
