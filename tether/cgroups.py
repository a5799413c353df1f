"""One cgroup per session: its limits, its figures, its OOM kills, and its removal.

The agent, as PID 1, mounts the cgroup filesystem itself (`mount_hierarchies`): cgroup2 at
/sys/fs/cgroup, where the kernel offers its controllers there. A kernel whose memory,
cpu or pids controllers are bound to cgroup v1 hierarchies (a host that booted with
them, as the sandbox may find) gets systemd's hybrid layout instead: a tmpfs at
/sys/fs/cgroup, one v1 mount per hierarchy, cgroup2 at /sys/fs/cgroup/unified. Each
controller is then used where it lives (`Layout`), so one `Group` may span several
directories.

A session's group is `<base>/session-<id>`, where base is the agent's own cgroup: the
root in a VM, the delegated group `tether sandbox` made for it (`delegate`, `enter`)
under the sandbox's cgroup namespace. The child joins its group before it execs
(`Group.procs_paths`, written by the child itself). After exit the group is removed; while
something the session left behind still runs in it, removal waits for the group to
empty (cgroup.events `populated 0` on v2, the next sweep on v1).

OOM kills are watched without polling: inotify on memory.events (v2), or an eventfd
registered for memory.oom_control through cgroup.event_control (v1). The count itself
(`oom_kill`) is read from the files, so a watch event that comes after the exit loses
nothing.
"""
from __future__ import annotations

import errno
import os
import struct
import time
from _collections_abc import Callable   # collections.abc's, already loaded by os

from tether.log import get_logger

log = get_logger("tether.cgroups")

CGROUP_ROOT = "/sys/fs/cgroup"
CPU_PERIOD = 100_000          # microseconds; cpu.max's and cfs's default period
MIN_QUOTA = 1_000             # the kernel refuses quotas under 1 ms
CONTROLLERS = ("memory", "cpu", "pids")
V1_WANTED = ("memory", "cpu", "cpuacct", "pids")
GROUP_PREFIX = "session-"
AGENT_LEAF = "agent"          # where the agent moves itself so its group may delegate
SANDBOX_PREFIX = "tether-sandbox-"
# What a session ID keeps in its group's name; any other character becomes "_". (No re on
# the VM's boot path: it costs more than the whole cgroups step.)
_GROUP_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
CLONE_NEWCGROUP = 0x02000000
# cgroup v1 notifies an OOM before the kill is counted: seconds after it to read again
V1_OOM_RECHECKS = (0.05, 0.5)

IN_MODIFY = 0x2
IN_IGNORED = 0x8000
_EVENT = struct.Struct("iIII")


class CgroupError(Exception):
    """A cgroup could not be made or limited; the text goes into `started`."""


# -- reading the machine's layout -----------------------------------------------------------
def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def own_cgroups(path: str = "/proc/self/cgroup") -> tuple[str | None, dict[str, tuple[str, ...]],
                                                          dict[tuple[str, ...], str]]:
    """(our v2 path or None, v1 controller -> its hierarchy's controller tuple,
    v1 hierarchy -> our path in it), from /proc/self/cgroup."""
    v2 = None
    by_controller: dict[str, tuple[str, ...]] = {}
    paths: dict[tuple[str, ...], str] = {}
    for line in _read(path).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, where = parts
        if not controllers:
            v2 = where
            continue
        names = tuple(c for c in controllers.split(",") if not c.startswith("name="))
        if not names:
            continue
        paths[names] = where
        for name in names:
            by_controller[name] = names
    return v2, by_controller, paths


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """(mount point, fstype, root inside the hierarchy, super options) of cgroup mounts."""
    found = []
    for line in _read(mountinfo).splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        found.append((point, rest[0], fields[3], rest[2]))
    return found


class Layout:
    """Where each controller lives: controller -> (cgroup version, our base directory).
    `core` is our v2 directory, when a v2 hierarchy is mounted (cpu.stat is always there)."""

    def __init__(self, controllers: dict[str, tuple[int, str]], core: str | None):
        self.controllers = controllers
        self.core = core

    def __repr__(self) -> str:
        parts = [f"{c}=v{v}:{d}" for c, (v, d) in sorted(self.controllers.items())]
        return f"Layout({', '.join(parts)}, core={self.core})"

    def version_of(self, controller: str) -> int | None:
        found = self.controllers.get(controller)
        return found[0] if found else None

    def describe(self) -> str:
        if not self.controllers:
            return "no controllers"
        return ", ".join(f"{c} (v{v})" for c, (v, _) in sorted(self.controllers.items()))


def _join(point: str, mount_root: str, own: str) -> str | None:
    """Our directory in a hierarchy mounted at `point` whose root is `mount_root`."""
    if mount_root == "/":
        rel = own
    elif own == mount_root or own.startswith(mount_root.rstrip("/") + "/"):
        rel = own[len(mount_root):]
    else:
        return None
    return os.path.normpath(point + "/" + rel.lstrip("/"))


def find_layout(root: str = CGROUP_ROOT) -> Layout:
    """Our groups in the hierarchies mounted under `root`; v2 wins where it has the
    controller enabled for us."""
    v2_path, v1_of, v1_paths = own_cgroups()
    controllers: dict[str, tuple[int, str]] = {}
    core = None
    for point, fstype, mount_root, options in cgroup_mounts():
        if not (point == root or point.startswith(root.rstrip("/") + "/")):
            continue
        if fstype == "cgroup2" and v2_path is not None and core is None:
            core = _join(point, mount_root, v2_path)
        elif fstype == "cgroup":
            names = tuple(o for o in options.split(",") if o in v1_of)
            if not names:
                continue
            own = v1_paths.get(v1_of[names[0]])
            base = _join(point, mount_root, own) if own is not None else None
            if base is None:
                continue
            for name in v1_of[names[0]]:
                if name in V1_WANTED and name not in controllers:
                    controllers[name] = (1, base)
    if core is not None:
        try:
            offered = set(_read(os.path.join(core, "cgroup.controllers")).split())
        except OSError:
            offered = set()
        for name in CONTROLLERS:
            if name in offered:
                controllers[name] = (2, core)
    return Layout(controllers, core)


def not_at_root() -> str | None:
    """None when the agent's cgroups are roots of their own (a VM's hierarchy, or the
    cgroup namespace `tether sandbox` gives it), else where it is: a host's group, which
    it must leave alone (say, PID 1 of a PID namespace without a cgroup namespace)."""
    v2, _, v1_paths = own_cgroups()
    elsewhere = sorted({p for p in [v2, *v1_paths.values()] if p not in (None, "/")})
    if elsewhere:
        return (f"the agent is in the cgroup {elsewhere[0]}, not at the root of a "
                "hierarchy (a VM's, or the sandbox's cgroup namespace): it leaves the "
                "host's cgroups alone")
    return None


def mount_hierarchies(root: str = CGROUP_ROOT) -> str:
    """As PID 1: mount the cgroup filesystem at `root` unless something is mounted there.
    Returns what was done, for the log."""
    from tether import system
    if any(point == root for point, *_ in cgroup_mounts()) or os.path.ismount(root):
        return f"{root} already mounted"
    _, v1_of, _ = own_cgroups()
    hierarchies = sorted({names for name, names in v1_of.items() if name in V1_WANTED})
    flags = system.MS_NOSUID | system.MS_NODEV | system.MS_NOEXEC
    os.makedirs(root, exist_ok=True)
    if not hierarchies:
        system.mount("cgroup2", root, "cgroup2", flags)
        return f"cgroup2 on {root}"
    # Hybrid: the kernel keeps these controllers on v1 (someone mounted them before us).
    system.mount("tmpfs", root, "tmpfs", flags, "mode=0755")
    for names in hierarchies:
        target = os.path.join(root, ",".join(names))
        os.makedirs(target, exist_ok=True)
        system.mount("cgroup", target, "cgroup", flags, ",".join(names))
    unified = os.path.join(root, "unified")
    os.makedirs(unified, exist_ok=True)
    system.mount("cgroup2", unified, "cgroup2", flags)
    return (f"cgroup v1 {' '.join(','.join(n) for n in hierarchies)} and cgroup2 on {root} "
            "(the kernel has these controllers on v1)")


# -- the sandbox's delegated subtree (run on the host side) -------------------------------
class Delegation:
    """The groups `tether sandbox` made for its agent, one per hierarchy. Held by
    directory fds, so they can be removed after the sandbox's mounts changed what the
    paths show."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._at: list[tuple[int, str]] = []   # (fd of the parent directory, name)

    def add(self, path: str) -> None:
        parent, name = os.path.split(path)
        self._at.append((os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name))
        self.paths.append(path)

    def remove(self, wait: float = 5.0) -> list[str]:
        """rmdir every group below and at each delegated one, deepest first; a group whose
        last task is still dying is retried for up to `wait` seconds. Returns what is left."""
        left = []
        for (fd, name), path in zip(self._at, self.paths):
            deadline = time.monotonic() + wait
            while _rmdir_tree_at(fd, name) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _exists_at(fd, name):
                left.append(path)
            os.close(fd)
        self._at.clear()
        return left


def delegate(name: str) -> Delegation:
    """Make the group `name` under our own group in every hierarchy we use, with the
    controllers enabled for it where v2 allows. Empty groups of sandboxes whose process
    is gone are removed first."""
    done = Delegation()
    layout = find_layout()
    for base in sorted({d for _, d in layout.controllers.values()} | ({layout.core} - {None})):
        _sweep_stale(base)
        target = os.path.join(base, name)
        try:
            os.mkdir(target)
        except FileExistsError:
            pass
        except OSError as err:
            log.warning("cgroups: cannot make %s: %s", target, err.strerror)
            continue
        done.add(target)
    want = [c for c in CONTROLLERS if layout.version_of(c) == 2]
    if layout.core is not None and want:
        try:
            _write(os.path.join(layout.core, "cgroup.subtree_control"),
                   " ".join("+" + c for c in want))
        except OSError as err:
            log.warning("cgroups: cannot delegate %s to %s: %s", " ".join(want),
                        layout.core, err.strerror)
    return done


def group_name(session_id: str) -> str:
    """A session's group: the ID with any character but A-Z, a-z, 0-9, "_", "." and "-"
    made "_", at most 200 of them."""
    return GROUP_PREFIX + "".join(c if c in _GROUP_NAME_CHARS else "_"
                                  for c in session_id)[:200]


def _sweep_stale(base: str) -> None:
    try:
        entries = os.listdir(base)
    except OSError:
        return
    for entry in entries:
        pid = entry[len(SANDBOX_PREFIX):]
        if entry.startswith(SANDBOX_PREFIX) and pid.isdecimal() \
                and not os.path.exists(f"/proc/{pid}"):
            stale = Delegation()
            stale.add(os.path.join(base, entry))
            stale.remove(wait=0)


def enter(directories: list[str]) -> None:
    """Move the calling process into each directory (before it unshares its cgroup
    namespace, so the namespace's root is the delegated group)."""
    for directory in directories:
        _write(os.path.join(directory, "cgroup.procs"), "0")


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _rmdir_tree_at(dir_fd: int, name: str) -> bool:
    """rmdir `name` (under `dir_fd`) and the groups below it; True while something is left."""
    import stat
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    busy = False
    try:
        for entry in os.listdir(fd):
            try:
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                busy |= _rmdir_tree_at(fd, entry)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            log.warning("cgroups: cannot remove %s: %s", name, err.strerror)
        busy = True
    return busy


def _try_rmdir(path: str) -> bool:
    """True while the group is still there (busy)."""
    try:
        os.rmdir(path)
        return False
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            log.warning("cgroups: cannot remove %s: %s", path, err.strerror)
        return True


# -- one session's group ---------------------------------------------------------------------
def _number(text: str) -> int:
    text = text.strip()
    return -1 if text == "max" else int(text)


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def cpu_quota(cpus: float) -> int:
    return max(MIN_QUOTA, round(cpus * CPU_PERIOD))


class Group:
    """A session's cgroup: a directory per hierarchy it spans."""

    def __init__(self, name: str, layout: Layout):
        self.name = name
        self.layout = layout
        self.dirs: dict[str, str] = {c: os.path.join(base, name)
                                     for c, (_, base) in layout.controllers.items()}
        self.core = os.path.join(layout.core, name) if layout.core else None
        self.oom_kills_at_launch = 0

    def directories(self) -> list[str]:
        return sorted(set(self.dirs.values()) | ({self.core} - {None}))

    def procs_paths(self) -> list[str]:
        """The cgroup.procs files the child writes itself into."""
        return [os.path.join(d, "cgroup.procs") for d in self.directories()]

    def create(self) -> None:
        for directory in self.directories():
            try:
                os.mkdir(directory)
            except FileExistsError:
                pass   # a restart while something of the last run is still in it
            except OSError as err:
                raise CgroupError(f"cannot make cgroup {directory}: {err.strerror}") from None

    def _path(self, controller: str, filename: str) -> str | None:
        directory = self.dirs.get(controller)
        return os.path.join(directory, filename) if directory else None

    def _set(self, controller: str, filename: str, value: str, what: str) -> None:
        path = self._path(controller, filename)
        if path is None:
            raise CgroupError(f"{what} needs the {controller} controller, which this "
                              f"machine does not offer (cgroups: {self.layout.describe()})")
        try:
            _write(path, value)
        except OSError as err:
            raise CgroupError(f"{what}: cannot write {value!r} to {path}: "
                              f"{err.strerror}") from None

    def apply(self, limits, cpus: float) -> None:
        """Write the limits (`cpus` already converted from MHz); unset ones are lifted."""
        memory = limits.memory_bytes if limits.memory_bytes > 0 else 0
        pids = limits.pids if limits.pids > 0 else 0
        if "memory" in self.dirs or memory:
            v1 = self.layout.version_of("memory") == 1
            value = str(memory) if memory else ("-1" if v1 else "max")
            self._set("memory", "memory.limit_in_bytes" if v1 else "memory.max", value,
                      "memory limit")
            # memory_bytes is all the session gets: no swap on top of it
            swap = self._path("memory", "memory.memsw.limit_in_bytes" if v1
                              else "memory.swap.max")
            if swap and os.path.exists(swap):
                self._set("memory", os.path.basename(swap),
                          value if v1 else ("0" if memory else "max"), "memory limit")
        if "cpu" in self.dirs or cpus:
            v1 = self.layout.version_of("cpu") == 1
            if v1:
                self._set("cpu", "cpu.cfs_period_us", str(CPU_PERIOD), "CPU limit")
                self._set("cpu", "cpu.cfs_quota_us", str(cpu_quota(cpus)) if cpus else "-1",
                          "CPU limit")
            else:
                self._set("cpu", "cpu.max", f"{cpu_quota(cpus) if cpus else 'max'} "
                          f"{CPU_PERIOD}", "CPU limit")
        if "pids" in self.dirs or pids:
            self._set("pids", "pids.max", str(pids) if pids else "max", "pids limit")
        self.oom_kills_at_launch = self.oom_kills()

    # -- figures --------------------------------------------------------------------------
    def _read_file(self, controller: str | None, filename: str) -> str | None:
        directory = self.dirs.get(controller) if controller else self.core
        if directory is None:
            return None
        try:
            return _read(os.path.join(directory, filename))
        except OSError:
            return None

    def oom_kills(self) -> int:
        v1 = self.layout.version_of("memory") == 1
        text = self._read_file("memory", "memory.oom_control" if v1 else "memory.events")
        return _keyed(text).get("oom_kill", 0) if text else 0

    def stats(self) -> dict:
        """What the group knows: memory_bytes, cpu_usec, pids, oom_kills (when present)."""
        out: dict = {}
        v1_memory = self.layout.version_of("memory") == 1
        text = self._read_file("memory", "memory.usage_in_bytes" if v1_memory
                               else "memory.current")
        if text:
            out["memory_bytes"] = _number(text)
            out["oom_kills"] = self.oom_kills()
        text = self._read_file(None, "cpu.stat")
        if text and "usage_usec" in text:
            out["cpu_usec"] = _keyed(text)["usage_usec"]
        else:
            text = self._read_file("cpuacct", "cpuacct.usage")
            if text:
                out["cpu_usec"] = _number(text) // 1000
        text = self._read_file("pids", "pids.current")
        if text:
            out["pids"] = _number(text)
        return out

    def populated(self) -> bool:
        for directory in self.directories():
            try:
                if _read(os.path.join(directory, "cgroup.procs")).strip():
                    return True
            except OSError:
                continue
        return False

    def remove(self) -> bool:
        """rmdir every directory; False while something still runs in the group."""
        return not any([_try_rmdir(d) for d in self.directories()])


# -- watching memory.events / memory.oom_control -------------------------------------------
class _Inotify:
    def __init__(self) -> None:
        from tether import system
        self._system = system
        self.fd = system.inotify_init()

    def add(self, path: str, mask: int) -> int:
        return self._system.inotify_add_watch(self.fd, path, mask)

    def remove(self, wd: int) -> None:
        self._system.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int]]:
        events = []
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                events.append((wd, mask))
                offset += _EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


class Cgroups:
    """The agent's cgroups: makes a group per session, watches it, removes it."""

    def __init__(self, layout: Layout, loop=None):
        self.layout = layout
        self.loop = loop
        self._inotify: _Inotify | None = None
        self._watches: dict[int, Callable[[], object]] = {}   # inotify wd -> callback
        self._eventfds: dict[str, tuple[int, int]] = {}       # group name -> (efd, ocfd)
        self._group_wds: dict[str, list[int]] = {}
        self._leftover: dict[str, Group] = {}                 # exited, not yet empty

    @classmethod
    def open(cls, root: str = CGROUP_ROOT, loop=None) -> "Cgroups":
        layout = find_layout(root)
        if layout.core is None and not layout.controllers:
            raise CgroupError(f"no cgroup hierarchy mounted at {root}")
        manager = cls(layout, loop)
        manager._delegate_v2()
        return manager

    def _delegate_v2(self) -> None:
        """Enable our v2 controllers for the session groups. A group with processes in it
        may not (cgroup v2's no-internal-processes rule, the root excepted): then the
        agent moves itself into a leaf of its own first."""
        core = self.layout.core
        want = [c for c in CONTROLLERS if self.layout.version_of(c) == 2]
        if core is None or not want:
            return
        control = os.path.join(core, "cgroup.subtree_control")
        line = " ".join("+" + c for c in want)
        try:
            _write(control, line)
            return
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise CgroupError(f"cannot enable {' '.join(want)} in {core}: "
                                  f"{err.strerror}") from None
        others = set(_read(os.path.join(core, "cgroup.procs")).split()) - {str(os.getpid())}
        if others:
            raise CgroupError(f"cannot enable {' '.join(want)} in {core}: other processes "
                              f"than the agent are in it ({len(others)})") from None
        leaf = os.path.join(core, AGENT_LEAF)
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), "0")
        _write(control, line)
        log.info("cgroups: the agent moved into %s so that %s can delegate", leaf, core)

    def available(self) -> list[str]:
        return sorted(self.layout.controllers)

    def describe(self) -> str:
        return self.layout.describe()

    # -- sessions ------------------------------------------------------------------------
    def group_for(self, session_id: str) -> Group:
        name = group_name(session_id)
        leftover = self._leftover.pop(name, None)
        if leftover is not None:
            self._unwatch(name)
            return leftover
        return Group(name, self.layout)

    def watch_oom(self, group: Group, on_oom: Callable[[], object]) -> None:
        """Call `on_oom()` on the loop when the kernel reports an OOM event for `group`
        (on cgroup v1 also a few times shortly after: `on_oom` must compare counts)."""
        if self.loop is None:
            return
        try:
            if self.layout.version_of("memory") == 2:
                self._watch_file(group, os.path.join(group.dirs["memory"], "memory.events"),
                                 on_oom)
            elif self.layout.version_of("memory") == 1:
                self._watch_v1_oom(group, on_oom)
        except OSError as err:
            log.warning("cgroups: cannot watch %s for OOM kills (%s); the exit record "
                        "still reads the count", group.name, err)

    def _watch_file(self, group: Group, path: str, callback: Callable[[], object]) -> None:
        if self._inotify is None:
            self._inotify = _Inotify()
            self.loop.add_reader(self._inotify.fd, self._on_inotify)
        wd = self._inotify.add(path, IN_MODIFY)
        self._watches[wd] = callback
        self._group_wds.setdefault(group.name, []).append(wd)

    def _on_inotify(self) -> None:
        for wd, mask in self._inotify.read():
            if mask & IN_IGNORED:
                self._watches.pop(wd, None)
                continue
            callback = self._watches.get(wd)
            if callback is not None:
                callback()

    def _watch_v1_oom(self, group: Group, on_oom: Callable[[], object]) -> None:
        memory = group.dirs["memory"]
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ocfd = os.open(os.path.join(memory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _write(os.path.join(memory, "cgroup.event_control"), f"{efd} {ocfd}")
        except OSError:
            os.close(efd)
            os.close(ocfd)
            raise
        self._eventfds[group.name] = (efd, ocfd)

        def readable() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            # v1 signals the group's entering OOM, before the killer has chosen and
            # counted its victim: look again once the kill has had time to happen.
            on_oom()
            for delay in V1_OOM_RECHECKS:
                self.loop.call_later(delay, on_oom)
        self.loop.add_reader(efd, readable)

    def _unwatch(self, name: str) -> None:
        for wd in self._group_wds.pop(name, []):
            if self._watches.pop(wd, None) is not None and self._inotify is not None:
                self._inotify.remove(wd)
        fds = self._eventfds.pop(name, None)
        if fds is not None:
            self.loop.remove_reader(fds[0])
            for fd in fds:
                os.close(fd)

    def release(self, group: Group) -> None:
        """The session's process exited: stop watching, remove the group, or, while
        something it left behind still runs there, remove it once that is gone."""
        self._unwatch(group.name)
        if group.remove():
            return
        self._leftover[group.name] = group
        log.info("cgroups: %s still has processes; removed once they are gone", group.name)
        if self.layout.core is not None and self.loop is not None:
            try:
                self._watch_file(group, os.path.join(group.core, "cgroup.events"),
                                 lambda: self._retry(group.name))
            except OSError:
                pass

    def _retry(self, name: str) -> None:
        group = self._leftover.get(name)
        if group is not None and not group.populated() and group.remove():
            del self._leftover[name]
            self._unwatch(name)
            log.info("cgroups: removed %s", name)

    def sweep(self) -> None:
        """Remove the leftover groups that have emptied (v1 has no event for it)."""
        for name in list(self._leftover):
            self._retry(name)

    def close(self) -> None:
        self.sweep()
        for name in list(self._group_wds) + list(self._eventfds):
            self._unwatch(name)
        if self._inotify is not None:
            if self.loop is not None:
                self.loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None


def cpus_from_mhz(mhz: int, cpuinfo: str = "/proc/cpuinfo") -> float:
    """SetLimits' cpuMhz as a fraction of CPUs: MHz over one CPU's clock."""
    clock = 0.0
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            clock = int(f.read()) / 1000.0
    except (OSError, ValueError):
        try:
            for line in _read(cpuinfo).splitlines():
                if line.startswith("cpu MHz"):
                    clock = float(line.split(":", 1)[1])
                    break
        except (OSError, ValueError):
            pass
    if clock <= 0:
        raise CgroupError("cpu_mhz: this machine does not say its CPU clock "
                          "(/proc/cpuinfo has no 'cpu MHz'); give cpus instead")
    return mhz / clock
