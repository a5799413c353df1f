"""Paths inside the container root, resolved the way a process chrooted there sees them.

An image's `/etc/resolv.conf -> /run/resolvconf/resolv.conf` must resolve inside the image,
never into the agent's own root. Two forms:

* `open_in_root`, `open_parent_in_root`, `makedirs_in_root`: the walk runs on directory
  fds and ends in an open fd, so a process in the container that swaps a path component
  for a symlink while we walk cannot lead us out of the root. The kernel walks with
  openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) where it has it (Linux 5.6+); else we
  go component by component with O_NOFOLLOW and read each symlink ourselves. Everything
  after the walk goes through the fd (fstat, read, write, renameat, mount on the fd).
  Use these for anything a running container can race: copy in and out, mount targets.
* `resolve_in_root`: the same rules, returning a path string, for setup before anything
  runs in the root (the /etc files, volume mount points). A later call on the string
  follows whatever is there by then.

`bind_system_dirs` puts the agent's /proc, /sys and /dev (or a fresh minimal /dev) into
the root through such fds.
"""
from __future__ import annotations

import errno
import os
import stat

from tether import system


MAX_SYMLINKS = 40   # as the kernel's path walk (ELOOP after 40 links)
O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_EAGAIN_RETRIES = 64   # openat2 says EAGAIN when a rename raced a `..`; we walk again


def resolve_in_root(root: str, path: str, follow_last: bool = True) -> str:
    """`root` joined with `path`, every symlink on the way followed as if `root` were `/`
    (`..` stops at the root). With `follow_last` false, a symlink in the last component is
    left as it is (to act on the link itself). Raises OSError(ELOOP) past 40 links.
    A path string: only for setup before anything runs in the root (see above)."""
    root = os.path.abspath(root)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if (parts or follow_last) and os.path.islink(candidate):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


# -- through directory fds --------------------------------------------------------------------
def open_root(root: str) -> int:
    """An O_PATH fd of the container root, for the calls below."""
    return os.open(root, O_PATH_DIR)


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def open_in_root(root_fd: int, path: str, flags: int = os.O_RDONLY, mode: int = 0o600, *,
                 follow_last: bool = True, no_symlinks: bool = False,
                 use_openat2: bool | None = None) -> int:
    """Open `path` as a process chrooted at `root_fd` would, never leaving the root:
    `..` stops at the root, absolute symlinks start again from it, magic links (/proc's
    fd and root links) are refused with ELOOP. `follow_last` false: a symlink as the last
    component is not followed (O_NOFOLLOW: ELOOP, or the link itself with O_PATH).
    `no_symlinks`: any symlink on the way is refused with ELOOP. The fd is close-on-exec.
    `use_openat2` picks the walk (None: openat2 where the kernel has it)."""
    if use_openat2 is None:
        use_openat2 = system.have_openat2()
    flags |= os.O_CLOEXEC
    if use_openat2:
        return _open_openat2(root_fd, path, flags, mode, follow_last, no_symlinks)
    return _open_walk(root_fd, path, flags, mode, follow_last, no_symlinks)


def _open_openat2(root_fd, path, flags, mode, follow_last, no_symlinks) -> int:
    resolve = system.RESOLVE_IN_ROOT | system.RESOLVE_NO_MAGICLINKS
    if no_symlinks:
        resolve |= system.RESOLVE_NO_SYMLINKS
    if not follow_last:
        flags |= os.O_NOFOLLOW
    for _ in range(_EAGAIN_RETRIES):
        try:
            return system.openat2(root_fd, path or "/", flags, mode, resolve)
        except BlockingIOError:
            continue
        except OSError as err:
            raise OSError(err.errno, err.strerror, path) from None
    raise OSError(errno.EAGAIN, "the path kept changing while it was resolved", path)


def _is_proc(fd: int) -> bool:
    try:
        return system.filesystem_type(fd) == system.PROC_SUPER_MAGIC
    except OSError:
        return False


def _readlink(name: str, dir_fd: int) -> str | None:
    """The symlink's target, or None when `name` is not a symlink (or not there)."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOENT):
            return None
        raise


def _open_walk(root_fd, path, flags, mode, follow_last, no_symlinks) -> int:
    """One component at a time: each directory opened O_NOFOLLOW from the one before,
    each symlink read and its target walked from here (or from the root)."""
    def loop_error() -> OSError:
        return OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)

    parts = _split(path)
    stack = [root_fd]            # the directories walked; stack[0] is the caller's
    links = 0

    def follow(target: str) -> None:
        nonlocal links, parts
        links += 1
        if no_symlinks or links > MAX_SYMLINKS or _is_proc(stack[-1]):
            raise loop_error()   # on /proc a link may be a magic one: refused as openat2 does
        if target.startswith("/"):
            while len(stack) > 1:
                os.close(stack.pop())
        parts = _split(target) + parts

    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last = not parts
            if not last or follow_last:
                target = _readlink(name, stack[-1])
                if target is not None:
                    follow(target)
                    continue
            try:
                if last:
                    fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
                else:
                    fd = os.open(name, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=stack[-1])
            except OSError as err:
                # A symlink swapped in since we looked: follow it like any other.
                if err.errno in (errno.ELOOP, errno.ENOTDIR) and (not last or follow_last):
                    target = _readlink(name, stack[-1])
                    if target is not None:
                        parts.insert(0, name)
                        links += 1
                        if links > MAX_SYMLINKS:
                            raise loop_error() from None
                        continue
                raise OSError(err.errno, err.strerror, path) from None
            if last and follow_last and flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)    # O_PATH opened a link swapped in since we looked
                parts.insert(0, name)
                links += 1
                if links > MAX_SYMLINKS:
                    raise loop_error()
                continue
            if last:
                return fd
            stack.append(fd)
        # The path ended on the root, a `..` or a `.`: open that directory itself.
        try:
            return os.open(".", flags, mode, dir_fd=stack[-1])
        except OSError as err:
            raise OSError(err.errno, err.strerror, path) from None
    finally:
        for fd in stack[1:]:
            os.close(fd)


def open_parent_in_root(root_fd: int, path: str, *, follow_last: bool = True,
                        use_openat2: bool | None = None) -> tuple[int, str]:
    """The directory that holds `path`'s last component (an O_PATH fd) and that name,
    for calls relative to the directory (openat with O_EXCL, renameat, mkdirat,
    symlinkat). With `follow_last`, a symlink as the last component is followed, inside
    the root, to the entry it names (which need not exist). A path that ends on a
    directory by name (`/`, `..`) raises IsADirectoryError."""
    parts = _split(path)
    for _ in range(MAX_SYMLINKS + 1):
        if not parts or parts[-1] == "..":
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        parent, name = parts[:-1], parts[-1]
        dir_fd = open_in_root(root_fd, "/" + "/".join(parent), O_PATH_DIR,
                              use_openat2=use_openat2)
        if not follow_last:
            return dir_fd, name
        try:
            target = _readlink(name, dir_fd)
            if target is not None and _is_proc(dir_fd):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        except BaseException:
            os.close(dir_fd)
            raise
        if target is None:
            return dir_fd, name
        os.close(dir_fd)
        parts = _split(target) if target.startswith("/") else parent + _split(target)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


def makedirs_in_root(root_fd: int, path: str, mode: int = 0o755, *,
                     _links: list[int] | None = None) -> int:
    """`mkdir -p` inside the root, symlinks followed inside it; the directory's O_PATH fd.
    A dangling link on the way gets its target made, with the target's own missing
    parents (`data -> /srv/data` with no /srv makes /srv/data). More than MAX_SYMLINKS
    links in all (a cycle) is ELOOP."""
    links = [0] if _links is None else _links
    try:
        return open_in_root(root_fd, path, O_PATH_DIR)
    except FileNotFoundError:
        pass
    parts = _split(path)
    for i in range(len(parts)):
        prefix = "/" + "/".join(parts[:i + 1])
        try:
            os.close(open_in_root(root_fd, prefix, O_PATH_DIR))
            continue
        except FileNotFoundError:
            pass
        _make_entry(root_fd, prefix, mode, links)
    return open_in_root(root_fd, path, O_PATH_DIR)


def _make_entry(root_fd: int, path: str, mode: int, links: list[int]) -> None:
    """Make the directory `path` names, its parent there already: a plain mkdir, or,
    where the name is a dangling symlink, its target with the target's parents."""
    parts = _split(path)
    parent, name = parts[:-1], parts[-1]
    if name == "..":
        return          # the parent of a directory that is there
    dir_fd = open_in_root(root_fd, "/" + "/".join(parent), O_PATH_DIR)
    try:
        target = _readlink(name, dir_fd)
        if target is None:
            try:
                os.mkdir(name, mode, dir_fd=dir_fd)
            except FileExistsError:
                pass
            return
        if _is_proc(dir_fd):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    finally:
        os.close(dir_fd)
    links[0] += 1
    if links[0] > MAX_SYMLINKS:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    where = target if target.startswith("/") else "/" + "/".join(parent + [target])
    os.close(makedirs_in_root(root_fd, where, mode, _links=links))


def read_file_in_root(root: str, path: str, limit: int) -> bytes | None:
    """The first `limit` bytes of the regular file `path` in the root (symlinks followed
    inside it), or None when it is missing or not a regular file. A file the image
    controls is never opened as a named pipe (a read would wait for a writer for ever)
    or a device (/dev/zero never ends): it is looked at through an O_PATH fd first, and
    only a regular file is opened, through that fd, and read up to `limit`."""
    root_fd = open_root(root)
    try:
        try:
            fd = open_in_root(root_fd, path, os.O_PATH)
        except (FileNotFoundError, NotADirectoryError):
            return None
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(system.fd_path(fd), "rb", buffering=0) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def container_path(root_fd: int, fd: int) -> str | None:
    """Where the open file `fd` is, as a path inside the root (None when the agent has
    no /proc to tell, or the file is not under the root)."""
    try:
        top = os.readlink(system.fd_path(root_fd))
        where = os.readlink(system.fd_path(fd))
    except OSError:
        return None
    if where == top:
        return "/"
    if top == "/":
        return where if where.startswith("/") else None
    return where[len(top):] if where.startswith(top + "/") else None


# -- the system directories in the root -----------------------------------------------------
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/dev/pts")
# A fresh /dev: (name, major, minor) of the character devices every container expects.
DEV_NODES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
             ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("ptmx", "pts/ptmx"))


def _mount_point(root_fd: int, path: str) -> int:
    """The directory `path` in the root as an O_PATH fd, created if missing; a symlink
    anywhere on the way is refused (ELOOP): a mount must land where it says."""
    try:
        return open_in_root(root_fd, path, O_PATH_DIR, no_symlinks=True)
    except FileNotFoundError:
        pass
    parent = os.path.dirname(path)
    parent_fd = open_in_root(root_fd, parent, O_PATH_DIR, no_symlinks=True)
    try:
        os.mkdir(os.path.basename(path), 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass
    finally:
        os.close(parent_fd)
    return open_in_root(root_fd, path, O_PATH_DIR, no_symlinks=True)


def bind_system_dirs(root: str, *, fresh_dev: bool = False) -> None:
    """Bind the agent's /proc, /sys, /dev and /dev/pts into the container root; with
    `fresh_dev` the root gets a minimal /dev of its own instead (`mount_fresh_dev`).
    Each mount point is resolved inside the root with no symlink allowed on its way, and
    the mount goes onto that fd: an image whose `sys` is a symlink (`sys -> /elsewhere`)
    gets no /sys rather than a mount over a path of the agent's. A refused or failed
    mount does not stop the others; at the end OSError names them."""
    present = system.mounted_paths()
    failures = []
    root_fd = open_root(root)
    try:
        for path in SYSTEM_DIRS:
            if fresh_dev and path == "/dev/pts":
                continue      # part of the fresh /dev
            shown = os.path.join(os.path.abspath(root), path.lstrip("/"))
            if shown in present:
                continue
            try:
                fd = _mount_point(root_fd, path)
            except OSError as err:
                reason = ("a symlink is on its way" if err.errno == errno.ELOOP
                          else err.strerror)
                failures.append(f"refusing to mount over {path} in {root}: {reason}")
                continue
            try:
                if fresh_dev and path == "/dev":
                    mount_fresh_dev(root_fd, fd)
                else:
                    system.bind_mount(path, system.fd_path(fd))
            except OSError as err:
                failures.append(f"mounting {path} in {root}: {err.strerror or err}")
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    if failures:
        raise OSError(errno.EPERM, "; ".join(failures))


def mount_fresh_dev(root_fd: int, dev_fd: int) -> None:
    """A tmpfs on the root's /dev (`dev_fd`) with the usual character devices, the
    fd/stdin/stdout/stderr links, a devpts instance of its own on pts (ptmx a link into
    it) and a tmpfs on shm: none of the host's devices, ptys or shared memory."""
    system.mount("tmpfs", system.fd_path(dev_fd), "tmpfs",
                 system.MS_NOSUID | system.MS_NOEXEC, "mode=755,size=64k")
    # The fd still names the directory under the new mount: walk to the mount itself.
    dev = open_in_root(root_fd, "/dev", O_PATH_DIR, no_symlinks=True)
    try:
        if system.filesystem_type(dev) != system.TMPFS_MAGIC:
            raise OSError(errno.EXDEV, "the new /dev is not the tmpfs just mounted")
        for name, major, minor in DEV_NODES:
            os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
            os.chmod(name, 0o666, dir_fd=dev, follow_symlinks=False)
        for name, target in DEV_LINKS:
            os.symlink(target, name, dir_fd=dev)
        for name, mode in (("pts", 0o755), ("shm", 0o1777)):
            os.mkdir(name, mode, dir_fd=dev)
            os.chmod(name, mode, dir_fd=dev, follow_symlinks=False)
        pts = os.open("pts", O_PATH_DIR | os.O_NOFOLLOW, dir_fd=dev)
        try:
            system.mount("devpts", system.fd_path(pts), "devpts",
                         system.MS_NOSUID | system.MS_NOEXEC,
                         "newinstance,ptmxmode=0666,mode=0620,gid=5")
        finally:
            os.close(pts)
        shm = os.open("shm", O_PATH_DIR | os.O_NOFOLLOW, dir_fd=dev)
        try:
            system.mount("shm", system.fd_path(shm), "tmpfs",
                         system.MS_NOSUID | system.MS_NODEV, "mode=1777")
        finally:
            os.close(shm)
    finally:
        os.close(dev)


def open_pty(root: str) -> tuple[int, int]:
    """A pty pair (master, slave) for a session in `root`: from the root's own devpts
    when it has one (the sandbox's fresh /dev), so the session finds its tty under its
    /dev/pts; else from the agent's."""
    if root not in ("", "/"):
        pair = _open_pty_in(root)
        if pair is not None:
            return pair
    return os.openpty()


def _open_pty_in(root: str) -> tuple[int, int] | None:
    import fcntl
    try:
        root_fd = open_root(root)
    except OSError:
        return None
    try:
        pts = open_in_root(root_fd, "/dev/pts", O_PATH_DIR, no_symlinks=True)
    except OSError:
        return None
    finally:
        os.close(root_fd)
    try:
        if system.filesystem_type(pts) != system.DEVPTS_MAGIC:
            return None
        agent_pts = os.stat("/dev/pts")
        if os.fstat(pts).st_dev == agent_pts.st_dev:
            return None   # the agent's own instance: os.openpty() gives the same
        master = os.open("ptmx", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
                         | os.O_NOFOLLOW, dir_fd=pts)
    except OSError:
        return None
    finally:
        os.close(pts)
    try:
        fcntl.ioctl(master, system.TIOCSPTLCK, b"\0\0\0\0")
        slave = fcntl.ioctl(master, system.TIOCGPTPEER,
                            os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        os.set_blocking(master, True)
        return master, slave
    except OSError:
        os.close(master)
        return None
