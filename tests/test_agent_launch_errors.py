"""Launch errors: what the sessions cannot run without (their volumes, their networks, the
firewall) failing at boot stops the launch. Every session's `started` carries the error,
none runs, the agent writes back and exits 125 (docs/agent.md, "Fatal at boot")."""
from __future__ import annotations

import secrets
import signal

from helpers import DEFAULT_TIMEOUT

SHELL_ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
EXIT_LAUNCH_ERROR = 125


def config(tmp_path, **more) -> dict:
    """Two sessions, each of which would say so in the log if it ran."""
    def session(word):
        return {"cmd": {"path": "/bin/sh", "args": ["/bin/sh", "-c", f"echo {word}-ran"],
                        "env": SHELL_ENV}}
    return {"common": {"id": "main", "name": "main"},
            "sessions": {"main": session("main"), "side": session("side")}, **more}


def assert_refused(result, text: str) -> None:
    assert result.returncode == EXIT_LAUNCH_ERROR, result
    for sid in ("main", "side"):
        assert result.session(sid).started == text, result
        assert not result.session(sid).diagnostics.exit_logs    # never ran, never exited
    assert "main-ran" not in result.log and "side-ran" not in result.log
    assert "session main started" not in result.log


def test_missing_bind_source_is_a_launch_error(sandbox, tmp_path):
    source = tmp_path / "not-there"
    dest = tmp_path / "mnt" / "x"     # an absolute path in the root, "/": keep it in tmp
    cfg = config(tmp_path, mounts={"gone": {"source": f"bind://{source}", "path": str(dest),
                                            "mode": "ro"}})
    result = sandbox.run(cfg)
    assert_refused(result, f"volume gone: cannot mount {source} on {dest}: "
                           "No such file or directory")
    assert not dest.exists()          # no mount point made for a mount that cannot be


def test_label_that_never_appears_is_a_launch_error(sandbox, tmp_path):
    """Waits out the label timeout (30 s) before it fails."""
    label = "tvnever" + secrets.token_hex(3)
    dest = tmp_path / "data"
    cfg = config(tmp_path, mounts={"data": {"source": f"label://{label}", "path": str(dest)}})
    result = sandbox.run(cfg, timeout=DEFAULT_TIMEOUT)
    assert_refused(result, f"volume data: cannot mount label {label} on {dest}: no disk "
                           f"labelled {label!r} appeared within 30s (looked in "
                           "/dev/disk/by-label and the superblocks of /sys/class/block)")


def test_static_address_on_a_missing_nic_is_a_launch_error(sandbox, tmp_path):
    """The sandbox's private namespace has no NIC at that PCI address."""
    cfg = config(tmp_path, networks={"public": {
        "common": {"id": "0000:00:09.0"}, "static": True, "ip": "10.99.0.2/24"}})
    result = sandbox.run(cfg)
    text = result.session("main").started
    assert text.startswith("network public: no network interface at PCI address "
                           "0000:00:09.0"), result
    assert_refused(result, text)


def test_a_volume_that_mounts_is_not_a_launch_error(sandbox, tmp_path):
    """The gate is not a blanket refusal: with the source there, the sessions run."""
    source = tmp_path / "share"
    source.mkdir()
    dest = tmp_path / "mnt" / "x"
    cfg = config(tmp_path, mounts={"share": {"source": f"bind://{source}", "path": str(dest)}})
    result = sandbox.run(cfg)
    assert result.returncode == 0, result
    assert result.session("main").started == "true"
    assert "main-ran" in result.log


def test_reload_with_a_bad_volume_keeps_the_sessions_running(sandbox, tmp_path):
    """After launch, a volume that cannot be mounted is logged; nothing stops."""
    cfg = config(tmp_path)
    cfg["sessions"]["main"]["cmd"]["args"] = ["/bin/sh", "-c", "echo main-up; exec sleep 1000"]
    box = sandbox.start(cfg)
    box.wait_for_log(r"main-up")
    source = tmp_path / "not-there"
    cfg["mounts"] = {"late": {"source": f"bind://{source}", "path": str(tmp_path / "late")}}
    import json
    with open(box.config_path, "w") as f:
        json.dump(cfg, f)
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"step volumes failed: volume late")
    box.signal(signal.SIGTERM)
    result = box.wait()
    assert result.returncode == 128 + signal.SIGTERM, result
    assert result.session("main").started == "true"


def test_the_sandbox_mounts_volumes_without_writing_to_the_hosts_root(sandbox, tmp_path):
    """A volume is mounted on a scratch directory first, a labelled disk on a staging one
    (tether/volumes.py): in the sandbox both are under its private state directory, never
    in the host's /."""
    import os
    from helpers import loop_disks, not_applicable
    if os.path.exists("/.tether"):
        not_applicable("/.tether is already on this host: its making cannot be seen")
    source = tmp_path / "share"
    source.mkdir()
    try:
        with loop_disks(tmp_path) as make_disk:
            label = make_disk()
            cfg = config(tmp_path, mounts={
                "share": {"source": f"bind://{source}", "path": str(tmp_path / "mnt" / "ro"),
                          "mode": "ro"},
                "scratch": {"source": "tmpfs://", "path": str(tmp_path / "mnt" / "t")},
                "disk": {"source": f"label://{label}", "path": str(tmp_path / "mnt" / "d")}})
            cfg["sessions"]["main"]["cmd"]["args"] = [
                "/bin/sh", "-c", f"test -d {tmp_path}/mnt/d/lost+found && echo main-ran"]
            result = sandbox.run(cfg)
        assert result.returncode == 0, result
        assert "main-ran" in result.log           # the labelled disk was there
        assert not os.path.exists("/.tether"), "the sandbox made /.tether on the host"
    finally:
        if os.path.exists("/.tether"):     # what the failure left behind: empty dirs only
            for top, dirs, _ in os.walk("/.tether", topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(top, d))
            os.rmdir("/.tether")


def test_a_session_new_in_a_reload_whose_volume_fails_is_not_run(sandbox, tmp_path):
    """The launch gate holds for what a reload adds: a session new in a reload whose new
    volume cannot be mounted would run in a container that is not the one the host asked
    for (its data in the image's directory instead of the volume). Its `started` says
    why; the running sessions go on; the next reload tries again."""
    import json
    cfg = config(tmp_path)
    cfg["sessions"]["main"]["cmd"]["args"] = ["/bin/sh", "-c", "echo main-up; exec sleep 1000"]
    box = sandbox.start(cfg)
    box.wait_for_log(r"main-up")
    source = tmp_path / "not-there"
    late = tmp_path / "late"
    cfg["mounts"] = {"late": {"source": f"bind://{source}", "path": str(late)}}
    cfg["sessions"]["new"] = {"cmd": {"path": "/bin/sh", "env": SHELL_ENV,
                                      "args": ["/bin/sh", "-c", "echo new-ran"]}}
    with open(box.config_path, "w") as f:
        json.dump(cfg, f)
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"step volumes failed: volume late")
    box.wait_for_log(r"session new not launched|reload: new session new")
    box.signal(signal.SIGTERM)
    result = box.wait()
    assert result.returncode == 128 + signal.SIGTERM, result
    assert result.session("main").started == "true"
    assert result.session("new").started == (f"volume late: cannot mount {source} on "
                                              f"{late}: No such file or directory"), result
    assert "new-ran" not in result.log


def test_a_volume_sources_password_stays_out_of_started_and_the_log(sandbox, tmp_path):
    """The JSON form takes user:password@ in a source URL, but guestinfo has no keys for
    it (Go's url.Userinfo has no exported fields): the agent never holds the password,
    so neither a failed mount's `started` (which the container can read back) nor the
    config dump at debug 1 can show it."""
    dest = tmp_path / "data"
    cfg = config(tmp_path, mounts={"data": {
        "source": "nfs://alice:s3cret-pw@127.0.0.1:1/export", "path": str(dest)}})
    cfg["diagnostics"] = {"debug_level": 1}
    result = sandbox.run(cfg)
    started = result.session("main").started
    assert started.startswith(f"volume data: cannot mount 127.0.0.1:/export on {dest}: "), started
    assert "s3cret-pw" not in result.log and "s3cret-pw" not in started, \
        [line for line in result.log.splitlines() if "s3cret" in line]
