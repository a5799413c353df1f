"""What the agent adds around a session's launch and exit: its cgroup and limits, its
privileges, the lifecycle hooks, and the structured exit record.

`Session` calls, in order: `prepare` (before the fork: make the group, apply the limits,
decide the privileges; a problem is a LaunchError), then, in the forked child, the
`ChildSetup`'s `join`, `wait`, `before_setuid` and `after_setuid`; `before_release` (the
process exists and waits: the launch hooks), then `launched` or `launch_failed`, and at
the end `exited` (the exit record, poststop hooks, the group removed). The session knows
these only as methods of the objects it is given: it imports nothing from here.
Everything runs on the loop thread.
"""
from __future__ import annotations

import os

from tether import privileges, signals
from tether.config import EXITED, OOM, SIGNALLED, STOPPED, ExitRecord
from tether.log import get_logger

log = get_logger("tether.isolation")

MAX_EXIT_RECORDS = 5
READY, GO = b"R", b"G"


# What of the kernel a session in its own mount namespace sees read-only (moby's
# readonly paths, and /sys): the sysctls and /proc/sysrq-trigger are the whole machine's,
# not the namespaces', and root writes them with no capability at all (core_pattern runs
# a program as full root; sysrq reboots; /sys/power/state suspends).
READ_ONLY_PATHS = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs",
                   "/proc/scsi", "/proc/acpi", "/sys")


def _reopen_ttys(ttys: dict[int, str], root: str) -> None:
    """A tty session's pty, opened by the agent in the root's devpts, named by its path in
    the agent's namespace (readlink of /proc/self/fd/0 said `<root>/dev/pts/0`, which
    musl's ttyname rejects): opened again by its name inside, the same tty."""
    prefix = root.rstrip("/") + "/"
    opened: dict[str, int] = {}
    for fd, name in ttys.items():
        if not name.startswith(prefix):
            continue   # not the root's own devpts
        inner = "/" + name[len(prefix):]
        if inner not in opened:
            opened[inner] = os.open(inner, os.O_RDWR | os.O_NOCTTY)
        os.dup2(opened[inner], fd)
    for fd in opened.values():
        os.close(fd)


class ChildSetup:
    """Plain data for the child: the cgroup.procs fds to write itself into, the privilege
    plan, whether to wait for the launch hooks (`sync`), and whether the session gets a
    mount namespace of its own (`own_mounts`, see `enter_root`)."""
    __slots__ = ("procs_fds", "plan", "sync", "own_mounts")

    def __init__(self, procs_fds: list[int], plan, sync: bool, own_mounts: bool = False):
        self.procs_fds = procs_fds
        self.plan = plan
        self.sync = sync
        self.own_mounts = own_mounts

    def close(self) -> None:
        """The parent's copies, once the child is forked."""
        for fd in self.procs_fds:
            os.close(fd)
        self.procs_fds = []

    # -- in the forked child: os-level calls only ------------------------------------------
    def join(self) -> None:
        """First thing in the child: into the session's cgroup, before anything is charged."""
        for fd in self.procs_fds:
            os.write(fd, b"0")

    def enter_root(self, root: str) -> None:
        """Make `root` the process's root. With `own_mounts`, not a bare chroot, which a
        root process with CAP_SYS_CHROOT (Docker's default set) leaves at once (chroot
        into a subdirectory, `..` up from the old cwd, chroot "."): a mount namespace of
        its own, a slave of the agent's (the mounts the agent makes in the root later
        still arrive), the root bound and moved over "/" as switch_root does, so `..`
        above it leads back to it; then the kernel's knobs read-only (READ_ONLY_PATHS)."""
        if not self.own_mounts:
            os.chroot(root)
            return
        from tether import system
        ttys = {fd: os.readlink(system.fd_path(fd)) for fd in (0, 1, 2) if os.isatty(fd)}
        system.unshare(system.CLONE_NEWNS)
        system.mount(None, "/", None, system.MS_REC | system.MS_SLAVE)
        system.mount(root, root, None, system.MS_BIND | system.MS_REC)
        os.chdir(root)
        system.mount(".", "/", None, system.MS_MOVE)
        os.chroot(".")
        _reopen_ttys(ttys, root)
        for path in READ_ONLY_PATHS:
            try:
                system.mount(path, path, None, system.MS_BIND | system.MS_REC)
            except FileNotFoundError:
                continue   # not in this root (no /proc bound there) or not in this kernel
            system.mount(None, path, None, system.MS_REMOUNT | system.MS_BIND | system.MS_RDONLY
                         | system.MS_NOSUID | system.MS_NODEV | system.MS_NOEXEC)

    @staticmethod
    def wait(sync_fd: int) -> None:
        """Tell the agent the process is set up, and wait until its launch hooks have run.
        EOF instead of the go-ahead: the launch was called off."""
        os.write(sync_fd, READY)
        if os.read(sync_fd, 1) != GO:
            os._exit(127)

    def before_setuid(self) -> None:
        privileges.before_setuid(self.plan)

    def after_setuid(self) -> None:
        privileges.after_setuid(self.plan)


class Isolation:
    def __init__(self, *, cgroups=None, cgroups_problem: str = "", config=None,
                 root: str = "/", sandboxed: bool = False):
        self.cgroups = cgroups                  # tether.cgroups.Cgroups, or None
        self.cgroups_problem = cgroups_problem  # why there are none, for `started`
        self.config = config                    # the ExecutorConfig (hooks)
        self.root = root
        # The agent of `tether sandbox`: with a container root (--rootfs) its sessions
        # share this machine's kernel and devices, so each gets a mount namespace of its
        # own (ChildSetup.enter_root; the sandbox made the root a shared mount for that),
        # and the default capabilities leave out MKNOD (privileges.SANDBOX_DEFAULT).
        self.sandboxed = sandboxed
        self._pending: dict[str, list[str]] = {}   # session ID -> poststart failures
        self._oom_seen: dict[str, int] = {}

    # -- before the fork ------------------------------------------------------------------
    def prepare(self, session, uid: int) -> ChildSetup:
        """The session's group (made, limited) and privilege plan. Raises LaunchError."""
        from tether.sessions import LaunchError
        cfg = session.config
        limits = cfg.limits
        confined = self.sandboxed and self.root not in ("", "/")
        try:
            plan = privileges.plan_for(cfg, uid, default=privileges.SANDBOX_DEFAULT
                                       if confined else privileges.DEFAULT)
        except privileges.PrivilegeError as err:
            raise LaunchError(str(err)) from None
        if limits.cpus > 0 and limits.cpu_mhz > 0:
            raise LaunchError("limits: give cpus or cpu_mhz, not both")
        fds: list[int] = []
        session.cgroup = None
        if self.cgroups is not None:
            from tether.cgroups import CgroupError, cpus_from_mhz
            group = self.cgroups.group_for(session.id)
            try:
                cpus = limits.cpus if limits.cpus > 0 else (
                    cpus_from_mhz(limits.cpu_mhz) if limits.cpu_mhz > 0 else 0.0)
                group.create()
                group.apply(limits, cpus)
                for path in group.procs_paths():
                    fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            except (CgroupError, OSError) as err:
                for fd in fds:
                    os.close(fd)
                self.cgroups.release(group)
                raise LaunchError(f"limits: {err}") from None
            session.cgroup = group
            self._oom_seen[session.id] = group.oom_kills_at_launch
            self.cgroups.watch_oom(group, lambda: self._on_oom(session))
        elif limits.any():
            raise LaunchError(f"limits: {self.cgroups_problem or 'no cgroups here'}")
        if limits.any() or cfg.capabilities is not None or cfg.no_new_privileges:
            log.info("session %s: %s; capabilities %s", session.id,
                     describe_limits(limits), privileges.describe(plan))
        if confined:
            from tether import _linux, system  # noqa: F401 - the child's mounts, loaded here
        return ChildSetup(fds, plan, sync=self._hooks_for(session, "launch"),
                          own_mounts=confined)

    def _hooks_for(self, session, which: str) -> bool:
        if not session.primary or self.config is None or not self.config.hooks.any():
            return False
        from tether import hooks as hook_runner   # only for a config that has hooks
        points = hook_runner.LAUNCH_POINTS if which == "launch" else (which,)
        return any(self.config.hooks.at(p) for p in points)

    def _state(self, session, status: str) -> bytes:
        from tether import hooks as hook_runner
        return hook_runner.state(session.id, status, session.pid, self.root,
                                 getattr(self.config, "annotations", None))

    # -- the process exists and waits --------------------------------------------------------
    def before_release(self, session, pid: int) -> None:
        """The launch hooks, in the OCI runtime spec's order. Raises LaunchError at the
        first failure."""
        from tether import hooks as hook_runner
        from tether.sessions import LaunchError
        doc = hook_runner.state(session.id, "created", pid, self.root,
                                getattr(self.config, "annotations", None))
        try:
            for point in hook_runner.LAUNCH_POINTS:
                hook_runner.run_point(self.config.hooks, point, doc, self.root)
        except hook_runner.HookError as err:
            raise LaunchError(str(err)) from None

    def launched(self, session) -> None:
        if self._hooks_for(session, "poststart"):
            from tether import hooks as hook_runner
            failures = hook_runner.run_point(self.config.hooks, "poststart",
                                             self._state(session, "running"), self.root,
                                             keep_going=True)
            if failures:
                self._pending[session.id] = failures

    def launch_failed(self, session) -> None:
        self._release(session)

    # -- the end ----------------------------------------------------------------------------
    def _on_oom(self, session) -> None:
        group = session.cgroup
        if group is None:
            return
        count = group.oom_kills()
        seen = self._oom_seen.get(session.id, 0)
        if count > seen:
            self._oom_seen[session.id] = count
            log.warning("session %s: the OOM killer killed %d process(es) in its cgroup "
                        "(memory limit %s)", session.id, count - seen,
                        _bytes(session.config.limits.memory_bytes))

    def exited(self, session, status: int) -> ExitRecord:
        """Append the exit record (and note an OOM kill in the reference's exit log), run
        the poststop hooks, remove the group."""
        from extraconfig.gotime import GoTime
        cfg = session.config
        group = session.cgroup
        oom = group is not None and group.oom_kills() > group.oom_kills_at_launch
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        if oom and sig == signals.SIGKILL:
            reason = OOM
        elif getattr(session, "stop_requested", False):
            reason = STOPPED
        elif sig:
            reason = SIGNALLED
        else:
            reason = EXITED
        messages = self._pending.pop(session.id, [])
        record = ExitRecord(time=GoTime.now(), exit_code=128 + sig if sig else
                            os.waitstatus_to_exitcode(status), signal=sig,
                            oom_killed=oom, reason=reason)
        if oom:
            log.warning("session %s %s OOM-killed (memory limit %s)", session.id,
                        "was" if reason == OOM else "exited; processes in its cgroup were",
                        _bytes(cfg.limits.memory_bytes))
            logs = cfg.diagnostics.exit_logs
            if logs:
                logs[-1].message += " (out of memory: the OOM killer)"
        self._release(session)
        if self._hooks_for(session, "poststop"):
            from tether import hooks as hook_runner
            messages += hook_runner.run_point(self.config.hooks, "poststop",
                                              self._state(session, "stopped"), self.root,
                                              keep_going=True)
        if messages:
            record.message = "; ".join(messages)
            logs = cfg.diagnostics.exit_logs
            if logs:
                logs[-1].message += " (" + record.message + ")"
        records = list(cfg.exit_records or [])
        records.append(record)
        cfg.exit_records = records[-MAX_EXIT_RECORDS:]
        return record

    def _release(self, session) -> None:
        group = getattr(session, "cgroup", None)
        session.cgroup = None
        if group is not None and self.cgroups is not None:
            self.cgroups.release(group)
            self.cgroups.sweep()
        self._oom_seen.pop(session.id, None)

    def stats(self, session) -> dict:
        group = getattr(session, "cgroup", None)
        return group.stats() if group is not None and session.running else {}

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()


def _bytes(n: int) -> str:
    if n <= 0:
        return "none"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def describe_limits(limits) -> str:
    parts = []
    if limits.memory_bytes > 0:
        parts.append(f"memory {_bytes(limits.memory_bytes)}")
    if limits.cpus > 0:
        parts.append(f"cpus {limits.cpus:g}")
    if limits.cpu_mhz > 0:
        parts.append(f"cpu {limits.cpu_mhz} MHz")
    if limits.pids > 0:
        parts.append(f"pids {limits.pids}")
    return "limits " + (", ".join(parts) if parts else "none")
