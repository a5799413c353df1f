"""The blocking half of copy-to and copy-from: files and tar streams read from and written
into the container root through directory fds, with the refusal rules and the caps.

Everything here blocks (disk, a slow filesystem) and runs on a copy's worker thread;
`channels.py` drives it from the loop. Paths are resolved by `tether.rootfs` and every
later step acts on an fd, so a container process that swaps a path component for a
symlink, or a file for a FIFO, cannot redirect or block a copy. The rules:

* never read or write the kernel's files: anything under the container's /proc, /sys and
  /dev, or on a kernel filesystem (proc, sysfs, devpts, cgroup, ...), is refused;
* read only regular files (and directories, as tar); a file is opened O_PATH first and
  checked before it is opened for reading, so opening it has no side effect;
* write a new file under a temporary name in the target's directory, then put it in
  place with renameat2: a target that is not a regular file (a FIFO, a device, a
  directory) is never replaced;
* tar streams are made and extracted as they go, never spooled; a compressed stream may
  expand at most EXPANSION_LIMIT times (plus EXPANSION_SLACK), a tar extended header is
  at most TAR_HEADER_LIMIT.
"""
from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import secrets
import stat
import tarfile

from tether import rootfs, system

CHUNK = 1 << 20                 # bytes read or written per call
REFUSED_DIRS = ("/proc", "/sys", "/dev")
TAR_HEADER_LIMIT = 1 << 20      # one PAX or GNU long-name header
EXPANSION_LIMIT = 100           # a compressed tar stream grows at most this many times...
EXPANSION_SLACK = 64 << 20      # ...its compressed size, plus this
MAX_DEPTH = 512                 # directory levels in a tar made from the container
TEMP_PREFIX = ".tether-copy-"


class CopyError(ValueError):
    """A copy refused or stopped; the text is for the client."""


def refused(shown: str, why: str) -> CopyError:
    return CopyError(f"refused: {shown} {why}; copies never touch the kernel's files "
                     f"({', '.join(REFUSED_DIRS)} and kernel filesystems)")


class Guard:
    """The container root for one copy: its fd, and the rule that the kernel's files
    are never read or written."""

    def __init__(self, root: str):
        self.root_fd = rootfs.open_root(root)
        self.refused_devices: dict[int, str] = {}
        top = os.fstat(self.root_fd).st_dev
        for path in REFUSED_DIRS:   # those that are mounts of their own, by device
            try:
                fd = rootfs.open_in_root(self.root_fd, path, rootfs.O_PATH_DIR)
            except OSError:
                continue
            device = os.fstat(fd).st_dev
            os.close(fd)
            if device != top:
                self.refused_devices[device] = path

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def check(self, fd: int, shown: str) -> os.stat_result:
        """Refuse `fd` when it is one of the kernel's files; its fstat otherwise."""
        info = os.fstat(fd)
        kind = system.KERNEL_FILESYSTEMS.get(system.filesystem_type(fd))
        if kind:
            raise refused(shown, f"is on {kind}, a kernel filesystem")
        if info.st_dev in self.refused_devices:
            raise refused(shown, f"is in the container's {self.refused_devices[info.st_dev]}")
        where = rootfs.container_path(self.root_fd, fd)
        for top in REFUSED_DIRS:
            if where is not None and (where == top or where.startswith(top + "/")):
                raise refused(shown, f"is in the container's {top}")
        return info

    def shown(self, fd: int, fallback: str) -> str:
        return rootfs.container_path(self.root_fd, fd) or fallback


def _reopen(path_fd: int, flags: int) -> int:
    """Open for I/O the file an O_PATH fd holds, through /proc/self/fd: the same inode,
    whatever the container has put at its name since."""
    return os.open(system.fd_path(path_fd), flags | os.O_CLOEXEC | os.O_NOCTTY)


def _open_checked(guard: Guard, path_fd: int, shown: str, *, allow_dir: bool
                  ) -> tuple[int, os.stat_result]:
    """`path_fd` (O_PATH) checked against the rules, then opened for reading."""
    info = guard.check(path_fd, shown)
    if stat.S_ISDIR(info.st_mode) and allow_dir:
        flags = os.O_RDONLY | os.O_DIRECTORY
    elif stat.S_ISREG(info.st_mode):
        flags = os.O_RDONLY | os.O_NONBLOCK
    else:
        raise CopyError(f"{shown} is not a regular file"
                        + (" or a directory" if allow_dir else ""))
    fd = _reopen(path_fd, flags)
    opened = os.fstat(fd)
    if (opened.st_ino, opened.st_dev) != (info.st_ino, info.st_dev):
        os.close(fd)
        raise CopyError(f"{shown} changed while it was opened")
    return fd, info


# -- copy-from -----------------------------------------------------------------------------
class Source:
    """What copy-from sends: `kind` ("file"/"tar"), `size` (None for a tar: it is made as
    it is sent), `mode`; `send(write)` writes it out in chunks; `close()`."""

    def __init__(self, guard: Guard, path: str, as_tar):
        self.guard = guard
        self.fd = -1
        path_fd = rootfs.open_in_root(guard.root_fd, path, os.O_PATH)
        try:
            self.fd, info = _open_checked(guard, path_fd, path, allow_dir=as_tar is not False)
        finally:
            os.close(path_fd)
        self.info = info
        self.tar = stat.S_ISDIR(info.st_mode) if as_tar is None else bool(as_tar)
        self.kind = "tar" if self.tar else "file"
        self.size = None if self.tar else info.st_size
        self.mode = stat.S_IMODE(info.st_mode)
        where = guard.shown(self.fd, path)
        self.arcname = posixpath.basename(where.rstrip("/")) or "."
        self.shown = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def send(self, write) -> None:
        if self.tar:
            TarWriter(self.guard, write).add_tree(self.fd, self.info, self.arcname)
        else:
            _send_file(self.fd, self.size, write, self.shown)


def _send_file(fd: int, size: int, write, shown: str) -> None:
    """Exactly `size` bytes (the size the client was told): a file that shrinks while it
    is read is an error, one that grows is cut at the size."""
    left = size
    while left > 0:
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:
            raise CopyError(f"{shown} shrank while it was read ({size - left} of {size} bytes)")
        write(chunk)
        left -= len(chunk)


class TarWriter:
    """A tar stream (POSIX pax) of a directory tree, made as it is written: each entry
    opened through its directory's fd (O_NOFOLLOW), nothing kept but the hard links."""

    def __init__(self, guard: Guard, write):
        self.guard = guard
        self._write = write
        self.written = 0
        self._links: dict[tuple[int, int], str] = {}

    def write(self, data: bytes) -> None:
        self._write(data)
        self.written += len(data)

    def add_tree(self, fd: int, info: os.stat_result, arcname: str) -> None:
        """The entry open at `fd` (a directory or a regular file) and what is under it."""
        if stat.S_ISDIR(info.st_mode):
            self._header(arcname, info)
            self._walk(fd, arcname)
        else:
            self._file(fd, info, arcname)
        self.write(bytes(tarfile.BLOCKSIZE * 2))
        pad = -self.written % tarfile.RECORDSIZE
        if pad:
            self.write(bytes(pad))

    def _walk(self, top_fd: int, top_name: str) -> None:
        # Depth first with an explicit stack of open directories: no recursion limit,
        # at most MAX_DEPTH fds.
        stack = [(top_fd, top_name, iter(sorted(os.listdir(top_fd))), False)]
        try:
            while stack:
                dir_fd, dir_name, names, owned = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    if owned:
                        os.close(dir_fd)
                    continue
                child = self._entry(dir_fd, name, f"{dir_name}/{name}")
                if child is not None:
                    if len(stack) >= MAX_DEPTH:
                        os.close(child)
                        raise CopyError(f"{dir_name}/{name}: more than {MAX_DEPTH} "
                                        "directory levels")
                    stack.append((child, f"{dir_name}/{name}",
                                  iter(sorted(os.listdir(child))), True))
        finally:
            for dir_fd, _, _, owned in stack:
                if owned:
                    os.close(dir_fd)

    def _entry(self, dir_fd: int, name: str, arcname: str) -> int | None:
        """Write one entry; a directory to descend into comes back as an open fd."""
        try:
            path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None   # gone since the listing
        try:
            info = os.fstat(path_fd)
            mode = info.st_mode
            if stat.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=dir_fd)
                except OSError:
                    return None
                self._header(arcname, info, tarfile.SYMTYPE, target)
                return None
            if stat.S_ISSOCK(mode):
                return None   # as tar does
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                self._header(arcname, info)    # the node, never its contents
                return None
            try:
                fd, info = _open_checked(self.guard, path_fd, arcname,
                                         allow_dir=stat.S_ISDIR(mode))
            except CopyError:
                if stat.S_ISDIR(mode):
                    self._header(arcname, info)   # a kernel filesystem mounted here
                return None
            if stat.S_ISDIR(info.st_mode):
                self._header(arcname, info)
                return fd
            try:
                self._file(fd, info, arcname)
            finally:
                os.close(fd)
            return None
        finally:
            os.close(path_fd)

    def _file(self, fd: int, info: os.stat_result, arcname: str) -> None:
        key = (info.st_dev, info.st_ino)
        if info.st_nlink > 1:
            first = self._links.get(key)
            if first is not None:
                self._header(arcname, info, tarfile.LNKTYPE, first)
                return
            self._links[key] = arcname
        self._header(arcname, info, size=info.st_size)
        _send_file(fd, info.st_size, self.write, arcname)
        pad = -info.st_size % tarfile.BLOCKSIZE
        if pad:
            self.write(bytes(pad))

    def _header(self, arcname: str, info: os.stat_result, kind: bytes | None = None,
                linkname: str = "", size: int = 0) -> None:
        entry = tarfile.TarInfo(arcname)
        mode = info.st_mode
        if kind is None:
            kind = (tarfile.DIRTYPE if stat.S_ISDIR(mode) else
                    tarfile.CHRTYPE if stat.S_ISCHR(mode) else
                    tarfile.BLKTYPE if stat.S_ISBLK(mode) else
                    tarfile.FIFOTYPE if stat.S_ISFIFO(mode) else tarfile.REGTYPE)
        entry.type = kind
        entry.mode = stat.S_IMODE(mode)
        entry.uid, entry.gid = info.st_uid, info.st_gid
        entry.uname = entry.gname = ""   # the container's names are not ours to look up
        entry.mtime = int(info.st_mtime)
        entry.size = size if kind == tarfile.REGTYPE else 0
        entry.linkname = linkname
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            entry.devmajor, entry.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
        self.write(entry.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


# -- copy-to ---------------------------------------------------------------------------------
def _temp_name() -> str:
    return TEMP_PREFIX + secrets.token_hex(8)


def _create_temp(dir_fd: int) -> tuple[int, str]:
    for _ in range(16):
        name = _temp_name()
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600, dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise CopyError("cannot find a free temporary name")


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _replace(dir_fd: int, temp: str, name: str, shown: str, *, replaceable) -> None:
    """Put the entry `temp` at `name` in `dir_fd`: a new name as it is; an existing entry
    only when `replaceable(mode)` says so, checked on what was actually swapped out
    (renameat2 RENAME_EXCHANGE), and put back otherwise."""
    try:
        system.renameat2(dir_fd, temp, dir_fd, name, system.RENAME_NOREPLACE)
        return
    except FileExistsError:
        pass
    except OSError as err:
        if err.errno != errno.EINVAL:   # a filesystem without renameat2 flags: below
            raise
        return _replace_plain(dir_fd, temp, name, shown, replaceable=replaceable)
    system.renameat2(dir_fd, temp, dir_fd, name, system.RENAME_EXCHANGE)
    old = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
    if replaceable(old.st_mode):
        _unlink_quietly(dir_fd, temp)
        return
    system.renameat2(dir_fd, temp, dir_fd, name, system.RENAME_EXCHANGE)   # put it back
    raise _not_replaced(shown, old.st_mode)


def _replace_plain(dir_fd, temp, name, shown, *, replaceable) -> None:
    try:
        old = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if old is not None and not replaceable(old.st_mode):
        raise _not_replaced(shown, old.st_mode)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _not_replaced(shown: str, mode: int) -> Exception:
    if stat.S_ISDIR(mode):
        return IsADirectoryError(errno.EISDIR, "is a directory (copy a tar stream into it)",
                                 shown)
    return CopyError(f"{shown} is not a regular file: it is left as it is")


def _regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _regular_or_link(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


class FileTarget:
    """copy-to of one file: written to a temporary name in the target's directory, put
    in place at `commit()` (only over a regular file), removed at `discard()`."""

    def __init__(self, guard: Guard, path: str, mode: int):
        self.path = path
        self.mode = mode
        self.dir_fd, self.name = rootfs.open_parent_in_root(guard.root_fd, path)
        self.fd = -1
        try:
            guard.check(self.dir_fd, path)
            try:
                old = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and not stat.S_ISREG(old.st_mode):
                raise _not_replaced(path, old.st_mode)
            self.fd, self.temp = _create_temp(self.dir_fd)
        except BaseException:
            os.close(self.dir_fd)
            raise

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def commit(self) -> None:
        os.fchmod(self.fd, self.mode & 0o7777)
        os.close(self.fd)
        self.fd = -1
        try:
            _replace(self.dir_fd, self.temp, self.name, self.path, replaceable=_regular)
        except BaseException:
            _unlink_quietly(self.dir_fd, self.temp)
            raise
        finally:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            _unlink_quietly(self.dir_fd, self.temp)
            os.close(self.dir_fd)
            self.dir_fd = -1


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses an extended header (PAX, GNU long name) over TAR_HEADER_LIMIT: tarfile
    reads such a header into memory whole."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                and self.size > TAR_HEADER_LIMIT:
            raise CopyError(f"a tar extended header of {self.size} bytes is over the "
                            f"{TAR_HEADER_LIMIT}-byte limit")
        return super()._proc_member(tarfile_)


class _Counted:
    """The client's bytes (a `read(n)` source), counted; the first few can be put back."""

    def __init__(self, source):
        self.source = source
        self.count = 0
        self._back = b""

    def read(self, size: int = -1) -> bytes:
        if self._back:
            if 0 <= size < len(self._back):
                data, self._back = self._back[:size], self._back[size:]
            else:
                data, self._back = self._back, b""
            return data
        data = self.source.read(CHUNK if size < 0 else size)
        self.count += len(data)
        return data

    def unread(self, data: bytes) -> None:
        self._back = data + self._back


class _Expansion:
    """A decompressed stream that may grow only EXPANSION_LIMIT times its input."""

    def __init__(self, decompressed, counted: _Counted, kind: str):
        self.decompressed = decompressed
        self.counted = counted
        self.kind = kind
        self.out = 0

    def read(self, size: int = -1) -> bytes:
        data = self.decompressed.read(CHUNK if size < 0 else min(size, CHUNK))
        self.out += len(data)
        if self.out > EXPANSION_LIMIT * self.counted.count + EXPANSION_SLACK:
            raise CopyError(
                f"the {self.kind} stream expands more than {EXPANSION_LIMIT} times "
                f"({self.out} bytes from {self.counted.count}): stopped as a likely "
                "decompression bomb; send the archive uncompressed")
        return data


def _decompressed(counted: _Counted):
    """The tar stream: as sent, or decompressed (gzip, bzip2, xz) under the cap."""
    head = b""
    while len(head) < 6:
        more = counted.read(6 - len(head))
        if not more:
            break
        head += more
    counted.unread(head)
    if head.startswith(b"\x1f\x8b"):
        import gzip
        return _Expansion(gzip.GzipFile(fileobj=counted, mode="rb"), counted, "gzip")
    if head.startswith(b"BZh"):
        import bz2
        return _Expansion(bz2.BZ2File(counted, "rb"), counted, "bzip2")
    if head.startswith(b"\xfd7zXZ\x00"):
        import lzma
        return _Expansion(lzma.LZMAFile(counted, "rb"), counted, "xz")
    return counted


class TarTarget:
    """copy-to of a tar stream, extracted under a directory as it arrives. Member names
    follow Python's `data` filter (no absolute names or `..` out of the directory, no
    devices or FIFOs, no absolute or outward links, modes limited, owners not kept);
    every member is placed through directory fds inside the root like any other copy."""

    def __init__(self, guard: Guard, path: str):
        self.guard = guard
        self.path = path
        fd = rootfs.open_in_root(guard.root_fd, path, os.O_PATH)
        try:
            info = guard.check(fd, path)
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
            # Members go under where the directory really is (a link in `path` followed).
            self.top = (rootfs.container_path(guard.root_fd, fd)
                        or posixpath.normpath("/" + path))
        finally:
            os.close(fd)

    def extract(self, source) -> None:
        """Read the stream from `source.read(n)` and extract it, member by member."""
        stream = _decompressed(_Counted(source))
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo) as archive:
            while True:
                member = archive.next()
                if member is None:
                    break
                archive.members.clear()   # a stream: nothing is looked up by name later
                self._member(archive, member)

    def _name(self, name: str, what: str = "member") -> str:
        clean = posixpath.normpath(name.lstrip("/")) if name.strip("/") else "."
        if clean == ".." or clean.startswith("../"):
            raise CopyError(f"tar {what} {name!r} is outside the target directory")
        return clean

    def _member(self, archive, member) -> None:
        name = self._name(member.name)
        full = posixpath.join(self.top, name)
        if member.isdir():
            os.close(self._directory(full, member.name))
            return
        if name == ".":
            raise CopyError(f"tar member {member.name!r} is not a directory")
        if member.isreg():
            self._file(archive, member, full)
        elif member.issym():
            self._symlink(member, name, full)
        elif member.islnk():
            self._hardlink(member, full)
        else:
            raise CopyError(f"tar member {member.name!r} is a device, FIFO or other "
                            "special file: refused")

    def _directory(self, full: str, shown: str) -> int:
        fd = rootfs.makedirs_in_root(self.guard.root_fd, full)
        try:
            self.guard.check(fd, shown)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent(self, full: str, shown: str) -> tuple[int, str]:
        parent = self._directory(posixpath.dirname(full), shown)
        return parent, posixpath.basename(full)

    def _file(self, archive, member, full: str) -> None:
        mode = member.mode & 0o755
        if not mode & 0o100:
            mode &= ~0o111
        mode |= 0o600
        dir_fd, name = self._parent(full, member.name)
        temp = None
        try:
            fd, temp = _create_temp(dir_fd)
            try:
                data = archive.extractfile(member)
                if member.sparse is not None:
                    _write_sparse(data.raw, fd, member)
                else:
                    while chunk := data.read(CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
                os.utime(fd, (member.mtime, member.mtime))
            finally:
                os.close(fd)
            _replace(dir_fd, temp, name, member.name, replaceable=_regular_or_link)
            temp = None
        finally:
            if temp is not None:
                _unlink_quietly(dir_fd, temp)
            os.close(dir_fd)

    def _symlink(self, member, name: str, full: str) -> None:
        target = member.linkname
        if target.startswith("/"):
            raise CopyError(f"tar member {member.name!r} links to the absolute path "
                            f"{target!r}: refused")
        self._name(posixpath.join(posixpath.dirname(name), target), "link target")
        self._place(full, member.name, lambda dir_fd, temp: os.symlink(target, temp,
                                                                        dir_fd=dir_fd))

    def _hardlink(self, member, full: str) -> None:
        if member.linkname.startswith("/"):
            raise CopyError(f"tar member {member.name!r} links to the absolute path "
                            f"{member.linkname!r}: refused")
        source = posixpath.join(self.top, self._name(member.linkname, "link target"))
        src_dir, src_name = rootfs.open_parent_in_root(self.guard.root_fd, source,
                                                       follow_last=False)
        try:
            self.guard.check(src_dir, member.linkname)
            if not stat.S_ISREG(os.stat(src_name, dir_fd=src_dir,
                                        follow_symlinks=False).st_mode):
                raise CopyError(f"tar member {member.name!r}: the link target "
                                f"{member.linkname!r} is not a regular file")
            self._place(full, member.name, lambda dir_fd, temp: os.link(
                src_name, temp, src_dir_fd=src_dir, dst_dir_fd=dir_fd,
                follow_symlinks=False))
        finally:
            os.close(src_dir)

    def _place(self, full: str, shown: str, make) -> None:
        dir_fd, name = self._parent(full, shown)
        try:
            temp = _temp_name()
            make(dir_fd, temp)
            try:
                _replace(dir_fd, temp, name, shown, replaceable=_regular_or_link)
            except BaseException:
                _unlink_quietly(dir_fd, temp)
                raise
        finally:
            os.close(dir_fd)


def _write_sparse(data, fd: int, member) -> None:
    """A sparse member (GNU tar -S, in the old GNU or the PAX form): each data segment of
    its map written where it goes and the size set, the holes left holes. A few KiB of
    archive may say its file is terabytes long; written out whole (holes as zeros) that
    was a tar bomb no expansion cap saw. `data` reads the member by position (tarfile's
    _FileInFile: a segment's bytes come from the stream, in order, a hole's are zeros)."""
    end = 0
    for offset, size in member.sparse:
        if not size:
            continue   # GNU's map ends with empty entries, (size, 0) and (0, 0)
        if offset < end or size < 0 or offset + size > member.size:
            raise CopyError(f"tar member {member.name!r}: its sparse map is out of order "
                            "or past its size")
        end = offset + size
        data.seek(offset)
        while offset < end:
            chunk = data.read(min(CHUNK, end - offset))
            if not chunk:
                raise CopyError(f"tar member {member.name!r} ends early")
            view = memoryview(chunk)
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
    os.ftruncate(fd, member.size)


class Digesting:
    """A `read(n)` source that hashes and counts what passes through."""

    def __init__(self, source):
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data
