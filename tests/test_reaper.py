"""The reaper: exits dispatched by PID, orphans reaped, helper statuses not stolen.

Each test runs its scenario in a fresh Python process: the reaper takes SIGCHLD and
reaps every child, which must not happen inside pytest itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers import REPO

PRELUDE = """
import json, os, subprocess, sys, threading, time
from tether.loop import Loop
from tether.reaper import Reaper, describe_status
from tether import system
loop = Loop()
reaper = Reaper(loop)
reaper.start()
results = {}
"""


def run_scenario(body: str) -> dict:
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(results))\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_exit_status_dispatched_by_pid():
    results = run_scenario("""
        got = {}
        for code in (0, 3, 5):
            pid = os.fork()
            if pid == 0:
                os._exit(code)
            reaper.watch(pid, lambda st, code=code: got.__setitem__(str(code), describe_status(st)))
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), 9)
        reaper.watch(pid, lambda st: got.__setitem__("killed", describe_status(st)))
        loop.run_until(lambda: len(got) == 4, timeout=120)
        results["got"] = got
    """)
    assert results["got"] == {"0": "exited 0", "3": "exited 3", "5": "exited 5",
                              "killed": "killed by SIGKILL"}


def test_orphans_are_reaped_as_subreaper_with_no_zombie_left():
    results = run_scenario("""
        system.set_child_subreaper()
        pid = os.fork()
        if pid == 0:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(0.01)
                    os._exit(0)
            os._exit(0)      # its children are re-parented to us
        loop.run_until(lambda: reaper.orphans_reaped >= 201, timeout=120)
        time.sleep(0.2)
        loop.run_until(lambda: False, timeout=0.5)
        zombies = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    stat = open(f"/proc/{p}/stat").read()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] == "Z" and int(fields[1]) == os.getpid():
                    zombies.append(p)
        results["reaped"] = reaper.orphans_reaped
        results["zombies"] = zombies
    """)
    assert results["reaped"] == 201
    assert results["zombies"] == []


def test_helper_status_reaches_the_caller_on_the_loop_thread():
    results = run_scenario("""
        cp = reaper.run_helper(["/bin/sh", "-c", "echo out; echo err >&2; exit 4"], 120)
        results["helper"] = [cp.returncode, cp.stdout, cp.stderr]
        results["orphans"] = reaper.orphans_reaped
    """)
    assert results["helper"] == [4, "out\n", "err\n"]
    assert results["orphans"] == 0


def test_helper_status_is_not_stolen_by_the_running_reaper():
    results = run_scenario("""
        out = []
        def helpers():
            for i in range(20):
                out.append(reaper.run_helper(["/bin/sh", "-c", f"exit {i}"], 120).returncode)
            loop.call_soon_threadsafe(lambda: None)   # wake the loop to see we are done
        thread = threading.Thread(target=helpers)
        thread.start()
        # meanwhile the loop reaps everything else that exits
        for _ in range(20):
            if os.fork() == 0:
                os._exit(0)
        results["in_time"] = loop.run_until(
            lambda: len(out) == 20 and reaper.orphans_reaped == 20, timeout=120)
        thread.join(60)
        results["codes"] = out
        results["orphans"] = reaper.orphans_reaped
    """)
    assert results["codes"] == list(range(20))
    assert results["in_time"]
    assert results["orphans"] == 20


def test_helper_timeout_kills_it():
    results = run_scenario("""
        start = time.monotonic()
        try:
            reaper.run_helper(["/bin/sleep", "100"], timeout=0.5)
            results["raised"] = False
        except subprocess.TimeoutExpired:
            results["raised"] = True
        results["quick"] = time.monotonic() - start < 60
        results["left"] = [p for p in os.listdir("/proc") if p.isdigit()
                           and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]
                           == str(os.getpid())]
    """)
    assert results["raised"] and results["quick"]
    assert results["left"] == []


def test_an_orphan_storm_does_not_flood_the_log():
    """At debug level every orphan reaped was a line: a container making them by the
    thousand pushed everything else out of the console (which keeps the newest 1 MiB)."""
    results = run_scenario("""
        import io
        from tether import log
        from tether.console import RateLimit
        stream = io.StringIO()
        log.configure(log.DEBUG, stream=stream)
        reaper._orphan_log = RateLimit(burst=3, interval=10.0, clock=lambda: 0.0)
        system.set_child_subreaper()
        pid = os.fork()
        if pid == 0:
            for _ in range(200):
                if os.fork() == 0:
                    os._exit(0)
            os._exit(0)      # its children are re-parented to us
        loop.run_until(lambda: reaper.orphans_reaped >= 201, timeout=120)
        results["reaped"] = reaper.orphans_reaped
        results["lines"] = [l for l in stream.getvalue().splitlines() if "reaped orphan" in l]
    """)
    assert results["reaped"] == 201
    assert len(results["lines"]) == 3
