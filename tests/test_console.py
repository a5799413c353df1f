"""The agent's console never blocks PID 1: the log handler and the session-output echo
write to stderr without blocking, from a bounded buffer, dropping (and counting) what a
console nobody reads cannot take."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO, executor_config, require_namespaces, session_config, sid, \
    write_config

# The agent's console set up as `tether agent` does, on a pipe nobody reads: 100,000 log
# lines and 8 MiB of echoed session output must not block.
FLOOD = textwrap.dedent("""
    import logging, os, sys
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    from tether.console import configure_logging, write_console
    configure_logging()
    log = logging.getLogger("tether.test")
    for i in range(100_000):
        log.info("line %d of a console nobody reads", i)
    for _ in range(128):
        write_console(b"x" * 65536)
    print("done", flush=True)
    from tether.console import console
    writer = console()
    print(writer.dropped > 0, writer.pending <= writer.limit, flush=True)
""")


def test_logging_and_echo_to_a_console_nobody_reads_do_not_block():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", FLOOD], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        pytest.fail("writing the log to a console nobody reads blocked the process")
    assert out.split() == [b"done", b"True", b"True"], out


def test_the_writer_keeps_the_newest_output_and_says_how_much_it_dropped():
    from tether.console import ConsoleWriter
    r, w = os.pipe()
    try:
        writer = ConsoleWriter(w, limit=64 << 10)
        for i in range(64):
            writer.write(b"%04d" % i + b"." * 4092 + b"\n")   # 4 KiB lines, 256 KiB
        assert writer.dropped > 0
        assert writer.pending <= 64 << 10
        os.set_blocking(r, False)
        seen = b""
        deadline = time.monotonic() + 30
        while writer.pending and time.monotonic() < deadline:
            try:
                seen += os.read(r, 1 << 20)
            except BlockingIOError:
                pass
            writer.flush()
        try:
            seen += os.read(r, 1 << 20)
        except BlockingIOError:
            pass
        assert b"bytes of console output dropped" in seen
        assert seen.endswith(b"0063" + b"." * 4092 + b"\n")      # the newest line survived
    finally:
        os.close(r)
        os.close(w)


def test_the_console_of_a_terminal_or_pipe_is_not_made_non_blocking_for_others():
    # The writer reopens the pipe (its own file description) instead of setting
    # O_NONBLOCK on the one it shares with the sandbox's parent or the user's shell.
    from tether.console import ConsoleWriter
    r, w = os.pipe()
    try:
        writer = ConsoleWriter(w)
        writer.write(b"hello\n")
        assert os.get_blocking(w)
        assert os.read(r, 100) == b"hello\n"
        writer.close()
    finally:
        os.close(r)
        os.close(w)


def test_sandbox_with_a_stderr_nobody_reads_still_stops_on_sigterm(tmp_path):
    require_namespaces()
    # The sandbox echoes session output onto its log (stderr): a chatty session fills a
    # pipe nobody reads at once. The agent must still serve, and stop on SIGTERM.
    primary = session_config(sid(), ["/bin/sh", "-c", "while :; do echo flooding the "
                                     "console; done"])
    config = write_config(executor_config(primary), str(tmp_path))
    out = tmp_path / "guestinfo.out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tether", "sandbox", config, "--out",
                             str(out), "--stop-grace", "2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)
    try:
        time.sleep(3)           # the 64 KiB pipe is full long before this
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the agent did not stop on SIGTERM while its stderr was full")
        assert code == 128 + signal.SIGTERM
        assert out.exists() and "started" in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()


def test_peer_text_is_shown_with_every_unprintable_character_escaped():
    from tether.console import escape_unprintable
    # an escape sequence, a carriage return that would rewrite our line, a C1 CSI and a
    # right-to-left override that would show the rest of the line backwards
    hostile = "ok\x1b]0;title\x07\x1b[2K\rtether vm: fine\x9b1A \u202eevil\tend\n"
    assert escape_unprintable(hostile) == (
        "ok\\x1b]0;title\\x07\\x1b[2K\\rtether vm: fine\\x9b1A \\u202eevil\\tend\\n")
    assert escape_unprintable(hostile, keep="\n\t").endswith("\\u202eevil\tend\n")
    assert escape_unprintable("plain ünïcode text") == "plain ünïcode text"
