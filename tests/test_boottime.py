"""The boot timeline, guest side (tether/boottime.py): stage 0's marks, the phases, the
keys written back once, and that neither decoder reads them. The agent's hooks are
checked end to end in `tether sandbox`; in a VM by tests/test_vm.py."""
from __future__ import annotations

import pytest

from helpers import executor_config, session_config, sid
from extraconfig import decode, encode
from extraconfig.transport import GuestSource, MapTransport
from tether import boottime
from tether.config import ExecutorConfig

STAGE0 = "kernel=1.200000,modules=1.350000,root=1.410000,exec=1.420000"


@pytest.fixture
def fresh(monkeypatch):
    """A clean module state: no marks, nothing written."""
    monkeypatch.setattr(boottime, "_marks", [])
    monkeypatch.setattr(boottime, "_written", False)
    monkeypatch.setattr(boottime, "_origin", None)
    return boottime


def test_stage0_marks_are_read_and_named(fresh):
    marks = fresh.stage0_marks(STAGE0 + ",broken,=2,x=notanumber")
    assert marks == [("kernel", 1.2), ("stage0.modules", 1.35), ("stage0.root", 1.41),
                     ("stage0.exec", 1.42)]


def test_phases_start_where_the_one_before_ended():
    phases = boottime.phases([("kernel", 1.2), ("stage0.modules", 1.35), ("python", 2.0)])
    assert phases == [("kernel", 0.0, 1.2), ("stage0.modules", 1.2, 1.35),
                      ("python", 1.35, 2.0)]


def test_phases_may_start_at_an_origin():
    phases = boottime.phases([("resume", 5.0), ("config", 5.25)], origin=5.0)
    assert phases == [("resume", 5.0, 5.0), ("config", 5.0, 5.25)]
    keys = boottime.timeline_keys([("resume", 5.0), ("config", 5.25)], 6.0, origin=5.0)
    assert keys["guestinfo.tether.boot.resume"] == "5.000000 5.000000"
    assert keys["guestinfo.tether.boot.config"] == "5.000000 5.250000"


def test_a_resume_starts_the_timeline_again(fresh, monkeypatch):
    """A VM restored from a template: stage 0's marks and the agent's before the answer
    are the template's boot; this run's timeline starts at the answer."""
    monkeypatch.setenv(boottime.MARKS_ENV, STAGE0)
    for step in ("signals", "system", "cgroups", "template"):
        fresh.mark(step)
    fresh.resumed(1000.5)
    fresh.mark("config")
    transport = MapTransport()
    assert fresh.write_back(transport) is True
    assert list(transport.data) == ["guestinfo.tether.boot.resume", "guestinfo.tether.boot.config",
                                    "guestinfo.tether.boot.clock"]
    assert transport.data["guestinfo.tether.boot.resume"] == "1000.500000 1000.500000"
    start, end = map(float, transport.data["guestinfo.tether.boot.config"].split())
    assert start == 1000.5 and end >= start


def test_keys_hold_start_and_end_and_the_clock_goes_last():
    keys = boottime.timeline_keys([("kernel", 1.2), ("exec:web/1 x", 1.5), ("kernel", 9.0)], 1.75)
    assert list(keys) == ["guestinfo.tether.boot.kernel", "guestinfo.tether.boot.exec:web_1_x",
                          "guestinfo.tether.boot.clock"]
    assert keys["guestinfo.tether.boot.kernel"] == "0.000000 1.200000"   # the first run kept
    assert keys["guestinfo.tether.boot.exec:web_1_x"] == "1.200000 1.500000"
    assert keys["guestinfo.tether.boot.clock"] == "1.750000"


def test_written_once_and_only_after_stage0(fresh, monkeypatch):
    transport = MapTransport()
    monkeypatch.delenv(boottime.MARKS_ENV, raising=False)
    fresh.mark("config")
    assert fresh.write_back(transport) is False and transport.data == {}
    monkeypatch.setenv(boottime.MARKS_ENV, STAGE0)
    assert fresh.write_back(transport) is True
    assert set(transport.data) == {f"guestinfo.tether.boot.{name}" for name in
                                   ("kernel", "stage0.modules", "stage0.root", "stage0.exec",
                                    "config", "clock")}
    start, end = map(float, transport.data["guestinfo.tether.boot.config"].split())
    assert start == 1.42 and end >= start
    before = dict(transport.data)
    fresh.mark("later")
    assert fresh.write_back(transport) is False and transport.data == before


def test_a_failing_transport_is_logged_not_raised(fresh, monkeypatch):
    monkeypatch.setenv(boottime.MARKS_ENV, STAGE0)

    class Broken:
        def info_set(self, key, value):
            raise OSError("the port is gone")

    messages = []

    class Log:
        def warning(self, *args):
            messages.append(args[0] % args[1:])

    assert fresh.write_back(Broken(), Log()) is False
    assert "the port is gone" in messages[0]


def test_the_decoder_ignores_the_timeline_keys():
    """Our decoder (like the reference's, pkg/vsphere/extraconfig/decode.go, which only
    asks for the keys its structs name) reads the same config with the keys present."""
    ident = sid()
    config = executor_config(session_config(ident, ["/bin/true"]))
    keys = encode(config)
    with_timeline = dict(keys, **boottime.timeline_keys([("kernel", 1.0), ("config", 2.0)], 2.5))
    plain = decode(GuestSource(MapTransport(dict(keys))), ExecutorConfig)
    assert decode(GuestSource(MapTransport(with_timeline)), ExecutorConfig) == plain


def test_the_agent_writes_its_phases_in_order(sandbox):
    """The agent's hooks: each step's end, the primary's exec, then the clock; stage 0's
    marks first. (In the sandbox the boot clock is the host's, so only the order counts.)"""
    ident = sid()
    result = sandbox.run(executor_config(session_config(ident, ["/bin/true"])),
                         env={boottime.MARKS_ENV: STAGE0})
    assert result.returncode == 0, result.log
    timeline = {k[len(boottime.PREFIX):]: v for k, v in result.guestinfo.items()
                if k.startswith(boottime.PREFIX)}
    clock = float(timeline.pop("clock"))
    phases = sorted(((float(v.split()[0]), float(v.split()[1]), k) for k, v in timeline.items()))
    names = [name for _, _, name in phases]
    assert names[:4] == ["kernel", "stage0.modules", "stage0.root", "stage0.exec"], names
    for step in ("config", "rootfs", "hostname", "networks", "volumes"):
        assert step in names, names
    # the attach servers start after the launch (no RunBlock here): past the timeline,
    # which is written once the primary has started
    assert "attach" not in names, names
    assert f"exec:{ident}" in names
    assert names.index("config") < names.index("networks") < names.index("volumes") \
        < names.index(f"exec:{ident}")
    for (start, end, name), (next_start, _, _) in zip(phases, phases[1:]):
        assert start <= end <= next_start, (name, phases)
    assert phases[-1][1] <= clock


def test_no_timeline_without_stage0(sandbox):
    result = sandbox.run(executor_config(session_config(sid(), ["/bin/true"])))
    assert result.returncode == 0, result.log
    assert not [k for k in result.guestinfo if k.startswith(boottime.PREFIX)]
