"""Volumes: label, NFS, tmpfs and bind mounts into the container root; finding a disk by label.

Mounts are made with mount(2) through tether/system.py (no helper processes: the agent's
reaper owns every child). Filesystem types are found by reading superblocks, so no blkid is needed.
"""
from __future__ import annotations

import errno
import os
import stat
import time

from tether import rootfs
from tether.system import (BIND_FLAGS, MNT_DETACH, MS_BIND, MS_DIRSYNC, MS_NOATIME, MS_NODEV,
                           MS_NODIRATIME, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_RELATIME,
                           MS_STRICTATIME, MS_SYNCHRONOUS, bind_mount, fd_path, mount, umount)

# option word -> (flags to set, flags to clear)
FLAG_OPTIONS = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "defaults": (0, 0),
}
DATA_SUBDIR = ".vic.vol.data"     # the port layer's data directory: hides lost+found


class VolumeError(Exception):
    pass


# -- options ---------------------------------------------------------------------------------
def parse_mode(mode: str) -> tuple[int, list[str]]:
    """`ro,noatime,size=64m` -> (MS_RDONLY|MS_NOATIME, ["size=64m"])."""
    flags = 0
    data: list[str] = []
    for word in (w.strip() for w in mode.split(",")):
        if not word:
            continue
        if word in FLAG_OPTIONS:
            set_, clear = FLAG_OPTIONS[word]
            flags = (flags | set_) & ~clear
        else:
            data.append(word)
    return flags, data


def nfs_options(mode: str, address: str) -> tuple[int, str]:
    """Mount flags and the nfs data string with `addr=` set to the resolved address."""
    flags, data = parse_mode(mode)
    data = [w for w in data if not w.startswith("addr=")] + [f"addr={address}"]
    return flags, ",".join(data)


def nfs_device(host: str, path: str) -> str:
    """`host:/share` with exactly one slash (the reference produced `host://share`)."""
    return f"{host}:/{path.lstrip('/')}"


# -- finding a disk by label -------------------------------------------------------------------
def probe(device: str) -> tuple[str, str] | None:
    """(fstype, label) read from a block device's superblock, or None when unknown."""
    try:
        with open(device, "rb") as f:
            head = f.read(36 * 1024)
    except OSError:
        return None
    return probe_bytes(head)


def probe_bytes(head: bytes) -> tuple[str, str] | None:
    def text(raw: bytes) -> str:
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip(" ")

    if len(head) >= 1024 + 136 and head[1024 + 56:1024 + 58] == b"\x53\xef":
        sb = head[1024:]
        compat = int.from_bytes(sb[92:96], "little")
        incompat = int.from_bytes(sb[96:100], "little")
        ro_compat = int.from_bytes(sb[100:104], "little")
        if incompat & 0x2c0 or ro_compat & ~0x7:       # extents, 64bit, flex_bg, huge_file...
            fstype = "ext4"
        elif compat & 0x4:                             # has_journal
            fstype = "ext3"
        else:
            fstype = "ext2"
        return fstype, text(sb[120:136])
    if len(head) >= 32768 + 72 and head[32769:32774] == b"CD001":
        return "iso9660", text(head[32768 + 40:32768 + 72])
    if head[:4] == b"XFSB" and len(head) >= 120:
        return "xfs", text(head[108:120])
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        if head[82:87] == b"FAT32":
            return "vfat", text(head[71:82])
        if head[54:57] == b"FAT":
            return "vfat", text(head[43:54])
    return None


def _label_link(label: str) -> str:
    # udev escapes '/' and whitespace as \x2f, \x20 in by-label names
    escaped = "".join(c if c.isalnum() or c in "#+-.:=@_" else f"\\x{ord(c):02x}" for c in label)
    return os.path.join("/dev/disk/by-label", escaped)


def _scan_sysfs(label: str) -> str | None:
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return None
    for name in names:
        device = f"/dev/{name}"
        try:
            if int(open(f"/sys/class/block/{name}/size").read().strip() or 0) == 0:
                continue
        except (OSError, ValueError):
            continue
        if not os.path.exists(device):
            continue
        found = probe(device)
        if found and found[1] == label:
            return device
    return None


def find_device_by_label(label: str, timeout: float) -> str:
    """The block device holding a filesystem labelled `label`; waits (sleeping) up to
    `timeout` seconds for it to appear. Raises VolumeError when it never does."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        link = _label_link(label)
        if os.path.exists(link):
            return os.path.realpath(link)
        device = _scan_sysfs(label)
        if device:
            return device
        left = deadline - time.monotonic()
        if left <= 0:
            raise VolumeError(
                f"no disk labelled {label!r} appeared within {timeout:g}s "
                f"(looked in /dev/disk/by-label and the superblocks of /sys/class/block)")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.25)


# -- mounting volumes --------------------------------------------------------------------------
# A volume is never mounted on a path string in the container root: on a reload the
# container runs, and a process in it could swap a directory on the way for a symlink
# between our look and the mount, and the kernel would follow it out of the root (a
# label volume waits up to 30 s for its disk: time enough). The mount point is opened as
# an fd inside the root (tether/rootfs.py) and every mount goes onto that fd. A bind
# onto an fd takes the flags of the mount it copies, so a volume is first mounted, with
# its flags and its owner restored, on a directory of the agent's own (a scratch one
# under the staging directory), then bound onto the fd, and the scratch mount dropped.
class _Prepared:
    # plain: dataclasses (inspect, ast...) would cost the VM's boot more than this step
    __slots__ = ("fd", "keep")

    def __init__(self, fd: int, keep: os.stat_result | None):
        self.fd = fd         # O_PATH fd of the mount point, inside the root
        self.keep = keep     # the mount point existed: keep its owner and mode


def _prepare_target(root_fd: int, path: str) -> _Prepared:
    """The mount point `path` in the root as an fd, made (`mkdir -p`) when missing;
    symlinks on the way are followed inside the root."""
    try:
        fd = rootfs.open_in_root(root_fd, path, rootfs.O_PATH_DIR)
    except FileNotFoundError:
        return _Prepared(rootfs.makedirs_in_root(root_fd, path), None)
    except NotADirectoryError:
        os.close(rootfs.open_in_root(root_fd, path, os.O_PATH))   # else the ENOTDIR on the way
        raise VolumeError(f"mount point {path} exists and is not a directory") from None
    return _Prepared(fd, os.fstat(fd))


def _restore_owner(prepared: _Prepared, mounted: str, flags: int) -> None:
    """The mount point's owner and mode on the root of what is mounted (`mounted`, the
    agent's own path to it), as the mount point had them."""
    if prepared.keep is None or flags & MS_RDONLY:
        return
    try:
        os.chown(mounted, prepared.keep.st_uid, prepared.keep.st_gid)
        os.chmod(mounted, stat.S_IMODE(prepared.keep.st_mode))
    except OSError:
        pass    # a filesystem without owners (vfat, some NFS exports) keeps its own


def _scratch(staging_dir: str) -> str:
    """A new empty directory of the agent's own (tempfile would load random, shutil...
    on the VM's boot path)."""
    os.makedirs(staging_dir, mode=0o755, exist_ok=True)
    for n in range(1000):
        path = os.path.join(staging_dir, f".mount-{os.getpid()}-{n}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no scratch directory could be made", staging_dir)


def _drop_scratch(scratch: str) -> None:
    try:
        umount(scratch, MNT_DETACH)
    except OSError:
        pass    # nothing mounted there (the mount failed)
    try:
        os.rmdir(scratch)
    except OSError:
        pass


def _place(source: str, prepared: _Prepared, flags: int, scratch: str,
           flags_applied: bool) -> None:
    """Bind `source` onto the mount point's fd with `flags`. `flags_applied`: `source`
    is a mount of ours made with them (tmpfs, NFS); else they are applied first on a
    bind of it at `scratch`."""
    if not flags_applied and flags & BIND_FLAGS:
        bind_mount(source, scratch, flags)
        source = scratch
    _restore_owner(prepared, source, flags)
    mount(source, fd_path(prepared.fd), None, MS_BIND)


def _mount_label(name: str, spec, flags: int, data: list[str],
                 label_timeout: float, staging_dir: str) -> str:
    """Mount the labelled disk on its staging directory; the directory to bind."""
    label = spec.source.path.lstrip("/") or spec.source.host or spec.source.opaque
    if not label:
        raise VolumeError(f"volume {name}: label:// without a label")
    try:
        device = find_device_by_label(label, label_timeout)
    except VolumeError as exc:
        raise _cannot(name, f"label {label}", spec.path, str(exc)) from None
    found = probe(device)
    fstypes = [found[0]] if found else _block_fstypes()
    staging = os.path.join(staging_dir, label)
    os.makedirs(staging, mode=0o755, exist_ok=True)
    errors = []
    for fstype in fstypes:
        try:
            mount(device, staging, fstype, flags, ",".join(data) or None)
            break
        except OSError as exc:
            errors.append(f"{fstype}: {exc.strerror}")
    else:
        raise _cannot(name, f"{device} (label {label})", spec.path,
                      "; ".join(errors) or "no filesystem type to try")
    data_dir = os.path.join(staging, DATA_SUBDIR)
    return data_dir if os.path.isdir(data_dir) else staging


def _block_fstypes() -> list[str]:
    try:
        lines = open("/proc/filesystems").read().splitlines()
    except OSError:
        return ["ext4"]
    return [ln.split()[-1] for ln in lines if ln and not ln.startswith("nodev")]


def _mount_nfs(name: str, spec, target: str, mode: str) -> None:
    host = spec.source.host
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host.strip("[]")
    if not hostname:
        raise VolumeError(f"volume {name}: nfs:// without a host")
    import socket   # NFS volumes only: socket builds IntEnums on import
    try:
        infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise VolumeError(f"volume {name}: cannot resolve NFS host {hostname}: {exc}") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    device = nfs_device(hostname, spec.source.path)
    errors = []
    for address in addresses:
        flags, data = nfs_options(mode, address)
        try:
            mount(device, target, "nfs", flags | MS_NOATIME, data)
            return
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror}")
    raise _cannot(name, device, spec.path, "; ".join(errors))


def _cannot(name: str, source: str, path: str, error: str) -> VolumeError:
    """The one form of a mount failure: the volume, its source, its destination in the
    container (as configured) and the error, e.g. `volume data: cannot mount /srv/data
    on /data: No such file or directory`."""
    return VolumeError(f"volume {name}: cannot mount {source} on {path}: {error}")


def _bind_source(spec) -> str:
    return "/" + "/".join(p for p in (spec.source.host, spec.source.path) if p).lstrip("/")


def mount_volumes(mounts: dict | None, root: str, label_timeout: float = 30.0, *,
                  staging_dir: str, scratch_dir: str | None = None) -> None:
    """Mount every MountSpec into `root`, parents first. Raises VolumeError on the first
    failure, naming the volume, its source, its destination and the error. Each mount
    point is resolved inside the root and mounted on as an fd (above): safe while the
    container runs (a reload). Labelled disks are mounted under `staging_dir`; the
    scratch directories go under `scratch_dir` (default: `staging_dir`)."""
    if not mounts:
        return
    order = sorted(mounts.items(), key=lambda kv: [p for p in kv[1].path.split("/") if p])
    os.makedirs(root, mode=0o755, exist_ok=True)
    root_fd = rootfs.open_root(root)
    try:
        for name, spec in order:
            _mount_one(name, spec, root_fd, label_timeout, staging_dir,
                       scratch_dir or staging_dir)
    finally:
        os.close(root_fd)


def _mount_one(name: str, spec, root_fd: int, label_timeout: float, staging_dir: str,
               scratch_dir: str) -> None:
    if not spec.path:
        raise VolumeError(f"volume {name}: no destination path")
    scheme = spec.source.scheme
    if scheme not in ("label", "nfs", "tmpfs", "bind"):
        raise VolumeError(f"unsupported volume mount type for {name}: {scheme}")
    if scheme == "bind" and not os.path.exists(_bind_source(spec)):
        # before the mount point is made: nothing is left behind for a mount that
        # cannot happen
        raise _cannot(name, _bind_source(spec), spec.path, os.strerror(errno.ENOENT))
    try:
        prepared = _prepare_target(root_fd, spec.path)
    except VolumeError as exc:
        raise VolumeError(f"volume {name}: {exc}") from None
    except OSError as exc:
        raise VolumeError(f"volume {name}: cannot create mount point {spec.path}: "
                          f"{exc.strerror}") from exc
    flags, data = parse_mode(spec.mode)
    scratch = None
    try:
        scratch = _scratch(scratch_dir)
        if scheme == "label":
            flags |= MS_NOATIME
            source = _mount_label(name, spec, flags, data, label_timeout, staging_dir)
            _place(source, prepared, flags, scratch, flags_applied=False)
        elif scheme == "nfs":
            _mount_nfs(name, spec, scratch, spec.mode)
            _place(scratch, prepared, flags, scratch, flags_applied=True)
        elif scheme == "tmpfs":
            mount("tmpfs", scratch, "tmpfs", flags, ",".join(data) or None)
            _place(scratch, prepared, flags, scratch, flags_applied=True)
        else:
            _place(_bind_source(spec), prepared, flags, scratch, flags_applied=False)
    except OSError as exc:
        source = {"tmpfs": "tmpfs", "bind": _bind_source(spec)}.get(scheme, str(spec.source))
        raise _cannot(name, source, spec.path, exc.strerror or str(exc)) from exc
    finally:
        if scratch is not None:
            _drop_scratch(scratch)
        os.close(prepared.fd)
