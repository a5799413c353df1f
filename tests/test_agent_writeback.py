"""Write-back: only read-write keys reach the transport, `started` last."""
from __future__ import annotations

import os

from extraconfig.gotime import GoTime
from tether.config import ExitLog
from tether.writeback import WriteBack

from helpers import executor_config, session_config


class RecordingTransport:
    def __init__(self):
        self.writes: list[tuple[str, str]] = []

    def info_get(self, key):
        return None

    def info_set(self, key, value):
        self.writes.append((key, value))


def test_session_subtree_read_write_keys_with_started_last():
    s = session_config("abc", ["/bin/true"])
    s.started = "true"
    s.exit_status = 3
    s.detail.start_time, s.detail.stop_time = 100, 200
    s.diagnostics.resurrection_count = 2
    s.diagnostics.exit_logs = [ExitLog(GoTime(1700000000, 5), 3, "exited 3")]
    config = executor_config(s)
    transport = RecordingTransport()
    WriteBack(transport).session(config, s)
    keys = [k for k, _ in transport.writes]
    assert all("/" not in k for k in keys)               # read-only keys never written
    assert keys[-1] == "guestinfo.vice..sessions|abc.started"
    values = dict(transport.writes)
    assert values["guestinfo.vice..sessions|abc.status"] == "3"
    assert values["guestinfo.vice..sessions|abc.detail.stoptime"] == "200"
    assert values["guestinfo.vice..sessions|abc.diagnostics.resurrections"] == "2"
    assert values["guestinfo.vice..sessions|abc.diagnostics.exitlogs|0.Message"] == "exited 3"
    assert values["guestinfo.vice..sessions|abc.started"] == "true"


def test_everything_writes_started_keys_last():
    a, b = session_config("a1", ["/bin/true"]), session_config("b2", ["/bin/true"])
    a.started, b.started = "true", "stat /x: no such file or directory"
    transport = RecordingTransport()
    WriteBack(transport).everything(executor_config(a, b))
    keys = [k for k, _ in transport.writes]
    started = [i for i, k in enumerate(keys) if k.endswith(".started")]
    assert started == [len(keys) - 2, len(keys) - 1]
    assert dict(transport.writes)["guestinfo.vice..sessions|b2.started"] == \
        "stat /x: no such file or directory"


def test_a_failing_transport_is_logged_not_raised(caplog):
    class Broken(RecordingTransport):
        def info_set(self, key, value):
            raise OSError(5, "Input/output error")
    s = session_config("abc", ["/bin/true"])
    wb = WriteBack(Broken())
    wb.session(executor_config(s), s)
    assert wb.failures == 1
    assert "could not publish session abc" in caplog.text


def test_a_session_reaches_a_vmx_file_in_one_rewrite_and_an_unchanged_one_in_none(
        tmp_path, monkeypatch):
    """The VMX file transport rewrote the whole file for every key: a session's subtree
    cost a rewrite a key, so a config of 300 sessions took 40 s to launch in the sandbox.
    One rewrite a subtree now (the host sees it at once, `started` with the rest), and
    none when nothing changed."""
    from extraconfig import transport as vmx
    from extraconfig.transport import VmxFileTransport, parse_vmx
    path = tmp_path / "guest.vmx"
    path.write_text('guestinfo.vice./common/id = "abc"\n')
    rewrites = []
    real_replace = os.replace
    monkeypatch.setattr(vmx.os, "replace",
                        lambda a, b: (rewrites.append(b), real_replace(a, b))[1])
    s = session_config("abc", ["/bin/true"])
    s.started, s.exit_status = "true", 3
    s.diagnostics.exit_logs = [ExitLog(GoTime(1700000000, 5), 3, "exited 3")]
    config = executor_config(s)
    back = WriteBack(VmxFileTransport(path))
    back.session(config, s)
    assert len(rewrites) == 1
    written = parse_vmx(path.read_text())
    assert written["guestinfo.vice..sessions|abc.started"] == "true"
    assert written["guestinfo.vice..sessions|abc.diagnostics.exitlogs|0.Message"] == "exited 3"
    assert written["guestinfo.vice./common/id"] == "abc"
    back.session(config, s)                    # the same again: nothing to write
    assert len(rewrites) == 1
    s.exit_status = 4
    back.session(config, s)
    assert len(rewrites) == 2
    assert parse_vmx(path.read_text())["guestinfo.vice..sessions|abc.status"] == "4"
