"""A configuration the agent cannot use is answered, never ignored: a decode error at boot
(or on SIGHUP) is written back as `started` of every session the key list names, and as
the executor-level key `guestinfo.vice..tether.configerror`; session IDs are checked
once, with errors a person can act on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, executor_config, require_namespaces, session_config, sid
from extraconfig.codec import encode
from extraconfig.transport import format_vmx, parse_vmx

CONFIG_ERROR = "guestinfo.vice..tether.configerror"


@pytest.fixture
def vmx_sandbox(tmp_path):
    """Run `tether sandbox` on raw guestinfo keys (a host's keys may be anything)."""
    require_namespaces()

    def run(entries: dict[str, str], env=None, args=(), timeout=120):
        path = tmp_path / "config.vmx"
        path.write_text(format_vmx(entries))
        out = tmp_path / "guestinfo.out"
        full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        proc = subprocess.run([sys.executable, "-m", "tether", "sandbox", str(path), "--out",
                               str(out), "--stop-grace", "2", *args], capture_output=True,
                              text=True, env=full_env, cwd=REPO, timeout=timeout)
        guestinfo = parse_vmx(out.read_text()) if out.exists() else {}
        return proc.returncode, guestinfo, proc.stderr
    return run


def started_key(session_id: str) -> str:
    return f"guestinfo.vice..sessions|{session_id}.started"


def test_a_repeated_session_name_is_answered_in_started_and_at_the_executor(vmx_sandbox):
    primary = session_config(sid(), ["/bin/true"])
    other = session_config("web.1", ["/bin/true"])
    entries = encode(executor_config(primary, other))
    key_list = "guestinfo.vice./sessions"
    entries[key_list] = "|".join([primary.id, "web.1", primary.id])     # a name twice
    code, guestinfo, log = vmx_sandbox(entries)
    assert code == 1, log
    for name in (primary.id, "web.1"):
        assert guestinfo[started_key(name)].startswith("configuration error: "), log
    assert "more than once" in guestinfo[CONFIG_ERROR] or "duplicate" in guestinfo[CONFIG_ERROR]
    assert "Traceback" not in log and "started: pid" not in log


def test_a_config_over_the_decode_budget_is_answered_too(vmx_sandbox):
    sessions = [session_config(f"s{i}", ["/bin/true", *["arg"] * 20]) for i in range(5)]
    entries = encode(executor_config(*sessions))
    code, guestinfo, log = vmx_sandbox(entries, env={"EXTRACONFIG_DECODE_BUDGET":
                                                     "lookups=60"})
    assert code == 1, log
    assert "decode budget" in guestinfo[CONFIG_ERROR]
    for s in sessions:
        assert "decode budget" in guestinfo[started_key(s.id)]


def test_when_even_the_names_cannot_be_read_the_executor_key_says_why(vmx_sandbox):
    entries = encode(executor_config(session_config(sid(), ["/bin/true"])))
    entries["guestinfo.vice./sessions"] = "|".join(f"s{i}" for i in range(70_000))
    code, guestinfo, log = vmx_sandbox(entries)
    assert code == 1, log
    assert guestinfo[CONFIG_ERROR].startswith("configuration error: ")
    assert not [k for k, v in guestinfo.items() if k.endswith(".started") and v]


def test_a_good_boot_clears_an_earlier_config_error(vmx_sandbox):
    primary = session_config(sid(), ["/bin/true"])
    entries = encode(executor_config(primary))
    entries[CONFIG_ERROR] = "configuration error: from an earlier boot"
    code, guestinfo, log = vmx_sandbox(entries)
    assert code == 0, log
    assert guestinfo.get(CONFIG_ERROR) in (None, "", "<nil>")
    assert guestinfo[started_key(primary.id)] == "true"


def test_a_reload_that_does_not_decode_answers_the_new_sessions_and_keeps_the_old(sandbox):
    import signal
    primary = session_config(sid(), ["/bin/sleep", "1000"])
    box = sandbox.start(executor_config(primary))
    box.wait_for_log(r"serving 1 session")
    newer = session_config("newer", ["/bin/true"])
    entries = encode(executor_config(primary, newer))
    entries["guestinfo.vice./sessions"] = f"{primary.id}|newer|newer"
    with open(box.config_path, "w") as f:
        f.write(format_vmx(entries))
    box.signal(signal.SIGHUP)
    box.wait_for_log(r"configuration cannot be decoded")
    box.signal(signal.SIGTERM)
    result = box.wait()
    assert result.guestinfo[started_key("newer")].startswith("configuration error: ")
    assert result.guestinfo[started_key(primary.id)] == "true"     # still its own
    assert result.guestinfo[CONFIG_ERROR].startswith("configuration error: ")
    assert result.returncode == 128 + signal.SIGTERM


# -- session IDs -------------------------------------------------------------------------------
def test_a_session_id_with_a_dot_is_written_back(vmx_sandbox):
    primary = session_config("web.1", ["/bin/sh", "-c", "exit 4"])
    code, guestinfo, log = vmx_sandbox(encode(executor_config(primary, executor_id="web.1")))
    assert code == 4, log
    assert guestinfo[started_key("web.1")] == "true"
    assert guestinfo["guestinfo.vice..sessions|web.1.status"] == "4"
    assert "could not publish" not in log


def test_the_session_under_the_executor_id_is_the_primary_whatever_its_common_id(vmx_sandbox):
    executor = sid()
    primary = session_config(executor, ["/bin/sh", "-c", "exit 5"])
    entries = encode(executor_config(primary))
    entries[f"guestinfo.vice./sessions|{executor}/common/id"] = "something-else"
    code, guestinfo, log = vmx_sandbox(entries, timeout=60)
    assert code == 5, log                     # it ran as the primary, and the agent stopped
    assert guestinfo[started_key(executor)] == "true"
    assert "differs from its map key" in log


def test_two_sessions_with_the_same_common_id_are_both_run(vmx_sandbox, tmp_path):
    primary = session_config(sid(), ["/bin/sleep", "2"])
    a = session_config("a", ["/bin/true"])
    b = session_config("b", ["/bin/true"])
    entries = encode(executor_config(primary, a, b))
    entries["guestinfo.vice./sessions|a/common/id"] = "same"
    entries["guestinfo.vice./sessions|b/common/id"] = "same"
    code, guestinfo, log = vmx_sandbox(entries)
    assert code == 0, log
    assert guestinfo[started_key("a")] == "true" and guestinfo[started_key("b")] == "true"
    assert guestinfo["guestinfo.vice..sessions|a.status"] == "0"
    assert guestinfo["guestinfo.vice..sessions|b.status"] == "0"
    # ... written when each ran, not only in the final write at the stop
    assert "could not publish" not in log


def test_a_session_name_that_cannot_be_an_id_is_refused_with_a_clear_error(vmx_sandbox):
    primary = session_config(sid(), ["/bin/true"])
    bad = session_config("two words", ["/bin/true"])
    entries = encode(executor_config(primary, bad))
    code, guestinfo, log = vmx_sandbox(entries)
    assert code == 0, log                      # the rest runs
    assert "session ID 'two words' is invalid: whitespace" in log
    assert "whitespace" in guestinfo[CONFIG_ERROR]
    assert not guestinfo.get(started_key("two words"))     # never written (nor run)
    assert guestinfo[started_key(primary.id)] == "true"
