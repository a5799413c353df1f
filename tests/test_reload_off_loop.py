"""A SIGHUP reload never holds the agent's loop: a new volume whose disk is not there yet
is mounted on a worker thread, and a new DHCP endpoint's first lease is applied when it
comes. Meanwhile the agent answers its clients."""
from __future__ import annotations

import signal
import time

from helpers import connect_client, executor_config, session_config, sid, write_config


def reload_and_ping(box, socket_path, config) -> dict:
    """Write `config` for the next reload, SIGHUP, and ping while the reload's slow part
    (30 s of waiting for a disk or a lease) is under way: the answer must come at once,
    not after it (the client gives up after 10 s)."""
    with connect_client(f"unix:{socket_path}", box, timeout=10) as client:
        write_config(config, box.dir)
        box.signal(signal.SIGHUP)
        box.wait_for_log(r"reloading the configuration")
        time.sleep(0.5)                  # the reload is now in its slow part
        start = time.monotonic()
        reply = client.ping("during the reload")
        reply["waited"] = time.monotonic() - start
        reply["sessions"] = [s["id"] for s in client.list()]
    return reply


def test_a_reload_adding_a_volume_whose_disk_is_missing_does_not_hold_the_loop(sandbox,
                                                                               tmp_path):
    from tether.config import MountSpec
    from extraconfig.types import URL
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    config = executor_config(primary)
    box = sandbox.start(config, attach_socket=socket_path, stop_grace=2)
    box.wait_for_log(r"serving 1 session")
    config.mounts = {"data": MountSpec(source=URL(scheme="label", host="no-such-disk"),
                                       path="/mnt/tether-test-nodata")}
    reply = reload_and_ping(box, socket_path, config)
    assert reply["data"] == "during the reload"
    assert "reload: mounting data" in box.log_text()
    box.signal(signal.SIGTERM)
    box.wait()


def test_a_reload_adding_a_dhcp_endpoint_does_not_wait_for_its_lease(sandbox, tmp_path):
    from tether.config import ContainerNetwork, NetworkEndpoint, Common
    from extraconfig.types import IPNet
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    config = executor_config(primary)
    # a stand-in NIC for eth9 (the sandbox makes one per endpoint at start), static first
    config.networks = {"fixed": NetworkEndpoint(
        common=Common(id="eth9"), static=True, ip=IPNet.parse("10.99.0.2/24"),
        network=ContainerNetwork(common=Common(name="fixed")))}
    box = sandbox.start(config, attach_socket=socket_path, stop_grace=2)
    box.wait_for_log(r"serving 1 session")
    # ... then a DHCP endpoint on it: nobody will answer on a dummy link
    config.networks["dynamic"] = NetworkEndpoint(
        common=Common(id="eth9"), network=ContainerNetwork(common=Common(name="dynamic")))
    reply = reload_and_ping(box, socket_path, config)
    assert reply["data"] == "during the reload"
    box.wait_for_log(r"network dynamic: asking for a DHCP lease on eth9")
    box.signal(signal.SIGTERM)
    box.wait()
