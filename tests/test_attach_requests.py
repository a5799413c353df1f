"""Requests a hostile (authenticated) client may send, against the real agent in
`tether sandbox`: whatever it asks, the agent answers the next client's requests."""
from __future__ import annotations

import pytest

from helpers import executor_config, session_config, sid, socket_paths
from tether.attach.client import Client, ClientError

KEY = b"requests-test-key"


@pytest.fixture
def agent(sandbox):
    """start(primary) -> (box, endpoint): the agent serving `primary` on a unix socket."""
    with socket_paths("tether-requests") as socket_path:
        def start(primary):
            cfg = executor_config(primary)
            cfg.key = KEY
            path = socket_path()
            box = sandbox.start(cfg, attach_socket=path)
            box.wait_for_log(r"serving \d+ session")
            return box, "unix:" + path
        yield start


@pytest.mark.parametrize("field", ["path", "dir", "user", "group"])
def test_execs_with_huge_names_do_not_break_list(agent, field):
    """An exec whose program path, directory, user or group is far longer than any that
    can exist failed to launch and was kept as a finished session whose `started` (and
    the list's ExitMsg) quoted that name whole: two of 600 KB made every later `list`
    fail ("message of 2401093 bytes is over the 1048576 limit") until 32 more execs had
    pushed them out. Such an exec is now refused before a session is made."""
    primary = session_config(sid(), ["sleep", "1000"])
    box, endpoint = agent(primary)
    huge = "/x" + "A" * (600 << 10)
    fields = {"path": {"args": [huge]}, "dir": {"dir": huge},
              "user": {"user": huge[1:]}, "group": {"group": huge[1:]}}[field]
    fields.setdefault("args", ["sleep", "1"])
    with Client.connect(endpoint, KEY) as client:
        refusals = []
        for _ in range(2):
            with pytest.raises(ClientError) as refused:
                client.request("exec", **fields)
            refusals.append(str(refused.value))
        states = client.list()                        # failed here: reply over 1 MiB
        assert [s["id"] for s in states] == [primary.id]
        assert all(len(text) < 400 for text in refusals), refusals[0][:400]
