"""TCLO ping, reset and OS_Halt driving the real agent in `tether sandbox` to stop its
primary, with guestinfo and TCLO both served by the simulated hypervisor over the
unix-socket bridge (`tether sandbox --backdoor-sim SOCKET`)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from helpers import REPO, executor_config, session_config, sid, simulated_hypervisor

TIMEOUT = 120.0


def host_view(config) -> dict[str, str]:
    """What vSphere shows the guest: guestinfo.* keys only, "" stored as <nil>."""
    from extraconfig.codec import encode
    return {k: ("<nil>" if v == "" else v) for k, v in encode(config).items()
            if k.startswith("guestinfo.")}


@pytest.fixture
def hypervisor(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "tether", "sandbox", "--help"],
                               capture_output=True, text=True, cwd=REPO, timeout=60).stdout
    if "--backdoor-sim" not in help_text:
        pytest.fail("tether sandbox has no --backdoor-sim option yet: the hook in "
                    "tether/sandbox.py and tether/agent.py (docs/vsphere.md) is missing")
    with simulated_hypervisor(tmp_path) as found:
        yield found


def ask(sim, command: str) -> str:
    sim.post_tclo(command)
    reply = sim.wait_tclo_reply(command, TIMEOUT)
    assert reply is not None, f"no reply to {command!r}"
    return reply


def test_tclo_ping_reset_and_halt_stop_the_primary(sandbox, hypervisor):
    sim, path = hypervisor
    primary = session_config(sid(), ["/bin/sleep", "600"])
    config = executor_config(primary)
    # the sandbox has its own network namespace: a static address on a stand-in NIC
    from extraconfig.types import IPNet
    from tether.config import Common, NetworkEndpoint
    config.networks = {"public": NetworkEndpoint(common=Common(id="eth0"), static=True,
                                                 ip=IPNet.parse("10.79.0.2/24"))}
    sim.guestinfo.update(host_view(config))
    started = f"guestinfo.vice..sessions|{primary.common.id}.started"
    status = f"guestinfo.vice..sessions|{primary.common.id}.status"

    box = sandbox.start(config, extra_args=["--backdoor-sim", path])
    # The config came over RPCI: the primary runs and `started` went back the same way.
    assert sim.wait_for(lambda s: s.guestinfo.get(started) == "true", TIMEOUT), box.log_text()
    assert "using RPCI over the VMware backdoor" in box.log_text()

    assert ask(sim, "reset") == "OK ATR toolbox"
    assert ask(sim, "ping") == "OK "
    assert ask(sim, "Capabilities_Register") == "OK "
    assert "tools.capability.statechange" in sim.capabilities
    address = "10.79.0.2"
    assert ask(sim, "Set_Option broadcastIP 1") == "OK "
    assert sim.guestinfo.get("guestinfo.ip") == address

    assert ask(sim, "OS_Halt") == "OK "
    result = box.wait(TIMEOUT)
    assert "OS_Halt: stopping primary" in result.log
    assert sim.statechanges == ["1 1"], result.log
    # sleep died of the StopSignal (SIGTERM): status -1, as the reference writes it.
    assert sim.guestinfo[status] == "-1"
    assert result.returncode == 128 + signal.SIGTERM


def test_reboot_is_refused_and_the_primary_keeps_running(sandbox, hypervisor):
    sim, path = hypervisor
    primary = session_config(sid(), ["/bin/sleep", "600"])
    config = executor_config(primary)
    # the sandbox has its own network namespace: a static address on a stand-in NIC
    from extraconfig.types import IPNet
    from tether.config import Common, NetworkEndpoint
    config.networks = {"public": NetworkEndpoint(common=Common(id="eth0"), static=True,
                                                 ip=IPNet.parse("10.79.0.2/24"))}
    sim.guestinfo.update(host_view(config))
    started = f"guestinfo.vice..sessions|{primary.common.id}.started"
    box = sandbox.start(config, extra_args=["--backdoor-sim", path])
    assert sim.wait_for(lambda s: s.guestinfo.get(started) == "true", TIMEOUT), box.log_text()
    assert ask(sim, "OS_Reboot") == "OK "
    assert sim.wait_for(lambda s: s.statechanges, TIMEOUT)
    assert sim.statechanges == ["0 2"]
    assert box.proc.poll() is None
    box.signal(signal.SIGTERM)
    result = box.wait(TIMEOUT)
    assert "OS_Reboot refused" in result.log
