"""Lifecycle hooks: programs the agent runs at the OCI runtime spec's hook points
(docs/agent.md, "Hooks"), the OCI state on stdin.

The container of OCI is the executor; its process is the primary session. Around each
launch of the primary the agent runs, in order:

    prestart, createRuntime, createContainer, startContainer   (status "created", pid
        set: the process exists, set up and waiting, and runs nothing of its own yet)
    poststart                                                  (status "running")
    poststop, after it exited                                  (status "stopped")

A hook of the first four points that fails (exits non-zero, is killed, cannot be run, or
outlives its timeout) stops the launch: the process is killed and `started` carries the
hook's message. A failing poststart or poststop hook is logged, the remaining hooks still
run, and the message goes into the exit record. createContainer and startContainer run
chrooted into the container root (OCI calls them in the container's namespace); the
others in the agent's.

Each hook gets exactly its `env`, its `args` (args[0] included; just the path when
empty), the state JSON on stdin, its own process group, and `timeout` seconds (30 when
unset) before the group is killed. Hooks run on the agent's loop thread, one at a time,
as runc runs them: the loop waits for them.
"""
from __future__ import annotations

import os
import select
import time

from tether import signals
from tether.console import escape_unprintable
from tether.log import get_logger

log = get_logger("tether.hooks")

DEFAULT_TIMEOUT = 30
LONGEST_WAIT = 1 << 31   # seconds: a longer timeout is as good as none (and fits a float)
POLL_SLICE = 3600        # seconds: poll(2) takes at most INT_MAX milliseconds
OCI_VERSION = "1.0.2"
OUTPUT_KEPT = 4096
IN_CONTAINER = ("create_container", "start_container")
# our field names -> the OCI runtime spec's (config.json `hooks`)
OCI_NAMES = {"prestart": "prestart", "create_runtime": "createRuntime",
             "create_container": "createContainer", "start_container": "startContainer",
             "poststart": "poststart", "poststop": "poststop"}
LAUNCH_POINTS = ("prestart", "create_runtime", "create_container", "start_container")


class HookError(Exception):
    """A hook failed; the message names the point, the index, the path and what happened."""


def state(session_id: str, status: str, pid: int | None, bundle: str,
          annotations: dict | None = None) -> bytes:
    """The OCI state document."""
    doc: dict = {"ociVersion": OCI_VERSION, "id": session_id, "status": status,
                 "bundle": bundle}
    if pid:
        doc["pid"] = pid
    if annotations:
        doc["annotations"] = dict(annotations)
    import json   # when a hook runs: PID 1 imports this module on every boot
    return json.dumps(doc).encode()


def run_point(hooks, point: str, state_json: bytes, root: str = "/",
              keep_going: bool = False) -> list[str]:
    """Run every hook of `point` in order. Raises HookError at the first failure, or with
    `keep_going`, runs them all and returns the failure messages."""
    failures = []
    for index, hook in enumerate(hooks.at(point)):
        try:
            run_hook(point, index, hook, state_json,
                     root if point in IN_CONTAINER else "/")
        except HookError as err:
            if not keep_going:
                raise
            log.warning("%s", err)
            failures.append(str(err))
    return failures


def run_hook(point: str, index: int, hook, state_json: bytes, root: str = "/") -> None:
    name = f"{OCI_NAMES.get(point, point)} hook {index} ({hook.path})"
    if not hook.path:
        raise HookError(f"{name}: no path")
    timeout = hook.timeout if hook.timeout and hook.timeout > 0 else DEFAULT_TIMEOUT
    args = list(hook.args) if hook.args else [hook.path]
    env = dict(e.split("=", 1) if "=" in e else (e, "") for e in (hook.env or []))
    started = time.monotonic()
    pid, stdin_w, output_r = _spawn(name, hook.path, args, env, root)
    try:
        status, output, timed_out = _wait(pid, stdin_w, state_json, output_r,
                                          started + min(timeout, LONGEST_WAIT))
    finally:
        os.close(output_r)
    took = time.monotonic() - started
    # what the hook printed (a program of the container's image, for two of the points)
    # goes into our log and `started`: escaped, so it can neither forge a log line nor
    # drive the terminal that shows either
    text = escape_unprintable(output.decode(errors="replace").strip(), keep="\n")
    if timed_out:
        raise HookError(f"{name}: timed out after {timeout}s" + _tail(text))
    if os.WIFSIGNALED(status):
        raise HookError(f"{name}: killed by {signals.name(os.WTERMSIG(status))}"
                        + _tail(text))
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise HookError(f"{name}: exited {code}" + _tail(text))
    log.info("%s ran in %.2fs", name, took)
    if text:
        log.debug("%s said: %s", name, text[-OUTPUT_KEPT:].replace("\n", "\\n"))


def _tail(text: str) -> str:
    """The end of what a failed hook printed, for `started`: its last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    return f": {lines[-1][-200:]}" if lines else ""


def _spawn(name: str, path: str, args: list[str], env: dict, root: str):
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    old_mask = signals.pthread_sigmask(signals.SIG_BLOCK, signals.valid_signals())
    try:
        pid = os.fork()
    except BaseException:
        signals.pthread_sigmask(signals.SIG_SETMASK, old_mask)
        for fd in (stdin_r, stdin_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    if pid == 0:   # the child: os-level calls only, never returns
        step = "setsid"
        try:
            os.setsid()
            step = "set up stdio"
            os.dup2(stdin_r, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            if root not in ("", "/"):
                step = f"chroot {root}"
                os.chroot(root)
            os.chdir("/")
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 1 << 20)
            for signum in range(1, signals.NSIG):
                try:
                    signals.signal(signum, signals.SIG_DFL)
                except (OSError, ValueError):
                    pass
            signals.pthread_sigmask(signals.SIG_SETMASK, ())
            step = f"exec {path}"
            os.execve(path, args, env)
        except OSError as err:
            msg = f"{step}: {os.strerror(err.errno) if err.errno else err}"
        except BaseException as err:   # noqa: BLE001
            msg = f"{step}: {err}"
        try:
            os.write(err_w, msg.encode(errors="replace"))
        finally:
            os._exit(127)
    signals.pthread_sigmask(signals.SIG_SETMASK, old_mask)
    for fd in (stdin_r, out_w, err_w):
        os.close(fd)
    try:
        report = b""
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            report += chunk
    finally:
        os.close(err_r)
    if report:
        os.waitpid(pid, 0)
        os.close(stdin_w)
        os.close(out_r)
        raise HookError(f"{name}: cannot run: {report.decode(errors='replace')}")
    return pid, stdin_w, out_r


def _wait(pid: int, stdin_w: int, state_json: bytes, output_r: int,
          deadline: float) -> tuple[int, bytes, bool]:
    """Write the state to the hook's stdin and collect its output until it exits or the
    deadline; then kill its group. Closes `stdin_w`. A hook that does not read its stdin
    does not hold us past the deadline (a state larger than a pipe, big annotations).
    poll(2), not select(2): PID 1 may hold fds past select's 1024."""
    pidfd = os.pidfd_open(pid)
    output = bytearray()
    timed_out = False
    open_output = True
    unwritten = memoryview(state_json)
    os.set_blocking(stdin_w, False)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(output_r, select.POLLIN)
    poller.register(stdin_w, select.POLLOUT)
    try:
        while True:
            if stdin_w >= 0 and not unwritten:
                poller.unregister(stdin_w)
                os.close(stdin_w)
                stdin_w = -1
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready = dict(poller.poll(min(left, POLL_SLICE) * 1000))
            if stdin_w in ready:
                try:
                    unwritten = unwritten[os.write(stdin_w, unwritten):]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    unwritten = unwritten[:0]   # the hook does not read its stdin: its business
            if output_r in ready:
                chunk = os.read(output_r, 65536)
                if chunk:
                    output += chunk
                    del output[:-OUTPUT_KEPT]
                else:
                    open_output = False
                    poller.unregister(output_r)
            if pidfd in ready:
                break
    finally:
        os.close(pidfd)
        if stdin_w >= 0:
            os.close(stdin_w)
    if timed_out:
        try:
            os.killpg(pid, signals.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    # what is left in the pipe (a hook's children may still hold it: do not wait for them)
    os.set_blocking(output_r, False)
    try:
        while open_output:
            chunk = os.read(output_r, 65536)
            if not chunk:
                break
            output += chunk
    except BlockingIOError:
        pass
    return status, bytes(output[-OUTPUT_KEPT:]), timed_out
