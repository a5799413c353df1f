"""Platform actions as small functions of plain data: mounts, namespaces, prctl,
rlimits, hostname, reboot. Each raises OSError with the path and the reason."""
from __future__ import annotations

import errno
import os
import resource

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

RB_POWER_OFF = 0x4321FEDC

_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes   # only when a platform call is made
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err).lower()}")


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    import ctypes
    _check(libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                        enc(data)), f"mount {source or fstype} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(libc().umount2(target.encode(), flags), f"umount {target}")


def bind_mount(source: str, target: str, recursive: bool = False) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def make_mounts_private() -> None:
    """Stop our mounts propagating back to the parent namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(libc().setns(fd, nstype), "setns")


def set_child_subreaper() -> None:
    _check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def set_parent_death_signal(signum: int) -> None:
    _check(libc().prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def mounted_paths() -> set[str]:
    """Mount points, from /proc/self/mountinfo (empty if /proc is not there yet)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4].replace("\\040", " ") for line in f}
    except OSError:
        return set()


# (target, fstype, source, flags, data): the PID 1 mounts, parents first.
PID1_MOUNTS = [
    ("/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("/sys", "sysfs", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("/dev", "devtmpfs", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("/dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
    ("/dev/shm", "tmpfs", "shm", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("/run", "tmpfs", "run", MS_NOSUID | MS_NODEV, "mode=0755"),
]


def mount_missing(specs=PID1_MOUNTS) -> list[str]:
    """Mount each spec whose target is not a mount point yet; returns what was mounted."""
    done = []
    for target, fstype, source, flags, data in specs:
        if target in mounted_paths():
            continue
        os.makedirs(target, exist_ok=True)
        mount(source, target, fstype, flags, data)
        done.append(target)
    return done


def bind_system_dirs(root: str, dirs=("/proc", "/sys", "/dev", "/dev/pts")) -> None:
    """Bind the agent's /proc, /sys, /dev and /dev/pts into the container root."""
    present = mounted_paths()
    for path in dirs:
        target = os.path.join(root, path.lstrip("/"))
        if target in present:
            continue
        os.makedirs(target, exist_ok=True)
        bind_mount(path, target, recursive=False)


def link_mtab(root: str = "/") -> None:
    path = os.path.join(root, "etc/mtab")
    try:
        os.symlink("/proc/mounts", path)
    except FileExistsError:
        pass


def set_rlimits() -> None:
    """NOFILE 1M and CORE unlimited (inherited by sessions). Raises OSError naming the limit."""
    for name, (soft, hard) in (("NOFILE", (1 << 20, 1 << 20)),
                               ("CORE", (resource.RLIM_INFINITY, resource.RLIM_INFINITY))):
        limit = getattr(resource, "RLIMIT_" + name)
        try:
            resource.setrlimit(limit, (soft, hard))
        except (ValueError, OSError) as err:
            # Not allowed that high (nr_open, no CAP_SYS_RESOURCE): take what we may.
            _, current_hard = resource.getrlimit(limit)
            try:
                resource.setrlimit(limit, (current_hard, current_hard))
            except (ValueError, OSError):
                pass
            raise OSError(errno.EPERM, f"setrlimit {name} to {hard}: {err}; "
                          f"using {current_hard}") from None


def set_hostname(name: str) -> None:
    import socket   # cheap, but only needed here
    socket.sethostname(name)


def sync() -> None:
    os.sync()


def power_off() -> None:
    """reboot(RB_POWER_OFF). Returns only on failure (raises)."""
    sync()
    _check(libc().reboot(RB_POWER_OFF), "reboot(POWER_OFF)")
