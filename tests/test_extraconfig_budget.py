"""The decode budget: repeated names, amplifying lengths, and what is left to name.

Hostile maps are read through a source that stops the test once it has answered more
lookups than a bounded decode may make, so that an unbounded decode fails the test
quickly instead of running for minutes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from extraconfig import (DecodeBudget, DecodeBudgetError, DecodeError, calculate_key, decode,
                         encode, read_map_names)
from extraconfig.codec import DEFAULT_BUDGET
from extraconfig.transport import GuestSource, MapTransport
from test_extraconfig_shapes import codec_path  # noqa: F401 - autouse: both paths
from tether.config import Cmd, ExecutorConfig, SessionConfig

SESSIONS = "guestinfo.vice./sessions"


def exit_logs(sid: str) -> str:
    return f"guestinfo.vice..sessions|{sid}.diagnostics.exitlogs"


class TooMuchWork(Exception):
    pass


class CappedSource(dict):
    """A map that counts lookups and gives up past `cap` of them."""

    def __init__(self, data: dict, cap: int) -> None:
        super().__init__(data)
        self.cap = cap
        self.lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        if self.lookups > self.cap:
            raise TooMuchWork(f"{self.lookups} lookups: the decode is not bounded")
        return super().get(key, default)


def test_a_name_listed_twice_is_an_error_naming_it():
    for listed in ("p|q|p", "p|p", "|"):
        with pytest.raises(DecodeError, match="more than once") as e:
            decode({SESSIONS: listed}, ExecutorConfig)
        assert e.value.key == SESSIONS
    with pytest.raises(DecodeError, match="'k' more than once"):
        decode({"annotations": "k|j|k", "annotations|k": "v"}, ExecutorConfig)
    # distinct names, including the empty one, are fine
    assert set(decode({SESSIONS: "a|"}, ExecutorConfig).sessions) == {"a", ""}


def test_repeating_a_name_does_not_repeat_its_work():
    # each listing of `p` used to decode p's 65,535 exit logs again (about 0.2 s each)
    data = {SESSIONS: "|".join(["p"] * 1000), exit_logs("p"): "65534"}
    source = CappedSource(data, cap=1000)
    with pytest.raises(DecodeError, match="'p' more than once"):
        decode(source, ExecutorConfig)
    assert source.lookups < 50


def hostile_exit_logs(sessions: int = 100) -> dict[str, str]:
    """The issue's map: 102 keys, 5.8 KB, 100 sessions claiming 65,535 exit logs each."""
    data = {SESSIONS: "|".join(f"s{i:02d}" for i in range(sessions)),
            "guestinfo.vice./common/id": "x"}
    data.update({exit_logs(f"s{i:02d}"): "65534" for i in range(sessions)})
    return data


def test_amplifying_lengths_fail_fast_within_the_budget():
    data = hostile_exit_logs()
    assert len(data) == 102 and sum(len(k) + len(v) for k, v in data.items()) < 6000
    source = CappedSource(data, cap=DEFAULT_BUDGET.lookups)
    with pytest.raises(DecodeBudgetError) as e:
        decode(source, ExecutorConfig)
    # it used to make 6.5 million exit logs: now it stops at the second session
    assert e.value.limit == "lookups" and e.value.allowed == DEFAULT_BUDGET.lookups
    assert e.value.key == exit_logs("s01")
    assert source.lookups <= 66_000 * 3


MEMORY = """
import sys
sys.path.insert(0, "tests")
import extraconfig.codec as C
from helpers import peak_rss_kib
from test_extraconfig_budget import hostile_exit_logs
from tether.config import ExecutorConfig
C.CODEGEN = sys.argv[1]
C.decode({"guestinfo.vice./common/id": "x"}, ExecutorConfig)
before = peak_rss_kib()
try:
    C.decode(hostile_exit_logs(), ExecutorConfig)
except C.DecodeBudgetError:
    pass
print(peak_rss_kib() - before)
"""


def test_amplifying_lengths_fail_with_little_memory(codec_path):
    # 1.47 GiB before the budget; one session's 65,535 exit logs (about 14 MiB) now
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", MEMORY, "0" if codec_path == "interpreted" else "1"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    grown_kib = int(out.stdout)
    assert grown_kib < 48 << 10, f"the failed decode took {grown_kib >> 10} MiB"


def test_the_budget_error_says_what_was_exceeded_and_how_to_raise_it():
    data = {SESSIONS: "a", exit_logs("a"): "99"}
    with pytest.raises(DecodeBudgetError) as e:
        decode(data, ExecutorConfig, budget=DecodeBudget(lookups=200, entries=50))
    message = str(e.value)
    assert exit_logs("a") in message
    assert "100 more map entries or slice elements" in message
    assert "decode budget of 50 entries" in message
    assert "DecodeBudget(entries=N)" in message and "EXTRACONFIG_DECODE_BUDGET=entries=N" in message
    with pytest.raises(DecodeBudgetError, match="300 more key lookups, over the decode budget "
                                                "of 200 lookups"):
        decode(data, ExecutorConfig, budget=DecodeBudget(lookups=200, entries=500))
    # raised, the same map decodes
    cfg = decode(data, ExecutorConfig, budget=DecodeBudget(lookups=400, entries=500))
    assert len(cfg.sessions["a"].diagnostics.exit_logs) == 100


def test_the_map_key_list_is_charged_before_any_entry_is_made():
    names = "|".join(str(i) for i in range(20000))
    source = CappedSource({SESSIONS: names}, cap=10)
    with pytest.raises(DecodeBudgetError, match=SESSIONS):
        decode(source, ExecutorConfig, budget=DecodeBudget(lookups=100_000))
    assert source.lookups < 10


def benchmark_sessions(n: int) -> ExecutorConfig:
    """The shape benchmarks/codec.py uses: 10 arguments, 10 environment entries."""
    return ExecutorConfig(sessions={
        f"session-{i:05d}": SessionConfig(cmd=Cmd(path="/bin/worker",
                                                  args=[f"--opt{j}" for j in range(10)],
                                                  env=[f"VAR{j}=v" for j in range(10)]))
        for i in range(n)})


def test_ten_thousand_sessions_fit_the_default_budget():
    cfg = decode(encode(benchmark_sessions(10_000)), ExecutorConfig)
    assert len(cfg.sessions) == 10_000


def test_the_environment_sets_the_default_budget():
    code = ("import extraconfig as e, tether.config as c, extraconfig.codec as C;"
            "print(C.DEFAULT_BUDGET);"
            "e.decode({'guestinfo.vice./sessions': 'a|b'}, c.ExecutorConfig)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(setting):
        env = {**os.environ, "EXTRACONFIG_DECODE_BUDGET": setting}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=env, cwd=root)
    out = run("lookups=40")
    assert "DecodeBudget(lookups=40, entries=300000)" in out.stdout
    assert "DecodeBudgetError" in out.stderr and "decode budget of 40 lookups" in out.stderr
    out = run("lookups=lots")                 # unreadable: the defaults, not a crash
    assert out.returncode == 0 and "lookups=300000" in out.stdout


def test_sessions_can_be_named_when_the_decode_fails():
    data = hostile_exit_logs(3)
    data[SESSIONS] = "s02|s00|s01|s00"
    with pytest.raises(DecodeError):
        decode(data, ExecutorConfig)
    # one lookup, no decode: the names a host waits on, and the keys to answer it with
    source = CappedSource(data, cap=1)
    assert read_map_names(source, ExecutorConfig, "Sessions") == ["s02", "s00", "s01"]
    assert calculate_key(ExecutorConfig, ["Sessions", "s02", "Started"]) == \
        "guestinfo.vice..sessions|s02.started"
    # through the guest's reader, for a name with a dot in it, and with nothing listed
    guest = GuestSource(MapTransport({"guestinfo.vice./sessions": "a.b"}))
    assert read_map_names(guest, ExecutorConfig, ["Sessions"]) == ["a.b"]
    assert calculate_key(ExecutorConfig, ["Sessions", "a.b", "Started"]) == \
        "guestinfo.vice..sessions|a.b.started"
    assert read_map_names({}, ExecutorConfig, "Sessions") == []
    with pytest.raises(DecodeError, match="one map field"):
        read_map_names({}, ExecutorConfig, "Common")
