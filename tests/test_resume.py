"""VM templates, guest side (tether/resume.py): the trigger on the kernel command line,
the host's resume answer parsed and applied, the clock and RNG actions (tether/system.py),
and the agent's wait point, driven end to end over a virtio-serial transport on a
socketpair. A VM restored from a template is tested by the VM tests."""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys

import pytest

from helpers import REPO, executor_config, require_root, session_config
from tether import agent, boottime, guestinfo, resume, system

SEED = "0123456789abcdef" * 4
CLOCK = "1764763200.123456789"


# -- the kernel command line -----------------------------------------------------------------
def test_a_kernel_argument_is_the_first_value_of_its_name():
    args = ["quiet", "tether.guestinfoX=/no", "tether.guestinfo=/first", "tether.guestinfo=/2",
            "tether.empty="]
    assert system.kernel_arg("tether.guestinfo", args) == "/first"
    assert system.kernel_arg("tether.empty", args) == ""
    assert system.kernel_arg("quiet", args) is None      # a flag has no value
    assert system.kernel_arg("tether.absent", args) is None
    assert guestinfo.kernel_guestinfo_file(["tether.guestinfo=/f.vmx"]) == "/f.vmx"
    assert guestinfo.kernel_guestinfo_file(["tether.guestinfo="]) is None


def test_the_kernel_command_line_is_read_once(tmp_path, monkeypatch):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 tether.template=1\n")
    monkeypatch.setattr(system, "CMDLINE", str(cmdline))
    monkeypatch.setattr(system, "_kernel_args", None)
    assert system.kernel_args() == ["console=ttyS0", "tether.template=1"]
    cmdline.write_text("console=ttyS0\n")
    assert system.kernel_arg("tether.template") == "1"    # as read the first time
    assert system.kernel_args("a  b\n") == ["a", "b"]     # a given text is only split
    monkeypatch.setattr(system, "_kernel_args", None)
    monkeypatch.setattr(system, "CMDLINE", str(tmp_path / "missing"))
    assert system.kernel_args() == []


def test_the_template_trigger_is_tether_template_1():
    assert agent.template_requested("console=ttyS0 tether.template=1 quiet")
    for cmdline in ("console=ttyS0", "tether.template=0", "tether.template=", "tether.template",
                    "tether.template=1x", "tether.templates=1", ""):
        assert not agent.template_requested(cmdline), cmdline


def test_only_a_vm_reads_the_trigger(monkeypatch):
    """Elsewhere the kernel's command line is the host's: the agent does not look."""
    monkeypatch.setattr(agent, "template_requested", lambda cmdline=None: True)
    for mode, expected in ((agent.RunMode.VM, True), (agent.RunMode.SANDBOX, False),
                           (agent.RunMode.PROCESS, False)):
        options = agent.Options(mode=mode)
        assert agent.Agent.template_boot(_Stub(options)) is expected, mode
    assert agent.Agent.template_boot(_Stub(agent.Options(mode=agent.RunMode.PROCESS,
                                                         template=True)))


class _Stub:
    def __init__(self, options):
        self.options, self.mode = options, options.mode


# -- the answer ----------------------------------------------------------------------------------
def test_a_full_answer_is_parsed():
    got = resume.parse_resume(f"clock={CLOCK} seed={SEED}")
    assert got.clock_ns == 1764763200_123456789
    assert got.seed == bytes.fromhex(SEED) and len(got.seed) == 32
    assert got.problems == [] and resume.missing_fields(got) == []


def test_unknown_fields_and_other_words_are_ignored():
    got = resume.parse_resume(f"  version=2 seed={SEED.upper()} cold clock=17 future=a=b\n")
    assert got.clock_ns == 17_000_000_000
    assert got.seed == bytes.fromhex(SEED)
    assert got.problems == [] and resume.missing_fields(got) == []


def test_each_field_is_optional_and_a_missing_one_is_named():
    only_clock = resume.parse_resume("clock=5.5")
    assert only_clock.clock_ns == 5_500_000_000 and only_clock.seed is None
    assert only_clock.problems == []
    assert [m.split(":")[0] for m in resume.missing_fields(only_clock)] == ["no seed"]
    only_seed = resume.parse_resume(f"seed={SEED}")
    assert only_seed.clock_ns is None
    assert [m.split(":")[0] for m in resume.missing_fields(only_seed)] == ["no clock"]
    for empty in ("", "<nil>"):
        assert len(resume.missing_fields(resume.parse_resume(empty))) == 2


@pytest.mark.parametrize("clock", ["", "abc", "-5", "+5", "1.", ".5", "1.2.3", "1e9", "1,5",
                                   "1.1234567890", "١٢٣", "0x10", "9223372037",
                                   "1" * 30])
def test_a_malformed_clock_is_a_problem_not_a_value(clock):
    got = resume.parse_resume(f"clock={clock} seed={SEED}")
    assert got.clock_ns is None and got.seed == bytes.fromhex(SEED)
    assert len(got.problems) == 1 and "clock" in got.problems[0]
    assert "template's" in got.problems[0]                # says what it leaves undone
    assert resume.missing_fields(got) == []               # malformed is not missing


@pytest.mark.parametrize("seed", ["", SEED[:-1], SEED + "0", SEED[:-2] + "zz", SEED[:-2] + " 0",
                                  "٠" * 64])
def test_a_malformed_seed_is_a_problem_and_is_not_echoed(seed):
    got = resume.parse_resume(f"clock=1 seed={seed}")
    assert got.seed is None and got.clock_ns == 1_000_000_000
    assert len(got.problems) == 1 and "seed" in got.problems[0]
    assert not seed or seed[:8] not in got.problems[0]


def test_the_clock_keeps_nine_decimals_exactly():
    assert resume.parse_clock("1764763200.000000001") == 1764763200_000000001
    assert resume.parse_clock("9223372036.854775807") == (1 << 63) - 1   # the kernel's last
    assert resume.parse_clock("1764763200.1") == 1764763200_100000000
    assert resume.iso_time(1764763200_123456789) == "2025-12-03T12:00:00.123Z"


# -- applying it ---------------------------------------------------------------------------------
def test_apply_sets_the_clock_and_reseeds_both_rngs(monkeypatch):
    calls = []
    monkeypatch.setattr(system, "set_clock", lambda ns: calls.append(("clock", ns)))
    monkeypatch.setattr(system, "reseed_random", lambda seed: calls.append(("seed", seed)))
    state = random.getstate()
    try:
        random.seed(7)
        after_seed_7 = random.random()
        random.seed(7)
        done, failed = resume.apply(resume.parse_resume(f"clock={CLOCK} seed={SEED}"))
        assert random.random() != after_seed_7       # Python's random reseeded too
    finally:
        random.setstate(state)
    assert calls == [("clock", 1764763200_123456789), ("seed", bytes.fromhex(SEED))]
    assert done == ["clock set to 2025-12-03T12:00:00.123Z", "RNG reseeded"] and failed == []


def test_apply_reports_failures_without_raising(monkeypatch):
    def refused(*args):
        raise OSError(errno.EPERM, "not permitted")
    monkeypatch.setattr(system, "set_clock", refused)
    monkeypatch.setattr(system, "reseed_random", refused)
    done, failed = resume.apply(resume.parse_resume(f"clock={CLOCK} seed={SEED}"))
    assert done == []
    assert "clock could not be set" in failed[0] and "not permitted" in failed[0]
    assert "could not be reseeded" in failed[1] and "clones" in failed[1]


# -- the platform actions ----------------------------------------------------------------------
def as_nobody(action) -> int:
    """Run `action()` in a child that has dropped root; its errno (0: no error)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 255
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                action()
                code = 0
            except OSError as err:
                code = err.errno or 254
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        data = os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return data[0]


def test_set_clock_sets_the_wall_clock():
    """Only the refusal is safe to watch here: without CAP_SYS_TIME the kernel says no,
    which it only says to a clock_settime(CLOCK_REALTIME) (and the value is now anyway)."""
    require_root("to drop to nobody in a child")
    import time
    assert as_nobody(lambda: system.set_clock(time.time_ns())) == errno.EPERM


def test_reseed_random_writes_the_seed_then_reseeds_the_crng(tmp_path):
    require_root("RNDRESEEDCRNG needs CAP_SYS_ADMIN")
    system.reseed_random(os.urandom(32))                 # harmless: one more reseed
    # without CAP_SYS_ADMIN the write is allowed, the ioctl is not: it is made
    assert as_nobody(lambda: system.reseed_random(os.urandom(32))) == errno.EPERM
    # the write comes first, and the ioctl goes to the same file
    plain = tmp_path / "pool"
    plain.write_bytes(b"")
    with pytest.raises(OSError, match="RNDRESEEDCRNG") as raised:
        system.reseed_random(b"s" * 32, device=str(plain))
    assert raised.value.errno == errno.ENOTTY
    assert plain.read_bytes() == b"s" * 32


# -- the agent's wait point, end to end ----------------------------------------------------------
AGENT_RUN = """if True:
    import json, os, socket, sys, threading
    from extraconfig import virtio
    from tether import agent, system
    from tether.console import configure_logging
    configure_logging(stream=sys.stderr)
    store, reply, template = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    requests, calls, seen = [], [], {}
    guest, host = socket.socketpair()

    def serve():
        deframer = virtio.Deframer()
        while True:
            data = host.recv(65536)
            if not data:
                return
            for request in deframer.feed(data):
                requests.append(request)
                if request == "info-get guestinfo.tether.resume":
                    seen["modules"] = sorted(sys.modules)
                    answer = "0 No value found" if reply == "-" else "1 " + reply
                else:
                    answer = virtio.answer(request, store.get, store.__setitem__)
                host.sendall(virtio.frame(answer))
    threading.Thread(target=serve, daemon=True).start()

    request = virtio.VirtioSerialTransport.request
    def watched(self, text, timeout=virtio.OWN_TIMEOUT):
        if "tether.resume" in text:
            seen["timeout"] = "none" if timeout is None else "own" \\
                if timeout is virtio.OWN_TIMEOUT else timeout
        return request(self, text, timeout)
    virtio.VirtioSerialTransport.request = watched
    def set_clock(ns):
        calls.append(["clock", ns])
        if os.environ.get("TEST_CLOCK_REFUSED"):
            raise OSError(1, "clock_settime(CLOCK_REALTIME): Operation not permitted")
    system.set_clock = set_clock
    system.reseed_random = lambda seed: calls.append(["seed", seed.hex()])
    transport = virtio.VirtioSerialTransport(os.dup(guest.fileno()), timeout=30,
                                             path="socketpair")
    options = agent.Options(mode=agent.RunMode.PROCESS, attach_endpoints=[], vic_attach=[],
                            template=template or None)
    code = agent.Agent(transport, options).run()
    print(json.dumps(dict(seen, code=code, requests=requests, calls=calls, store=store)))
"""
STAGE0 = "kernel=1.200000,modules=1.350000,root=1.410000,exec=1.420000"
RESUME_REQUEST = f"info-get {resume.RESUME_KEY}"


def run_agent(reply: str, template: bool = True, env=None) -> tuple[dict, str]:
    """The agent in a child process (its signal handlers, subreaper and RNG are its
    own), template mode on, over virtio-serial on a socketpair to a host that answers
    the resume request with `reply` ("-": no value) and everything else from a config
    whose primary is /bin/true."""
    from tether.extension import encode_config
    store = encode_config(executor_config(session_config("p" * 12, ["/bin/true"])))
    run = subprocess.run(
        [sys.executable, "-c", AGENT_RUN, json.dumps(store), reply, "1" if template else "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO), **{boottime.MARKS_ENV: STAGE0},
                 **(env or {})))
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), run.stderr


def timeline(store: dict) -> dict[str, tuple[float, float]]:
    return {k[len(boottime.PREFIX):]: tuple(map(float, v.split()))
            for k, v in store.items() if k.startswith(boottime.PREFIX) and not k.endswith(".clock")}


def first_config_read(requests: list[str]) -> int:
    return next(i for i, r in enumerate(requests)
                if r.startswith("info-get ") and r != RESUME_REQUEST)


def test_a_template_boot_waits_for_the_host_before_reading_the_config():
    got, log = run_agent(f"clock={CLOCK} seed={SEED} future=1")
    requests = got["requests"]
    assert requests.count(RESUME_REQUEST) == 1
    assert requests.index(RESUME_REQUEST) < first_config_read(requests), requests[:5]
    assert got["timeout"] == "none"           # no time limit: the host saves the VM first
    # what the later steps load was loaded before the request
    assert {"extraconfig.codec", "tether.extension", "tether.network", "pyroute2",
            "tether.attach.server"} <= set(got["modules"])
    # the answer taken: the clock and the seed, through the platform actions
    assert got["calls"] == [["clock", 1764763200_123456789], ["seed", SEED]]
    assert "resumed from a VM template: clock set to 2025-12-03T12:00:00.123Z, RNG reseeded" \
        in log
    # and the run went on as any other
    assert got["code"] == 0
    assert got["store"]["guestinfo.vice..sessions|pppppppppppp.started"] == "true"


def test_after_a_resume_the_timeline_starts_at_the_answer():
    got, _ = run_agent(f"clock={CLOCK} seed={SEED}")
    phases = timeline(got["store"])
    keys = [k for k in got["store"] if k.startswith(boottime.PREFIX)]
    assert keys[0] == boottime.PREFIX + "resume" and keys[-1] == boottime.CLOCK_KEY
    start, end = phases["resume"]
    assert start == end                                    # zero length, at the answer
    assert phases["config"][0] == end                      # config starts there
    # stage 0's and the agent's marks before the answer were the template's boot
    for gone in ("kernel", "stage0.modules", "stage0.exec", "signals", "system", "cgroups",
                 "template"):
        assert gone not in phases, phases


def test_the_run_that_saved_the_template_keeps_its_own_timeline():
    got, log = run_agent(f"clock={CLOCK} seed={SEED} cold=1")
    assert got["calls"] == [["clock", 1764763200_123456789], ["seed", SEED]]
    assert "saved as a VM template: clock set to" in log
    assert "resumed from a VM template" not in log
    phases = timeline(got["store"])
    assert "resume" not in phases and {"kernel", "cgroups", "template", "config"} <= set(phases)


def test_without_an_answer_the_boot_goes_on_as_a_plain_one():
    got, log = run_agent("-")
    assert got["requests"][0] == RESUME_REQUEST
    assert got["calls"] == []
    assert "the host has no answer to guestinfo.tether.resume" in log
    assert "leave the argument out" in log
    assert "resumed from a VM template" not in log
    assert got["code"] == 0
    assert got["store"]["guestinfo.vice..sessions|pppppppppppp.started"] == "true"
    phases = timeline(got["store"])
    assert "resume" not in phases and {"kernel", "template", "config"} <= set(phases)


def test_a_malformed_answer_is_logged_and_the_rest_is_taken():
    got, log = run_agent(f"clock=yesterday seed={SEED}")
    assert got["calls"] == [["seed", SEED]]
    assert "clock 'yesterday' is not seconds since the epoch" in log
    assert got["code"] == 0
    assert "resume" in timeline(got["store"])      # the host did answer: a resume


def test_a_clock_that_cannot_be_set_fails_the_step_not_the_boot():
    got, log = run_agent(f"clock={CLOCK} seed={SEED}", env={"TEST_CLOCK_REFUSED": "1"})
    assert got["calls"] == [["clock", 1764763200_123456789], ["seed", SEED]]  # seed still
    assert "step template failed: the clock could not be set" in log
    assert "Operation not permitted" in log and "Traceback" not in log
    assert "finished with 1 error(s)" in log          # in the summary at the end
    assert got["code"] == 0
    assert got["store"]["guestinfo.vice..sessions|pppppppppppp.started"] == "true"


def test_a_failing_template_step_does_not_stop_the_boot():
    got, log = run_agent(f"clock={CLOCK} seed={SEED}",
                         env={agent.FAILPOINTS_ENV: "template"})
    assert "step template failed: injected failure" in log
    assert RESUME_REQUEST not in got["requests"]
    assert got["code"] == 0
    assert got["store"]["guestinfo.vice..sessions|pppppppppppp.started"] == "true"


def test_a_plain_boot_does_not_ask():
    got, log = run_agent(f"clock={CLOCK} seed={SEED}", template=False)
    assert RESUME_REQUEST not in got["requests"]
    assert "modules" not in got and got["calls"] == []
    assert "template" not in timeline(got["store"])
    assert got["code"] == 0
