"""The backdoor RPCI transport against the simulated hypervisor, and detection on this
machine (not a VMware guest: it must never fault and must fall back)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extraconfig.backdoor import BackdoorError, MessageChannel, open_transport
from extraconfig.backdoor.protocol import (
    CMD_MESSAGE, MAGIC, MSG_RECVSIZE, PORT, PROTO_RPCI, PROTO_TCLO, STATUS_CPT, Regs, pack,
)
from extraconfig.backdoor.rpci import RpciTransport, RpcToolTransport
from extraconfig.backdoor.simulator import MAX_CHANNELS, SimulatedHypervisor
from extraconfig.transport import GuestSink, GuestSource
from helpers import missing, not_applicable, simulated_hypervisor

REPO = Path(__file__).resolve().parents[1]


class ListLog:
    """A logger stand-in that keeps the lines, to check what the agent is told."""

    def __init__(self):
        self.lines: list[str] = []

    def _add(self, msg, *args):
        self.lines.append(msg % args if args else msg)

    info = warning = error = debug = _add


def transport_for(sim: SimulatedHypervisor) -> RpciTransport:
    log = ListLog()
    transport = open_transport(log, ports=sim)
    assert transport is not None, log.lines
    assert "using RPCI over the VMware backdoor" in log.lines[-1], log.lines
    return transport


# -- info-get ---------------------------------------------------------------------------------
@pytest.mark.parametrize("high_bandwidth", [True, False])
def test_info_get_present_missing_nil_and_empty(high_bandwidth):
    sim = SimulatedHypervisor({"guestinfo.present": "some value",
                               "guestinfo.nil": "<nil>",
                               "guestinfo.empty": ""}, high_bandwidth=high_bandwidth)
    transport = transport_for(sim)
    assert transport.info_get("guestinfo.present") == "some value"
    assert transport.info_get("guestinfo.missing") is None
    assert transport.info_get("guestinfo.nil") == "<nil>"
    assert transport.info_get("guestinfo.empty") == ""
    # The reader's rules on top: "" is missing, <nil> is the empty string.
    source = GuestSource(transport)
    assert source["present"] == "some value"
    assert source["nil"] == ""
    assert "empty" not in source and "missing" not in source
    used = "hb_in" if high_bandwidth else "recvpayload"
    assert sim.counts[used] > 0
    assert sim.rpci_log[-1] == "info-get guestinfo.missing"


# -- info-set ---------------------------------------------------------------------------------
def test_info_set_long_value_over_high_bandwidth():
    sim = SimulatedHypervisor()
    transport = transport_for(sim)
    value = "".join(chr(0x20 + i % 90) for i in range(300_000))
    transport.info_set("guestinfo.long", value)
    assert sim.guestinfo["guestinfo.long"] == value
    assert sim.counts["hb_out"] >= 1 and sim.counts["sendpayload"] == 0
    assert transport.info_get("guestinfo.long") == value
    assert sim.counts["hb_in"] >= 1 and sim.counts["recvpayload"] == 0


def test_info_set_low_bandwidth_every_length_modulo_four():
    sim = SimulatedHypervisor(high_bandwidth=False)
    transport = transport_for(sim)
    for n in range(0, 10):
        value = "é" * n + "x" * (n % 3)
        transport.info_set(f"guestinfo.k{n}", value)
        assert sim.guestinfo[f"guestinfo.k{n}"] == value
        assert transport.info_get(f"guestinfo.k{n}") == value
    assert sim.counts["hb_out"] == 0 and sim.counts["hb_in"] == 0


def test_guest_sink_writes_nil_and_drops_read_only_keys():
    sim = SimulatedHypervisor()
    sink = GuestSink(transport_for(sim))
    sink("guestinfo.vice..sessions|x.started", "")
    sink("guestinfo.vice./common/id", "must not be written")
    assert sim.guestinfo == {"guestinfo.vice..sessions|x.started": "<nil>"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=300), high_bandwidth=st.booleans())
def test_any_bytes_round_trip(value, high_bandwidth):
    sim = SimulatedHypervisor(high_bandwidth=high_bandwidth)
    transport = RpciTransport(sim)
    text = value.decode("utf-8", "surrogateescape")
    transport.info_set("guestinfo.bytes", text)
    assert sim.guestinfo["guestinfo.bytes"] == text
    assert transport.info_get("guestinfo.bytes") == text


# -- channels, errors, retries --------------------------------------------------------------
def test_open_falls_back_to_no_cookie_on_old_hosts():
    sim = SimulatedHypervisor({"guestinfo.a": "b"}, cookies=False)
    transport = transport_for(sim)
    assert transport.info_get("guestinfo.a") == "b"
    assert all(ch.cookie is None for ch in sim.channels.values())
    assert sim.counts["open"] == 2   # with the cookie flag (refused), then without


@pytest.mark.parametrize("step", ["sendsize", "sendpayload", "recvpayload", "recvstatus",
                                  "hb_out", "hb_in"])
def test_checkpoint_restarts_the_operation(step):
    sim = SimulatedHypervisor({"guestinfo.k": "value of some length"},
                              high_bandwidth=step.startswith("hb_"))
    transport = transport_for(sim)
    opens = sim.counts["open"]
    if step == "sendsize":
        # A failed size step is an error, not a checkpoint: the channel is reopened.
        sim.inject(step, STATUS_CPT)
        assert transport.info_get("guestinfo.k") == "value of some length"
        assert sim.counts["open"] == opens + 1
        return
    sim.inject(step, STATUS_CPT, times=2)
    assert transport.info_get("guestinfo.k") == "value of some length"
    assert sim.counts["open"] == opens   # retried on the same channel
    assert sim.counts[step] >= 3


def test_channel_error_is_retried_on_a_fresh_channel():
    sim = SimulatedHypervisor({"guestinfo.k": "v"})
    transport = transport_for(sim)
    opens = sim.counts["open"]
    sim.inject("recvsize", 0)
    assert transport.info_get("guestinfo.k") == "v"
    assert sim.counts["open"] == opens + 1
    assert sim.counts["close"] >= 1


def test_persistent_channel_error_is_reported():
    sim = SimulatedHypervisor({"guestinfo.k": "v"})
    transport = transport_for(sim)
    sim.inject("sendsize", 0, times=2)
    with pytest.raises(BackdoorError, match="send size failed"):
        transport.info_get("guestinfo.k")
    assert transport.info_get("guestinfo.k") == "v"   # and it recovers afterwards


def test_endless_checkpoints_give_up():
    sim = SimulatedHypervisor({"guestinfo.k": "v"}, high_bandwidth=False)
    channel = MessageChannel(sim, PROTO_RPCI)
    sim.inject("sendpayload", STATUS_CPT, times=100)
    with pytest.raises(BackdoorError, match="checkpoints in a row"):
        channel.send(b"info-get guestinfo.k")


def test_channel_table_full_and_wrong_cookie():
    sim = SimulatedHypervisor()
    channels = [MessageChannel(sim, PROTO_RPCI) for _ in range(MAX_CHANNELS)]
    with pytest.raises(BackdoorError, match="refused to open"):
        MessageChannel(sim, PROTO_RPCI)
    channels[0].close()
    fresh = MessageChannel(sim, PROTO_RPCI)
    # A call with a stale cookie is refused by the host.
    bad = sim.backdoor(Regs(eax=MAGIC, ecx=pack(MSG_RECVSIZE, CMD_MESSAGE),
                            edx=pack(fresh.id, PORT), esi=fresh.cookie_high ^ 1,
                            edi=fresh.cookie_low))
    assert not (bad.ecx >> 16) & 1
    for channel in channels[1:] + [fresh]:
        channel.close()
    assert sim.channels == {}


def test_protocol_error_when_reply_is_not_read():
    sim = SimulatedHypervisor()
    channel = MessageChannel(sim, PROTO_RPCI)
    channel.send(b"info-get guestinfo.x")
    with pytest.raises(BackdoorError, match="send size failed"):
        channel.send(b"info-get guestinfo.y")   # the VMX wants the reply read first


def test_tclo_messages_reach_the_guest_and_replies_the_host():
    sim = SimulatedHypervisor()
    channel = MessageChannel(sim, PROTO_TCLO)
    channel.send(b"")
    assert channel.receive() is None          # nothing posted yet
    sim.post_tclo("ping")
    channel.send(b"")
    assert channel.receive() == b"ping"
    channel.send(b"OK ")
    assert sim.wait_tclo_reply("ping", timeout=5) == "OK "


# -- QEMU-like vmport: GETVERSION yes, RPCI no ----------------------------------------------
def test_vmport_without_rpci_falls_back_with_a_clear_log_line():
    sim = SimulatedHypervisor(rpci=False)
    log = ListLog()
    assert open_transport(log, ports=sim) is None
    assert sim.counts["getversion"] == 1
    assert "GETVERSION answered with the VMware magic" in log.lines[-1]
    assert "RPC channel is unusable" in log.lines[-1]
    assert "falling back" in log.lines[-1]


# -- another process through the unix-socket bridge -------------------------------------------
@pytest.fixture
def bridged(tmp_path):
    with simulated_hypervisor(tmp_path, {"guestinfo.k": "over the socket"}) as found:
        yield found


def test_socket_bridge_carries_both_paths(bridged):
    sim, path = bridged
    log = ListLog()
    transport = open_transport(log, sim_socket=path)
    assert transport is not None, log.lines
    assert transport.info_get("guestinfo.k") == "over the socket"
    transport.info_set("guestinfo.big", "z" * 200_000)
    assert sim.guestinfo["guestinfo.big"] == "z" * 200_000
    transport.close()
    transport.ports.close()


def test_sim_socket_missing_is_a_clear_fallback(tmp_path):
    log = ListLog()
    assert open_transport(log, sim_socket=str(tmp_path / "nothing.sock")) is None
    assert "cannot reach the simulated hypervisor" in log.lines[-1]


# -- vmware-rpctool -----------------------------------------------------------------------------
def test_rpctool_transport_runs_the_tool_per_request(bridged, tmp_path):
    """The tool's command-line contract (request as one argument; reply on stdout and
    exit 0, or the reason on stderr and exit 1), played by a script that forwards the
    request to the simulated hypervisor: open-vm-tools' binary cannot run off VMware."""
    sim, path = bridged
    tool = tmp_path / "vmware-rpctool"
    tool.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from extraconfig.backdoor.bridge import SocketPorts
        from extraconfig.backdoor.rpci import RpciTransport
        reply = RpciTransport(SocketPorts({path!r})).request(sys.argv[1])
        if reply.ok:
            print(reply.text)
        else:
            print(reply.text, file=sys.stderr)
        sys.exit(0 if reply.ok else 1)
        """))
    tool.chmod(0o755)
    transport = RpcToolTransport(str(tool))
    assert transport.info_get("guestinfo.k") == "over the socket"
    assert transport.info_get("guestinfo.none") is None
    transport.info_set("guestinfo.set", "a b  c")
    assert sim.guestinfo["guestinfo.set"] == "a b  c"
    with pytest.raises(BackdoorError, match="Permission denied"):
        transport.info_set("other.key", "x")


# -- this machine: never fault, fall back ------------------------------------------------------
PROBE_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from extraconfig.backdoor import open_transport, native
print("extension", native.extension_available())
print("vendor", native.hypervisor_vendor())
print("probe", native.probe())
print("transport", open_transport(logging.getLogger("t")))
"""


def run_probe(extra_env=None, prelude=""):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(extra_env or {}))
    return subprocess.run([sys.executable, "-c", prelude + PROBE_SCRIPT], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def on_vmware() -> bool:
    from extraconfig.backdoor import native
    return native.hypervisor_vendor() == "VMwareVMware"


def test_probing_this_machine_never_faults_and_falls_back():
    if on_vmware():
        not_applicable("this is a VMware guest: the backdoor is real here")
    run = run_probe()
    # A fault would kill the interpreter with SIGSEGV (returncode -11).
    assert run.returncode == 0, run.stderr
    assert "transport None" in run.stdout
    assert "falling back to the next transport" in run.stdout
    assert "no VMware backdoor" in run.stdout


def test_without_the_extension_import_and_probe_still_work():
    if on_vmware():
        not_applicable("this is a VMware guest: the backdoor is real here")
    prelude = textwrap.dedent("""\
        import sys
        class NoPortIO:
            def find_spec(self, name, path=None, target=None):
                if name == "extraconfig.backdoor._portio":
                    raise ImportError("extension not built (blocked for this test)")
        sys.meta_path.insert(0, NoPortIO())
        """)
    run = run_probe(prelude=prelude)
    assert run.returncode == 0, run.stderr
    assert "extension (False" in run.stdout
    assert "the port I/O extension is not available" in run.stdout
    assert "transport None" in run.stdout


def test_extension_refuses_port_io_without_permission():
    """The C layer itself refuses (no instruction runs) in a thread never granted access."""
    from extraconfig.backdoor import native
    if native._portio is None:
        missing("portio extension", "the port I/O extension is not built here (make setup "
                "builds it with gcc and python3-dev)")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent("""\
        import threading
        from extraconfig.backdoor import _portio
        out = []
        def attempt():
            try:
                _portio.backdoor((0x564D5868, 0, 10, 0x5658, 0, 0, 0))
                out.append("ran")
            except PermissionError as err:
                out.append("refused: %s" % err)
        t = threading.Thread(target=attempt); t.start(); t.join()
        print(out[0])
        """)], capture_output=True, text=True, cwd=REPO, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("refused: this thread has no I/O port access")


def test_a_fault_in_the_probe_child_is_reported_not_fatal(monkeypatch):
    """If GETVERSION faults (as a 4-byte inl without all its ports granted did, under
    QEMU), only the forked child dies; the caller gets the reason. The CPU's #GP is
    played by the child sending itself SIGSEGV, as the kernel would."""
    import signal
    import types

    from extraconfig.backdoor import native

    def faulting_backdoor(_regs):
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(native, "_portio", types.SimpleNamespace(backdoor=faulting_backdoor))
    reason = native._getversion_in_child()
    assert reason == "GETVERSION faulted (SIGSEGV) in a child process: no usable backdoor port"
