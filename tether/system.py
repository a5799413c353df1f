"""Platform actions as small functions of plain data: mounts, namespaces, prctl,
rlimits, hostname, the wall clock and the kernel's RNG, reboot; and the kernel's
command line. Each action raises OSError with the path and the reason. The system calls
the os module lacks are made by this package's C extension (tether/_linux.c), which only
returns the kernel's answer: the errors are made here."""
from __future__ import annotations

import errno
import os
import resource

# mount(2) flags (linux/mount.h): this module is their only home.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_MOVE = 8192
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2   # umount2(2): detach now, clean up when no longer busy
# the per-mount flags a bind mount can carry (applied by a remount)
BIND_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2

RB_POWER_OFF = 0x4321FEDC
RB_DISABLE_CAD = 0            # ctrl-alt-del sends SIGINT to PID 1 instead of rebooting

# openat2(2)'s resolve flags (linux/openat2.h)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# pty ioctls (asm-generic/ioctls.h): unlock the slave, open it from the master
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441

# renameat2(2) flags
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

SPLICE_F_NONBLOCK = 2   # tee(2), as os.splice's flag

RNDRESEEDCRNG = 0x5207   # _IO('R', 0x07), linux/random.h: reseed the CRNG from the input pool

# statfs(2) f_type (linux/magic.h), and the kernel's own filesystems
PROC_SUPER_MAGIC = 0x9FA0
TMPFS_MAGIC = 0x01021994
DEVPTS_MAGIC = 0x1CD1
KERNEL_FILESYSTEMS = {
    PROC_SUPER_MAGIC: "proc", 0x62656572: "sysfs", 0x1CD1: "devpts",
    0x64626720: "debugfs", 0x74726163: "tracefs", 0x73636673: "securityfs",
    0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0x62656570: "configfs",
    0xCAFE4A11: "bpf", 0xDE5E81E4: "efivarfs", 0x6165676C: "pstore",
    0x65735543: "fusectl", 0x42494E4D: "binfmt_misc", 0x19800202: "mqueue",
    0x6E736673: "nsfs", 0x73727279: "btrfs_test", 0x67596969: "rpc_pipefs",
}

CMDLINE = "/proc/cmdline"
_kernel_args: list[str] | None = None


def kernel_args(text: str | None = None) -> list[str]:
    """The kernel's command line as words: `text`'s, else /proc/cmdline's, read once
    per process ([] when it cannot be read). Every kernel argument the agent reads goes
    through here."""
    global _kernel_args
    if text is not None:
        return text.split()
    if _kernel_args is None:
        try:
            with open(CMDLINE) as f:
                _kernel_args = f.read().split()
        except OSError:
            _kernel_args = []
    return _kernel_args


def kernel_arg(name: str, args: list[str] | None = None) -> str | None:
    """The value of the first `name=VALUE` among the kernel arguments (`args`, else the
    kernel's own); None when there is none."""
    prefix = name + "="
    for word in kernel_args() if args is None else args:
        if word.startswith(prefix):
            return word[len(prefix):]
    return None


def _calls():
    """The C extension, loaded by the first call that needs it: an agent that is not PID 1
    makes none on the way to its primary."""
    from tether import _linux
    return _linux


def _check(result: int, what: str) -> None:
    """A _linux call's answer: below 0 is -errno."""
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result).lower()}")


def _path(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _checked(result: int, *args) -> int:
    """A _linux call's answer, or OSError(errno, strerror, *args) (the paths)."""
    if result < 0:
        raise OSError(-result, os.strerror(-result), *args)
    return result


_openat2_state: bool | None = None


def have_openat2() -> bool:
    """Whether this kernel has openat2(2) (Linux 5.6+); probed once."""
    global _openat2_state
    if _openat2_state is None:
        try:
            os.close(openat2(-100, "/", os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT))
            _openat2_state = True
        except OSError:   # ENOSYS: an older kernel; EPERM: a seccomp filter
            _openat2_state = False
    return _openat2_state


def openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """openat2(2): `path` opened from `dirfd` under the RESOLVE_* rules; returns the fd.
    Raises OSError with the errno and the path (ValueError for a NUL in it)."""
    tmpfile = getattr(os, "O_TMPFILE", 0)   # O_DIRECTORY is one of its bits
    creates = flags & os.O_CREAT or (tmpfile and flags & tmpfile == tmpfile)
    mode = mode if creates else 0   # else a mode is EINVAL
    return _checked(_calls().openat2(dirfd, os.fsencode(path), flags, mode, resolve), path)


def renameat2(old_dirfd: int, old: str, new_dirfd: int, new: str, flags: int) -> None:
    """renameat2(2): RENAME_EXCHANGE swaps two entries, RENAME_NOREPLACE never replaces.
    Raises OSError with the errno and both names."""
    _checked(_calls().renameat2(old_dirfd, os.fsencode(old), new_dirfd, os.fsencode(new),
                                flags), old, None, new)


def tee(fd_in: int, fd_out: int, count: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """tee(2): duplicate up to `count` bytes from the front of the pipe `fd_in` into the
    pipe `fd_out` without consuming them (the pages are shared, not copied); the bytes
    duplicated. (The os module has splice but not tee.) Raises OSError."""
    return _checked(_calls().tee(fd_in, fd_out, count, flags))


def filesystem_type(fd: int) -> int:
    """fstatfs(2)'s f_type: which filesystem `fd` is on (compare KERNEL_FILESYSTEMS)."""
    return _checked(_calls().filesystem_type(fd))


def fd_path(fd: int) -> str:
    """A path naming the open file `fd` itself (the /proc magic link): for calls that
    take only a path, such as mount(2), and act on what the fd holds, not on a name."""
    return f"/proc/self/fd/{fd}"


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2). Raises OSError with the errno, the target and the source."""
    _checked(_calls().mount(_path(source), os.fsencode(target), _path(fstype), flags,
                          _path(data)), target, None, source or fstype)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2). Raises OSError with the errno and the target."""
    _checked(_calls().umount2(os.fsencode(target), flags), target)


def bind_mount(source: str, target: str, flags: int = 0, recursive: bool = False) -> None:
    """Bind `source` over `target`. Per-mount flags (e.g. MS_RDONLY) take a second call,
    a remount of the bind: mount(2) ignores them on the bind itself."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if flags & BIND_FLAGS:
        mount(None, target, None, MS_REMOUNT | MS_BIND | (flags & BIND_FLAGS))


def make_mounts_private() -> None:
    """Stop our mounts propagating back to the parent namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def unshare(flags: int) -> None:
    _check(_calls().unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_calls().setns(fd, nstype), "setns")


def set_child_subreaper() -> None:
    import _prctl   # python-prctl's C extension, loaded for the sessions' capabilities anyway
    try:
        _prctl.prctl(_prctl.PR_SET_CHILD_SUBREAPER, 1)
    except OSError as err:
        raise OSError(err.errno, f"prctl(PR_SET_CHILD_SUBREAPER): "
                                 f"{os.strerror(err.errno).lower()}") from None


def set_parent_death_signal(signum: int) -> None:
    _check(_calls().prctl(PR_SET_PDEATHSIG, signum), "prctl(PR_SET_PDEATHSIG)")


def raise_ambient_capability(number: int) -> None:
    """Capability `number` into the ambient set (python-prctl has no ambient set)."""
    _check(_calls().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, number),
           "prctl(PR_CAP_AMBIENT_RAISE)")


def inotify_init() -> int:
    """inotify_init1(2), non-blocking and close-on-exec: the new instance's fd."""
    result = _calls().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    _check(result, "inotify_init1")
    return result


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """inotify_add_watch(2): the watch descriptor. Raises OSError naming `path`."""
    result = _calls().inotify_add_watch(fd, os.fsencode(path), mask)
    _check(result, f"inotify_add_watch {path}")
    return result


def inotify_rm_watch(fd: int, wd: int) -> None:
    """inotify_rm_watch(2); a watch the kernel already dropped (its file gone) is no error."""
    _calls().inotify_rm_watch(fd, wd)


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
    """Mount each spec whose target is not a mount point yet; returns what was mounted.
    The mount table is read once (each read is ~1 ms of a VM's boot under TCG), and again
    only when it could not be read: when /proc itself was missing until a spec mounted it."""
    done = []
    present = mounted_paths()
    for target, fstype, source, flags, data in specs:
        if target in present:
            continue
        os.makedirs(target, exist_ok=True)
        mount(source, target, fstype, flags, data)
        done.append(target)
        present = present | {target} if present else mounted_paths()
    return done


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


def set_raw_tty(fd: int, baud: int | None = 115200) -> None:
    """Raw 8-bit mode on a tty (serial port, pty): no echo, no line discipline, no flow
    control, reads return what is there; the line speed set when `baud` is given.
    Raises OSError (termios errors included)."""
    import termios   # only for a tty
    try:
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
                   | termios.IXOFF)
        oflag &= ~termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                   | termios.IEXTEN)
        cflag &= ~(termios.CSIZE | termios.PARENB | termios.CRTSCTS)
        cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        if baud is not None:
            ispeed = ospeed = getattr(termios, f"B{baud}")
        termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
    except termios.error as err:
        code, text = err.args if len(err.args) == 2 else (errno.EINVAL, str(err))
        raise OSError(code, f"cannot set the tty raw: {text}") from None


def set_hostname(name: str) -> None:
    # socket.sethostname is _socket's; the socket module would build its IntEnums (enum,
    # functools...) on the VM's boot path
    from _socket import sethostname
    sethostname(name)


def sync() -> None:
    os.sync()


def set_clock(unix_ns: int) -> None:
    """Set the wall clock (CLOCK_REALTIME) to `unix_ns` nanoseconds since the epoch."""
    import time   # loaded already: the log's timestamps
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)
    except OSError as err:
        raise OSError(err.errno, f"clock_settime(CLOCK_REALTIME): {err.strerror}") from None


def reseed_random(seed: bytes, device: str = "/dev/urandom") -> None:
    """Mix `seed` into the kernel's input pool (a write to `device`, which credits no
    entropy and does not by itself change what the CRNG hands out), then make the CRNG
    reseed from that pool now (the RNDRESEEDCRNG ioctl; CAP_SYS_ADMIN). A CRNG that is
    not initialised yet (ENODATA) is not an error: it will be seeded from the pool, seed
    included, when it is."""
    import fcntl   # loaded already by the sessions' launch path
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        try:
            os.write(fd, seed)
        except OSError as err:
            raise OSError(err.errno, f"write to {device}: {err.strerror}") from None
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as err:
            if err.errno != errno.ENODATA:
                raise OSError(err.errno, f"RNDRESEEDCRNG on {device}: {err.strerror}") \
                    from None
    finally:
        os.close(fd)


def disable_ctrl_alt_del() -> None:
    """reboot(RB_DISABLE_CAD): the kernel turns ctrl-alt-del into SIGINT for PID 1 (of
    the first PID namespace; in another one the call fails with EINVAL)."""
    _check(_calls().reboot(RB_DISABLE_CAD), "reboot(CAD_OFF)")


def power_off() -> None:
    """reboot(RB_POWER_OFF). Returns only on failure (raises)."""
    sync()
    _check(_calls().reboot(RB_POWER_OFF), "reboot(POWER_OFF)")
