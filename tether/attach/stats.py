"""What the attach server reports about sessions: the port layer's ProcessRunState in
`list`, and resource figures for `stats`: from the session's cgroup where it has them
(tether/cgroups.py), else by walking its processes."""
from __future__ import annotations

import os
import time

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



def collect_stats(sessions: dict) -> dict:
    import psutil   # only when someone asks
    memory = psutil.virtual_memory()
    result = {"time": time.time(), "cpus": psutil.cpu_count(),
              "load": list(os.getloadavg()),
              "memory": {"total": memory.total, "available": memory.available},
              "sessions": {}}
    for sid, session in sessions.items():
        entry = {"pid": session.pid, "running": bool(session.running), "cpu_seconds": 0.0,
                 "rss": 0, "pids": 0, "output_bytes": getattr(session, "output_bytes", 0),
                 "spliced_bytes": getattr(session, "spliced_bytes", 0)}
        group = getattr(session, "cgroup", None)
        figures = group.stats() if group is not None and session.running else {}
        if {"cpu_usec", "memory_bytes", "pids"} <= figures.keys():
            # the session's cgroup counts everything it started, exited children included
            entry.update(source="cgroup", cpu_seconds=figures["cpu_usec"] / 1e6,
                         cpu_usec=figures["cpu_usec"], rss=figures["memory_bytes"],
                         memory_bytes=figures["memory_bytes"], pids=figures["pids"],
                         oom_kills=figures.get("oom_kills", 0))
        elif session.running and session.pid:
            try:
                top = psutil.Process(session.pid)
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
