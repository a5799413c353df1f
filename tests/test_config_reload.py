"""The reload rule: read-only fields from the host, read-write fields the agent's, merged
in place by the codec's own scopes."""
from __future__ import annotations

from extraconfig.codec import decode, encode
from extraconfig.gotime import GoTime
from extraconfig.types import IP, IPNet
from tether.config import (Cmd, Common, ContainerNetwork, Diagnostics, ExecutorConfig, ExitLog,
                           MountSpec, NetworkEndpoint, SessionConfig, name_sessions,
                           take_host_fields)


def host_config(args=("/bin/sleep", "1"), debug=0, gateway="10.0.0.1/24", extra=False):
    sessions = {"main": SessionConfig(common=Common(id="main"),
                                      cmd=Cmd(path=args[0], args=list(args)), restart=True)}
    if extra:
        sessions["added"] = SessionConfig(cmd=Cmd(path="/bin/true", args=["/bin/true"]))
    network = ContainerNetwork(common=Common(name="net"), gateway=IPNet.parse(gateway))
    return ExecutorConfig(
        common=Common(id="main", name="box"), diagnostics=Diagnostics(debug_level=debug),
        sessions=sessions, mounts={"data": MountSpec(path="/data")},
        networks={"net": NetworkEndpoint(common=Common(id="eth0", name="net"), network=network)})


def test_read_only_from_the_host_read_write_ours_in_place():
    ours = decode(encode(host_config()), ExecutorConfig)
    main = ours.sessions["main"]
    endpoint = ours.networks["net"]
    # what the agent wrote back while running
    main.started = "true"
    main.exit_status = 3
    main.detail.start_time = 1700000000
    main.diagnostics.resurrection_count = 2
    main.diagnostics.exit_logs = [ExitLog(time=GoTime.now(), exit_status=3, message="exited 3")]
    endpoint.assigned = IPNet.parse("10.0.0.7/24")
    endpoint.network.assigned.gateway = IPNet.parse("10.0.0.1/24")
    endpoint.network.assigned.nameservers = [IP.parse("10.0.0.53")]
    ours.sessions["exec1"] = SessionConfig(common=Common(id="exec1"))   # an exec'd session

    # the host changed read-only fields and added a session; its read-write keys are
    # whatever it last read (here: the defaults of a fresh config)
    fresh = decode(encode(host_config(args=("/bin/sleep", "2"), debug=2,
                                      gateway="10.0.0.254/24", extra=True)), ExecutorConfig)
    name_sessions(fresh)
    take_host_fields(ours, fresh)

    assert ours.sessions["main"] is main and ours.networks["net"] is endpoint   # in place
    assert main.cmd.args == ["/bin/sleep", "2"] and ours.diagnostics.debug_level == 2
    assert str(endpoint.network.gateway) == "10.0.0.254/24"
    assert (main.started, main.exit_status, main.detail.start_time) == ("true", 3, 1700000000)
    assert main.diagnostics.resurrection_count == 2
    assert [e.message for e in main.diagnostics.exit_logs] == ["exited 3"]
    assert str(endpoint.assigned) == "10.0.0.7/24"
    assert str(endpoint.network.assigned.gateway) == "10.0.0.1/24"
    assert [str(ip) for ip in endpoint.network.assigned.nameservers] == ["10.0.0.53"]
    assert ours.sessions["added"].common.id == "added"          # new: named by its key
    assert "exec1" in ours.sessions                              # ours alone: kept
    assert set(ours.mounts) == {"data"}


def test_the_debug_check_refuses_config_changes_off_the_loop_thread():
    import threading

    import pytest
    from tether.config import ConfigOwnershipError, enforce_loop_ownership
    config = host_config()
    errors = []

    def elsewhere():
        try:
            config.networks["net"].assigned = IPNet.parse("10.0.0.9/24")
        except ConfigOwnershipError as err:
            errors.append(str(err))

    enforce_loop_ownership(threading.get_ident())
    try:
        config.sessions["main"].started = "true"          # the owner thread: fine
        worker = threading.Thread(target=elsewhere, name="dhcp-apply")
        worker.start()
        worker.join()
        assert errors and "NetworkEndpoint.assigned set on thread dhcp-apply" in errors[0]
        assert str(config.networks["net"].assigned) == ""  # the change did not happen
    finally:
        enforce_loop_ownership(None)
    worker = threading.Thread(target=elsewhere)            # off: anything goes again
    worker.start()
    worker.join()
    assert len(errors) == 1 and str(config.networks["net"].assigned) == "10.0.0.9/24"


def test_an_exec_cannot_take_the_id_of_a_configured_session_not_launched_yet():
    """Between a reload's reading of its config and the launch of its new sessions, an
    exec named as one of them is refused, not put in its place."""
    import pytest
    from extraconfig.transport import MapTransport
    from tether import agent
    from tether.extension import encode_config
    host = ExecutorConfig(common=Common(id="main"), sessions={
        sid: SessionConfig(common=Common(id=sid), cmd=Cmd(path="/bin/true", args=["/bin/true"]))
        for sid in ("main", "later")})
    the_agent = agent.Agent(MapTransport(dict(encode_config(host))), agent.Options(
        mode=agent.RunMode.PROCESS, attach_endpoints=[], vic_attach=[]))
    try:
        the_agent.load_config()              # read, nothing launched: the reload's window
        intruder = SessionConfig(common=Common(id="later"),
                                 cmd=Cmd(path="/bin/sh", args=["/bin/sh", "-c", "id"]))
        with pytest.raises(ValueError, match="session later already exists"):
            the_agent.exec_session(intruder)
        assert the_agent.config.sessions["later"].cmd.path == "/bin/true"
        assert "later" not in the_agent.sessions
    finally:
        the_agent.loop.close()
