"""The CLI (`tether exec`, `ps`, `kill`, `attach`, `cp`) as a user runs it, against the
real agent in `tether sandbox`."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
import textwrap

import pytest

from helpers import REPO, executor_config, missing, session_config, sid, socket_paths

KEY = b"cli-key"


@pytest.fixture
def cli(sandbox, tmp_path):
    """start() -> (endpoint, primary session ID); run(*args) -> CompletedProcess."""
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    env = dict(os.environ, PYTHONPATH=str(REPO), TETHER_KEY_FILE=str(key_file))

    with socket_paths("tether-cli") as socket_path:
        def start(*argv, **fields):
            session = session_config(sid(), list(argv) or ["cat"], open_stdin=True, **fields)
            cfg = executor_config(session)
            cfg.key = KEY
            sock = socket_path()
            box = sandbox.start(cfg, attach_socket=sock)
            box.wait_for_log(r"serving \d+ session")
            run.box = box
            return "unix:" + sock, session.id

        def run(*args, input=None, extra_env=None, timeout=120):
            return subprocess.run([sys.executable, "-m", "tether", *args], input=input,
                                  capture_output=True, cwd=REPO,
                                  env={**env, **(extra_env or {})}, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)

        def popen(*args):
            return subprocess.Popen([sys.executable, "-m", "tether", *args], cwd=REPO, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)

        run.start, run.popen, run.env = start, popen, env
        yield run


def test_exec_streams_and_exit_code(cli):
    endpoint, _ = cli.start()
    done = cli("exec", endpoint, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")
    piped = cli("exec", endpoint, "--", "tr", "a-z", "A-Z", input=b"hello cli\n")
    assert piped.returncode == 0 and piped.stdout == b"HELLO CLI\n"


def test_exec_works_when_every_fd_of_the_client_is_above_1023(cli):
    """The interactive loop (tether/attach/terminal.py) waits with poll(2): select(2)
    refuses an fd above 1023, which a program with many files open has."""
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2100:
        missing("RLIMIT_NOFILE", "the open-file hard limit is below the 2100 this test needs")
    endpoint, _ = cli.start()
    crowded = textwrap.dedent("""
        import os, resource, sys
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
        while os.open("/dev/null", os.O_RDONLY) < 1100:
            pass
        from tether.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    done = subprocess.run([sys.executable, "-c", crowded, "exec", endpoint, "--", "sh", "-c",
                           "echo out; echo err >&2; exit 7"], capture_output=True, cwd=REPO,
                          env=cli.env, stdin=subprocess.DEVNULL, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")


def test_ps_and_kill_and_attach_exit_code(cli):
    endpoint, primary = cli.start("sh", "-c", "trap 'echo term-trapped; exit 3' TERM; "
                                  "echo up; while :; do sleep 0.1; done")
    listing = cli("ps", endpoint, "--json")
    assert listing.returncode == 0, listing.stderr
    (state,) = json.loads(listing.stdout)
    assert state["id"] == primary and state["running"] and state["pid"]
    table = cli("ps", endpoint)
    assert primary[:24].encode() in table.stdout and b"running" in table.stdout

    attached = cli.popen("attach", endpoint, primary, "--replay")
    try:
        assert attached.stdout.readline() == b"up\n"
        killed = cli("kill", endpoint, primary)   # default TERM, trapped by the shell
        assert killed.returncode == 0, killed.stderr
        out, err = attached.communicate(timeout=120)
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()
    assert out == b"term-trapped\n"
    assert attached.returncode == 3, err


def test_attach_releases_a_runblock_session_after_attaching(cli):
    """`docker start -a`: attach, then release RunBlock, so no output is missed."""
    endpoint, primary = cli.start("cat", run_block=True)
    box = cli.box
    box.wait_for_log(r"waits for an attach to release RunBlock")
    attached = cli("attach", endpoint, primary, input=b"ping\n", timeout=60)
    assert (attached.returncode, attached.stdout) == (0, b"ping\n"), attached.stderr
    result = box.wait(60)
    assert result.returncode == 0, result.log
    assert result.session(primary).started == "true"


def test_attach_no_unblock_only_watches(cli):
    endpoint, primary = cli.start("sh", "-c", "echo released", run_block=True)
    watcher = cli.popen("attach", endpoint, primary, "--no-unblock", "--no-stdin")
    try:
        cli.box.wait_for_log(r"attach: .* authenticated")
        listing = cli("ps", endpoint, "--json")
        (state,) = json.loads(listing.stdout)
        assert state["blocked"] and not state["running"], state
        releaser = cli("attach", endpoint, primary, "--no-stdin", timeout=60)
        assert (releaser.returncode, releaser.stdout) == (0, b"released\n"), releaser.stderr
        out, err = watcher.communicate(timeout=60)      # the watcher saw it all too
        assert (watcher.returncode, out) == (0, b"released\n"), err
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()


def test_kill_by_number_gives_128_plus_n(cli):
    endpoint, _ = cli.start()
    ident = cli("exec", endpoint, "-d", "--", "sleep", "1000").stdout.decode().strip()
    attached = cli.popen("attach", endpoint, ident)
    try:
        assert cli("kill", endpoint, ident, "9").returncode == 0
        attached.communicate(timeout=120)
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()
    assert attached.returncode == 137
    bad = cli("kill", endpoint, ident, "NOPE")
    assert bad.returncode == 1 and b"unknown signal" in bad.stderr


def test_cp_file_and_directory_both_ways(cli, tmp_path):
    endpoint, _ = cli.start()
    local = tmp_path / "payload.bin"
    data = os.urandom(3 << 20)
    local.write_bytes(data)
    inside = tmp_path / "inside"
    inside.mkdir()
    up = cli("cp", str(local), f"{endpoint}::{inside}")          # onto a directory
    assert up.returncode == 0, up.stderr
    assert (inside / "payload.bin").read_bytes() == data
    back = tmp_path / "back.bin"
    down = cli("cp", f"{endpoint}::{inside}/payload.bin", str(back))
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("alpha")
    assert cli("cp", str(tree), f"{endpoint}::{inside}").returncode == 0
    assert (inside / "tree" / "sub" / "a.txt").read_text() == "alpha"
    out = tmp_path / "out"
    assert cli("cp", f"{endpoint}::{inside}/tree", str(out)).returncode == 0
    assert (out / "tree" / "sub" / "a.txt").read_text() == "alpha"
    usage = cli("cp", str(local), str(back))
    assert usage.returncode == 2 and b"ENDPOINT::PATH" in usage.stderr


def test_cp_out_of_a_file_drops_the_modes_a_container_must_not_set_here(cli, tmp_path):
    """A file copied out gets no setuid/setgid/sticky bit and no group or other write, as
    the files of a copied-out directory (tarfile's data filter)."""
    endpoint, _ = cli.start()
    inside = tmp_path / "inside"
    inside.mkdir()
    for name, mode, expected in (("suid", 0o4755, 0o755), ("sgid", 0o2711, 0o711),
                                 ("open", 0o1777, 0o755), ("private", 0o400, 0o600)):
        (inside / name).write_text(name)
        os.chmod(inside / name, mode)
        back = tmp_path / f"{name}.out"
        down = cli("cp", f"{endpoint}::{inside}/{name}", str(back))
        assert down.returncode == 0, down.stderr
        assert (back.read_text(), stat.S_IMODE(back.stat().st_mode)) == (name, expected), name


def test_key_sources_and_a_wrong_key(cli, tmp_path):
    endpoint, _ = cli.start()
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"nope")
    refused = cli("ps", endpoint, "--key-file", str(wrong))
    assert refused.returncode == 1 and b"authentication failed" in refused.stderr
    by_env = cli("ps", endpoint, extra_env={"TETHER_KEY_FILE": "", "TETHER_KEY": KEY.decode()})
    assert by_env.returncode == 0, by_env.stderr
    missing = cli("ps", "unix:/nonexistent/sock")
    assert missing.returncode == 1 and b"tether ps:" in missing.stderr


def test_attach_replay_is_inert_on_a_terminal(cli, tmp_path):
    """This test plays the terminal (a pty): the replayed query never reaches it, and an
    answer it sends while the replay is shown is dropped; what is typed later is read."""
    import pty
    import select
    import time
    seen = tmp_path / "seen"
    endpoint, primary = cli.start(
        "sh", "-c", f"printf 'asks\\033[6n\\n'; IFS= read -r line; printf %s \"$line\" > {seen}",
        tty=True)
    master, slave = pty.openpty()
    attached = subprocess.Popen(
        [sys.executable, "-m", "tether", "attach", endpoint, primary, "--replay"],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO),
                 TETHER_KEY_FILE=str(tmp_path / "key")))
    os.close(slave)
    shown = b""
    try:
        deadline = time.monotonic() + 60
        while b"asks" not in shown and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    shown += os.read(master, 4096)
                except OSError:            # EIO: the attach ended, its tty closed
                    break
        assert b"asks" in shown, (shown, attached.wait(10), attached.stderr.read())
        os.write(master, b"\x1b[12;1R")        # a terminal's answer, during the replay
        time.sleep(1.5)
        os.write(master, b"echo ok\r")
        attached.wait(60)
        while select.select([master], [], [], 0.2)[0]:
            try:
                shown += os.read(master, 4096)
            except OSError:
                break
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()
        os.close(master)
    assert b"\x1b[6n" not in shown, shown           # the query was not replayed
    assert seen.read_bytes() == b"echo ok"
    assert attached.returncode == 0, attached.stderr.read()


def test_attach_with_a_big_input_for_a_process_not_reading_yet_loses_nothing(cli, tmp_path):
    """The agent holds at most 4 MiB of input a process has not read; past 1 MiB it tells
    the client to hold its stdin until the process catches up. `tether attach < FILE`
    used to send on and lose everything past the limit."""
    flag = tmp_path / "read-now"
    endpoint, primary = cli.start("/bin/sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; "
                                  "done; exec wc -c")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (12 << 20))
    with open(big, "rb") as source:
        attached = subprocess.Popen([sys.executable, "-m", "tether", "attach", endpoint, primary],
                                    cwd=REPO, env=cli.env, stdin=source,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cli.box.wait_for_log(r"attach|attached", timeout=60)
        time.sleep(3)          # the client sends what it may meanwhile (not a timing check)
        flag.touch()
        out, err = attached.communicate(timeout=120)
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()
    assert out.strip() == str(12 << 20).encode(), err
    assert attached.returncode == 0, err
    assert "dropping input" not in cli.box.log_text()
