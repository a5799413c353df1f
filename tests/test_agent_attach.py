"""The agent with the attach server in the sandbox: RunBlock released by an attach,
stdin reaching a session, exec of a new session."""
from __future__ import annotations

from extraconfig.transport import format_vmx
from helpers import connect_client, executor_config, session_config, sid
from tether.config import run_block_write_key
from tether.extension import encode_config


def collect(stream, timeout: float = 60.0) -> tuple[bytes, object]:
    out, code = b"", None
    for kind, data in stream.events(timeout):
        if kind == "exit":
            code = data
            break
        out += data
    return out, code


def test_runblock_waits_for_attach_then_stdin_round_trips(sandbox, tmp_path):
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sh", "-c", "echo hello; read line; echo got:$line"],
                             run_block=True, open_stdin=True, attach=True)
    box = sandbox.start(executor_config(primary), attach_socket=socket_path)
    box.wait_for_log(r"waits for an attach to release RunBlock")
    assert "started: pid" not in box.log_text()     # held until released
    with connect_client(f"unix:{socket_path}", box) as client:
        stream = client.attach(primary.common.id)
        client.unblock(primary.common.id)
        box.wait_for_log(r"started: pid")
        stream.write(b"ping\n")
        out, code = collect(stream)
    result = box.wait()
    assert out == b"hello\ngot:ping\n", result.log
    assert result.returncode == 0
    assert result.session(primary.common.id).started == "true"


def test_a_head_shaped_map_whose_read_write_runblock_is_true_blocks_until_unblocked(
        sandbox, tmp_path):
    """A port layer of VIC v1.2+ writes RunBlock only as the read-write key."""
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/echo", "released"], attach=True)
    keys = encode_config(executor_config(primary))
    del keys[f"guestinfo.vice./sessions|{primary.id}/runblock"]     # "false" there
    keys[run_block_write_key(primary.id)] = "true"
    vmx = tmp_path / "head.vmx"
    vmx.write_text(format_vmx(keys))
    box = sandbox.start(vmx, attach_socket=socket_path)
    box.wait_for_log(r"waits for an attach to release RunBlock")
    assert "started: pid" not in box.log_text()     # held until released
    with connect_client(f"unix:{socket_path}", box) as client:
        stream = client.attach(primary.id)
        client.unblock(primary.id)
        out, code = collect(stream)
    result = box.wait()
    assert (out, code) == (b"released\n", 0), result.log
    assert result.session(primary.id).started == "true"
    # released through the msgpack attach too: a restart must not block again
    assert result.guestinfo[run_block_write_key(primary.id)] == "false"
    assert result.session(primary.id).run_block is False


def test_exec_starts_a_new_session(sandbox, tmp_path):
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary), attach_socket=socket_path, stop_grace=2)
    box.wait_for_log(r"serving 1 session")
    with connect_client(f"unix:{socket_path}", box) as client:
        stream = client.exec(["/bin/sh", "-c", "echo from-exec; exit 4"],
                             env=["PATH=/bin:/usr/bin"])
        out, code = collect(stream)
    assert out == b"from-exec\n"
    assert code == 4
    box.signal(15)
    result = box.wait()
    assert result.returncode == 128 + 15


def test_the_attach_server_starts_after_the_launch_and_replays_from_the_first_byte(
        sandbox, tmp_path):
    """Without RunBlock the primary is launched before the attach server listens (its exec
    waits for nothing); a client that comes later still gets its output from the first
    byte, from the replay ring."""
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sh", "-c", "echo one; echo two; read line; "
                                     "echo got:$line"], open_stdin=True, attach=True)
    box = sandbox.start(executor_config(primary), attach_socket=socket_path)
    box.wait_for_log(r"attach server on")
    log = box.log_text()
    assert log.index("started: pid") < log.index("attach server on"), log
    with connect_client(f"unix:{socket_path}", box) as client:
        stream = client.attach(primary.common.id, replay=True)
        stream.write(b"late\n")
        out, code = collect(stream)
    result = box.wait()
    assert out == b"one\ntwo\ngot:late\n", result.log
    assert (code, result.returncode) == (0, 0)


def test_with_runblock_the_attach_server_starts_before_the_launch(sandbox, tmp_path):
    """A RunBlock session waits for the host to attach: the server listens before it."""
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/echo", "released"], run_block=True, attach=True)
    box = sandbox.start(executor_config(primary), attach_socket=socket_path)
    box.wait_for_log(r"waits for an attach to release RunBlock")
    log = box.log_text()
    assert log.index("attach server on") < log.index("waits for an attach"), log
    with connect_client(f"unix:{socket_path}", box) as client:
        stream = client.attach(primary.common.id, replay=True)
        client.unblock(primary.common.id)
        out, code = collect(stream)
    result = box.wait()
    assert (out, code) == (b"released\n", 0), result.log
