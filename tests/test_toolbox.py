"""The toolbox's TCLO duties, driven by the simulated hypervisor.

The agent here is a small stand-in with the real event loop (running in a thread) and a
real primary process; `test_toolbox_sandbox.py` drives the real agent in `tether sandbox`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from extraconfig.backdoor.rpci import RpciTransport
from helpers import missing
from extraconfig.backdoor.simulator import SimulatedHypervisor
from tether.config import Common, ExecutorConfig, SessionConfig
from tether.loop import Loop
from tether.toolbox import first_ipv4, start_toolbox, start_toolbox_for

TIMEOUT = 60.0


class ProcessSession:
    """A primary session: a real process in its own group, signalled as a group."""

    def __init__(self, script: str, stop_signal: str = "", ready_file: str | None = None):
        self.id = "primary"
        self.config = SessionConfig(common=Common(id=self.id), stop_signal=stop_signal)
        self.proc = subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)
        self.signals: list[int] = []
        if ready_file is not None:   # the script's traps are set: signals can be sent
            assert wait_until(lambda: os.path.exists(ready_file)), "primary never got ready"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.running:
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT)


class LoopAgent:
    """What the toolbox uses of the agent (the host interface): loop, primary,
    stop_session and request_stop. The stop is the agent's own StopSequence; a Popen has
    no reaper callback, so the loop looks at it to tell the sequence it ended."""

    def __init__(self):
        self.loop = Loop()
        self.config = ExecutorConfig(common=Common(id="primary"))
        self.sessions: dict = {}
        self.stop_reasons: list[str] = []
        self._done = False
        self._thread = threading.Thread(
            target=lambda: self.loop.run_until(lambda: self._done), daemon=True)
        self._thread.start()

    @property
    def primary(self):
        return self.sessions.get(self.config.id)

    def stop_session(self, session, *, grace, kill_wait, done):
        from tether.supervisor import StopSequence
        sequence = StopSequence(self.loop, session, grace, kill_wait)
        sequence.add_done(done)

        def watch():
            if not session.running:
                sequence.ended()
            elif sequence.outcome is None:
                self.loop.call_later(0.02, watch)
        sequence.begin()
        watch()

    def request_stop(self, reason: str) -> None:
        self.stop_reasons.append(reason)

    def close(self) -> None:
        self._done = True
        self.loop.call_soon_threadsafe(lambda: None)
        self._thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def rig():
    sim = SimulatedHypervisor()
    agent = LoopAgent()
    transport = RpciTransport(sim)
    toolbox = start_toolbox_for(agent, transport, halt_grace=2.0, kill_wait=TIMEOUT)
    sessions = []
    try:
        yield sim, agent, toolbox, sessions
    finally:
        toolbox.stop(timeout=TIMEOUT)
        for session in sessions:
            session.kill()
        agent.close()


def wait_until(predicate, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def ask(sim, command: str) -> str:
    sim.post_tclo(command)
    reply = sim.wait_tclo_reply(command, TIMEOUT)
    assert reply is not None, f"no reply to {command!r}"
    return reply


def test_reset_ping_and_unknown_commands(rig):
    sim, *_ = rig
    assert ask(sim, "reset") == "OK ATR toolbox"
    assert ask(sim, "ping") == "OK "
    assert ask(sim, "Vix_1_Relayed_Command x") == "ERROR Unknown Command"
    assert ask(sim, "ping") == "OK "


def test_capabilities_register(rig):
    sim, *_ = rig
    assert ask(sim, "Capabilities_Register") == "OK "
    assert "tools.capability.statechange" in sim.capabilities
    assert sim.tools_version == str(0x7FFFFFFF)


def test_broadcast_ip_publishes_guestinfo_ip(rig):
    sim, *_ = rig
    address = first_ipv4()
    if address is None:
        missing("ipv4 address", "no interface here has a non-loopback IPv4 address")
    ip_out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                            text=True, check=True).stdout
    assert f" {address}/" in ip_out and not address.startswith("127.")
    assert ask(sim, "Set_Option broadcastIP 1") == "OK "
    assert sim.guestinfo["guestinfo.ip"] == address
    assert ask(sim, "Set_Option synctime 0") == "OK "   # other options: acknowledged


def test_reboot_is_refused_honestly(rig):
    sim, agent, _, sessions = rig
    primary = ProcessSession("sleep 600")
    sessions.append(primary)
    agent.sessions[primary.id] = primary
    assert ask(sim, "OS_Reboot") == "OK "
    assert sim.wait_for(lambda s: s.statechanges, TIMEOUT)
    assert sim.statechanges == ["0 2"]
    assert primary.running and primary.signals == [] and agent.stop_reasons == []


@pytest.mark.parametrize("op,state", [("OS_PowerOn", 3), ("OS_Resume", 4), ("OS_Suspend", 5)])
def test_power_ops_with_nothing_to_do_succeed(rig, op, state):
    sim, agent, *_ = rig
    assert ask(sim, op) == "OK "
    assert sim.wait_for(lambda s: s.statechanges, TIMEOUT)
    assert sim.statechanges == [f"1 {state}"]
    assert agent.stop_reasons == []


def test_halt_stops_primary_with_its_stop_signal(rig, tmp_path):
    sim, agent, _, sessions = rig
    ready = tmp_path / "ready"
    primary = ProcessSession(f"trap 'exit 7' INT; touch {ready}; while :; do sleep 0.1; done",
                             stop_signal="SIGINT", ready_file=str(ready))
    sessions.append(primary)
    agent.sessions[primary.id] = primary
    assert ask(sim, "OS_Halt") == "OK "
    assert sim.wait_for(lambda s: s.statechanges, TIMEOUT)
    assert sim.statechanges == ["1 1"]
    assert primary.proc.wait(TIMEOUT) == 7
    assert primary.signals == [signal.SIGINT]
    assert wait_until(lambda: agent.stop_reasons)
    assert "OS_Halt" in agent.stop_reasons[0]


def test_halt_kills_a_primary_that_ignores_the_stop_signal(rig, tmp_path):
    sim, agent, _, sessions = rig
    ready = tmp_path / "ready"
    primary = ProcessSession(f"trap '' TERM; touch {ready}; while :; do sleep 0.1; done",
                             ready_file=str(ready))
    sessions.append(primary)
    agent.sessions[primary.id] = primary
    assert ask(sim, "OS_Halt") == "OK "
    assert sim.wait_for(lambda s: s.statechanges, TIMEOUT)
    assert primary.signals == [signal.SIGTERM, signal.SIGKILL]
    assert primary.proc.wait(TIMEOUT) == -signal.SIGKILL
    assert sim.statechanges == ["1 1"]
    # request_stop runs on the agent's loop, after the toolbox handed it over.
    assert wait_until(lambda: agent.stop_reasons)
    assert "OS_Halt" in agent.stop_reasons[0]


def test_tclo_channel_failure_is_survived(rig):
    sim, *_ = rig
    assert ask(sim, "ping") == "OK "
    opens = sim.counts["open"]
    sim.inject("recvsize", 0)
    assert ask(sim, "ping") == "OK "
    assert sim.counts["open"] > opens


def test_toolbox_is_only_for_backdoor_transports():
    from extraconfig.transport import MapTransport
    assert start_toolbox_for(object(), MapTransport({})) is None


def test_stop_ends_the_poll_thread():
    sim = SimulatedHypervisor()
    agent = LoopAgent()
    try:
        toolbox = start_toolbox(agent, RpciTransport(sim).channel_factory)
        assert sim.wait_for(lambda s: s.counts["recvsize"] >= 2, TIMEOUT)
        toolbox.stop(timeout=TIMEOUT)
        assert not toolbox._thread.is_alive()
        assert sim.channels == {}   # the TCLO channel was closed
    finally:
        agent.close()


def test_power_ops_are_carried_out_one_at_a_time(tmp_path):
    """A host repeating OS_Halt while the first is being carried out gets open-vm-tools'
    refusal; it used to get a thread (and a stop sequence on the loop) per request."""
    sim = SimulatedHypervisor()
    agent = LoopAgent()
    toolbox = start_toolbox_for(agent, RpciTransport(sim), halt_grace=TIMEOUT,
                                kill_wait=TIMEOUT)
    ready = tmp_path / "ready"
    primary = ProcessSession(f"trap '' TERM; touch {ready}; while :; do sleep 0.1; done",
                             ready_file=str(ready))
    try:
        agent.sessions[primary.id] = primary
        assert ask(sim, "OS_Halt") == "OK "
        assert wait_until(lambda: primary.signals == [signal.SIGTERM])
        replies = [ask(sim, op) for op in ["OS_Halt"] * 20 + ["OS_PowerOn"]]
        assert replies == ["ERROR State change already in progress"] * 21
        assert [t.name for t in threading.enumerate()].count("toolbox-OS_Halt") == 1
        assert primary.signals == [signal.SIGTERM]
        primary.kill()                      # the halt in progress ends
        assert sim.wait_for(lambda s: s.statechanges, TIMEOUT)
        assert wait_until(lambda: agent.stop_reasons)
        assert sim.statechanges == ["1 1"] and len(agent.stop_reasons) == 1
        assert wait_until(lambda: "toolbox-OS_Halt" not in
                          [t.name for t in threading.enumerate()])
        assert ask(sim, "OS_PowerOn") == "OK "   # the next one is carried out
        assert sim.wait_for(lambda s: len(s.statechanges) == 2, TIMEOUT)
        assert sim.statechanges == ["1 1", "1 3"]
    finally:
        primary.kill()
        toolbox.stop(timeout=TIMEOUT)
        agent.close()


def test_what_the_host_sends_reaches_the_log_clipped_and_rate_limited(rig, caplog):
    """Unknown commands are logged: each one used to be, whole (up to the backdoor's
    64 MiB message), as often as the host sent them."""
    from tether.console import RateLimit
    sim, _, toolbox, _ = rig
    toolbox._host_log = RateLimit(burst=3, interval=10.0, clock=lambda: 0.0)
    with caplog.at_level("INFO", logger="tether.toolbox"):
        assert ask(sim, "x" * (1 << 20)) == "ERROR Unknown Command"
        for i in range(30):
            assert ask(sim, f"Unknown_{i}\x1b[2J") == "ERROR Unknown Command"
    lines = [r.getMessage() for r in caplog.records if "unknown TCLO command" in r.getMessage()]
    assert len(lines) == 3
    assert all(len(line) < 200 and line.isprintable() for line in lines)
    assert "(1048576 in all)" in lines[0]
