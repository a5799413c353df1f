"""Exec'd sessions do not pile up: the last N finished ones are kept, older ones are
removed from `list` and from guestinfo. Exec IDs and copy paths are checked before
anything is made."""
from __future__ import annotations

import io
import os
import re
import time

import pytest

from helpers import connect_client, executor_config, session_config, sid


def finished(client, ids) -> bool:
    states = {s["id"]: s for s in client.list()}
    return all(i not in states or states[i]["run_state"]["Status"] in ("exited", "failed")
               for i in ids)


def test_only_the_last_finished_execs_are_kept_with_their_keys(sandbox, tmp_path):
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary), attach_socket=socket_path, stop_grace=2,
                        extra_args=["--keep-execs", "3"])
    box.wait_for_log(r"serving 1 session")
    ids = [f"ex{i:02d}" for i in range(12)]
    with connect_client(f"unix:{socket_path}", box) as client:
        client.exec(["/bin/sleep", "1000"], id="still-running", attach=False)
        for ident in ids:
            client.exec(["/bin/sh", "-c", "exit 3"], id=ident, attach=False)
            deadline = time.monotonic() + 60
            while not finished(client, [ident]):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        listed = {s["id"] for s in client.list()}
    assert listed == {primary.id, "still-running", *ids[-3:]}, listed
    box.signal(15)
    result = box.wait()
    in_keys = {m.group(1) for k in result.guestinfo        # ours too (the exit records)
               if (m := re.match(r"guestinfo\.vice\.\.(?:tether\.)?sessions\|(.+?)\.", k))}
    # the stop ended "still-running" too: now it is one of the last three that finished
    assert in_keys == {primary.id, "still-running", *ids[-2:]}, sorted(in_keys)
    assert result.guestinfo[f"guestinfo.vice..sessions|{ids[-1]}.status"] == "3"


def test_exec_ids_are_checked(sandbox, tmp_path):
    from tether.attach.client import ClientError
    socket_path = tmp_path / "attach.sock"
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary), attach_socket=socket_path, stop_grace=2)
    box.wait_for_log(r"serving 1 session")
    with connect_client(f"unix:{socket_path}", box) as client:
        for bad, why in (("a/b", "'/'"), ("two words", "whitespace"), ("x|y", "'|'"),
                         ("n" * 300, "longer than 255")):
            with pytest.raises(ClientError, match=why):
                client.exec(["/bin/true"], id=bad, attach=False)
        ok = client.exec(["/bin/true"], id="web.1", attach=False)     # '.' is fine
        assert ok["id"] == "web.1"
        assert {s["id"] for s in client.list()} == {primary.id, "web.1"}


def test_a_nul_in_a_copy_path_is_refused_before_anything_is_made(sandbox, tmp_path):
    from tether.attach.client import ClientError
    socket_path = tmp_path / "attach.sock"
    target = tmp_path / "target"
    target.mkdir()
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary), attach_socket=socket_path, stop_grace=2)
    box.wait_for_log(r"serving 1 session")
    with connect_client(f"unix:{socket_path}", box) as client:
        with pytest.raises(ClientError, match="NUL"):
            client.copy_to(f"{target}/a\0b", b"data")
        with pytest.raises(ClientError, match="NUL"):
            client.copy_from(f"{target}/a\0b", io.BytesIO())
    assert os.listdir(target) == []
