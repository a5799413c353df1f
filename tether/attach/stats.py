"""What the attach server reports about sessions: the port layer's ProcessRunState in
`list`, and resource figures for `stats`: from the session's cgroup where it has them
(tether/cgroups.py), else by walking its processes, on a worker thread. Both come in
pages for a client that asks for them (any number of sessions; a frame holds 1 MiB)."""
from __future__ import annotations

import os
import threading
import time
from collections import deque

import msgpack

from tether.attach.protocol import plain
from tether.sessions import Phase

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def _rfc3339(seconds: int) -> str:
    if not seconds:
        return GO_ZERO_TIME
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# The port layer's ProcessRunState statuses; a finishing process has no exit recorded yet.
RUN_STATUS = {Phase.CREATED: "created", Phase.BLOCKED: "blocked", Phase.RUNNING: "running",
              Phase.FINISHING: "running", Phase.EXITED: "exited", Phase.FAILED: "failed"}


def process_run_state(session) -> dict:
    """The port layer's ProcessRunState for a session, with its Go field names
    (`vmware/vic lib/portlayer/exec2/container.go`; docs/attach-protocol.md)."""
    cfg = session.config
    status = RUN_STATUS[session.phase]
    logs = cfg.diagnostics.exit_logs or []
    message = logs[-1].message if logs and status == "exited" else ""
    if status == "failed":
        message = cfg.started
    return {"ProcessID": session.id, "Status": status, "GuestPid": session.pid or 0,
            "ExitCode": cfg.exit_status, "ExitMsg": message,
            "StartedAt": _rfc3339(cfg.detail.start_time),
            "FinishedAt": _rfc3339(cfg.detail.stop_time)}


# -- pages: `list` and `stats` for any number of sessions -----------------------------------
# A reply is one frame (at most 1 MiB), and 2,500 sessions' states fill one: a client asks
# for the sessions after a given ID and gets those that fit a page, and the ID to ask
# after next (docs/attach-protocol.md, "Pages").
PAGE_BYTES = 512 << 10        # of a page's entries, well under a frame's 1 MiB
STATS_ENTRY_BYTES = 512       # what a `stats` entry holds besides its ID, at most


def sessions_after(sessions: dict, after: str | None) -> list:
    """(ID, session) in ID order: all of them, or those whose ID sorts after `after`."""
    return sorted(item for item in sessions.items() if after is None or item[0] > after)


def list_page(sessions: dict, after: str) -> tuple[list[dict], bool]:
    """The `list` states of the sessions after `after` that fit PAGE_BYTES (one at
    least), and whether more follow."""
    states, used = [], 0
    for sid, session in sessions_after(sessions, after):
        state = list_state(session)
        used += len(msgpack.packb(state, use_bin_type=True))
        if states and used > PAGE_BYTES:
            return states, True
        states.append(state)
    return states, False


def list_state(session) -> dict:
    state = plain(session.state())
    state["run_state"] = process_run_state(session)
    return state


def stats_page(items: list) -> int:
    """How many of `items` (ID, session) one `stats` page holds (one at least)."""
    used = 0
    for count, (sid, _) in enumerate(items):
        used += len(sid.encode(errors="surrogateescape")) + STATS_ENTRY_BYTES
        if count and used > PAGE_BYTES:
            return count
    return len(items)


def snapshot(items: list) -> list[tuple]:
    """What `collect_stats` needs of each session, taken on the loop (the sessions change
    there) for the worker thread: (ID, pid, running, output_bytes, spliced_bytes, cgroup)."""
    return [(sid, session.pid, bool(session.running), getattr(session, "output_bytes", 0),
             getattr(session, "spliced_bytes", 0), getattr(session, "cgroup", None))
            for sid, session in items]


def collect_stats(sessions: list[tuple]) -> dict:
    """The `stats` figures of a snapshot(); reads the cgroups and walks processes, so it
    runs on a worker thread (StatsWorker), never on the agent's loop."""
    import psutil   # only when someone asks
    memory = psutil.virtual_memory()
    result = {"time": time.time(), "cpus": psutil.cpu_count(),
              "load": list(os.getloadavg()),
              "memory": {"total": memory.total, "available": memory.available},
              "sessions": {}}
    for sid, pid, running, output_bytes, spliced_bytes, group in sessions:
        entry = {"pid": pid, "running": running, "cpu_seconds": 0.0, "rss": 0, "pids": 0,
                 "output_bytes": output_bytes, "spliced_bytes": spliced_bytes}
        figures = group.stats() if group is not None and running else {}
        if {"cpu_usec", "memory_bytes", "pids"} <= figures.keys():
            # the session's cgroup counts everything it started, exited children included
            entry.update(source="cgroup", cpu_seconds=figures["cpu_usec"] / 1e6,
                         cpu_usec=figures["cpu_usec"], rss=figures["memory_bytes"],
                         memory_bytes=figures["memory_bytes"], pids=figures["pids"],
                         oom_kills=figures.get("oom_kills", 0))
        elif running and pid:
            try:
                top = psutil.Process(pid)
                procs = [top] + top.children(recursive=True)
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        entry["cpu_seconds"] += cpu.user + cpu.system
                        entry["rss"] += proc.memory_info().rss
                        entry["pids"] += 1
                except psutil.Error:
                    continue
        result["sessions"][sid] = entry
    return result


class StatsWorker:
    """Runs `stats` collections one after another on a worker thread, off the agent's
    loop: walking a container of many processes takes long, and on the loop it stalled
    every session's I/O. `submit(work, done)`: `done(result)` runs on the loop with what
    `work()` returned, or the exception it raised."""

    def __init__(self, loop):
        self.loop = loop
        self._lock = threading.Lock()
        self._jobs: deque = deque()
        self._running = False
        self._closed = False

    def submit(self, work, done) -> None:
        with self._lock:
            if self._closed:
                raise ValueError("stats: the attach server is shutting down")
            self._jobs.append((work, done))
            if self._running:
                return
            self._running = True
        try:
            threading.Thread(target=self._run, name="attach stats", daemon=True).start()
        except BaseException:
            with self._lock:
                self._running = False
                self._jobs.clear()
            raise

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                work, done = self._jobs.popleft()
            try:
                result = work()
            except Exception as err:   # noqa: BLE001 - reaches the client as an error
                result = err
            with self._lock:   # never after close: the loop's wake-up fd may be gone
                if self._closed:
                    self._running = False
                    return
                self.loop.call_soon_threadsafe(lambda done=done, result=result: done(result))

    def close(self) -> None:
        """Post nothing more to the loop (the agent is stopping); what runs is dropped."""
        with self._lock:
            self._closed = True
            self._jobs.clear()
