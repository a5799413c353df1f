"""The blocking half of the copies (tether/attach/copyfiles.py), in this process: what a
copy may read and replace, tar streams made and extracted through directory fds."""
from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import os
import stat
import subprocess
import tarfile

import pytest

from tether.attach import copyfiles
from tether.attach.copyfiles import CopyError, FileTarget, Guard, Source, TarTarget


@pytest.fixture
def root(tmp_path):
    top = tmp_path / "root"
    (top / "data").mkdir(parents=True)
    guard = Guard(str(top))
    yield top, guard
    guard.close()


class Reader:
    def __init__(self, data: bytes):
        self.buf = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.buf.read(min(size, 1 << 16) if size > 0 else 1 << 16)


def send(source: Source) -> bytes:
    out = bytearray()
    try:
        source.send(out.extend)
    finally:
        source.close()
    return bytes(out)


def tar_of(*members) -> bytes:
    """members: (TarInfo fields dict, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# -- reading -------------------------------------------------------------------------------
def test_source_reads_regular_files_and_refuses_fifos_and_devices(root):
    top, guard = root
    (top / "data" / "f").write_bytes(b"hello")
    os.mkfifo(top / "data" / "pipe")
    os.mknod(top / "data" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    source = Source(guard, "/data/f", None)
    assert (source.kind, source.size) == ("file", 5)
    assert send(source) == b"hello"
    for name in ("pipe", "null"):
        with pytest.raises(CopyError, match="not a regular file or a directory"):
            Source(guard, f"/data/{name}", None)
    with pytest.raises(CopyError, match="not a regular file$"):
        Source(guard, "/data", False)


def test_the_kernels_files_are_refused_however_they_are_named(tmp_path):
    guard = Guard("/")
    try:
        for path in ("/proc/kmsg", "/proc/self/status", "/sys/kernel/notes", "/dev/null",
                     "/dev/shm"):
            with pytest.raises(CopyError, match="refused"):
                Source(guard, path, None)
        with pytest.raises(CopyError, match="refused"):
            FileTarget(guard, "/proc/sys/kernel/hostname", 0o644)
        with pytest.raises(CopyError, match="refused"):
            TarTarget(guard, "/dev/shm")
    finally:
        guard.close()


def test_a_tar_of_a_tree_keeps_links_and_never_opens_devices(root):
    top, guard = root
    tree = top / "data" / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a").write_bytes(b"A" * 1000)
    os.link(tree / "sub" / "a", tree / "hard")
    os.symlink("/etc/passwd", tree / "abs")
    os.mkfifo(tree / "fifo")
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    data = send(Source(guard, "/data/tree", None))
    assert len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == ["tree", "tree/abs", "tree/fifo", "tree/hard", "tree/null",
                                   "tree/sub", "tree/sub/a"]
        assert members["tree/abs"].issym() and members["tree/abs"].linkname == "/etc/passwd"
        assert members["tree/hard"].isreg() and members["tree/sub/a"].islnk()
        assert members["tree/sub/a"].linkname == "tree/hard"
        assert members["tree/fifo"].isfifo() and members["tree/null"].ischr()
        assert archive.extractfile("tree/hard").read() == b"A" * 1000


def test_a_tar_of_a_root_shows_its_kernel_filesystems_as_empty_directories(root):
    top, guard = root
    (top / "proc").mkdir()
    (top / "etc").mkdir()
    (top / "etc" / "hosts").write_text("hosts\n")
    subprocess.run(["mount", "-t", "proc", "proc", str(top / "proc")], check=True)
    try:
        data = send(Source(guard, "/", True))
    finally:
        subprocess.run(["umount", str(top / "proc")], check=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert sorted(archive.getnames()) == [".", "./data", "./etc", "./etc/hosts", "./proc"]


# -- writing one file ------------------------------------------------------------------------
def write_file(guard, path, data, mode=0o640):
    target = FileTarget(guard, path, mode)
    try:
        target.write(data)
        target.commit()
    except BaseException:
        target.discard()
        raise


def test_a_file_replaces_only_a_regular_file(root):
    top, guard = root
    write_file(guard, "/data/new", b"one")
    assert (top / "data" / "new").read_bytes() == b"one"
    assert stat.S_IMODE((top / "data" / "new").stat().st_mode) == 0o640
    write_file(guard, "/data/new", b"two")
    assert (top / "data" / "new").read_bytes() == b"two"
    os.mkfifo(top / "data" / "pipe")
    with pytest.raises(CopyError, match="not a regular file"):
        write_file(guard, "/data/pipe", b"x")
    (top / "data" / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        write_file(guard, "/data/dir", b"x")
    assert stat.S_ISFIFO(os.lstat(top / "data" / "pipe").st_mode)
    assert sorted(os.listdir(top / "data")) == ["dir", "new", "pipe"]


def test_a_fifo_swapped_in_after_the_check_is_put_back(root):
    """The check at open and the swap at commit: what was swapped out is looked at, and a
    FIFO that appeared meanwhile goes back where it was."""
    top, guard = root
    (top / "data" / "f").write_bytes(b"old")
    target = FileTarget(guard, "/data/f", 0o644)
    target.write(b"new")
    os.unlink(top / "data" / "f")
    os.mkfifo(top / "data" / "f")
    with pytest.raises(CopyError, match="not a regular file"):
        target.commit()
    assert stat.S_ISFIFO(os.lstat(top / "data" / "f").st_mode)
    assert os.listdir(top / "data") == ["f"]


def test_a_symlinked_target_is_written_where_it_leads_inside_the_root(root, tmp_path):
    top, guard = root
    os.symlink("/etc/real", top / "data" / "link")
    (top / "etc").mkdir()
    (tmp_path / "etc").mkdir()
    write_file(guard, "/data/link", b"through the link")
    assert (top / "etc" / "real").read_bytes() == b"through the link"
    assert not (tmp_path / "etc" / "real").exists()


# -- tar in ----------------------------------------------------------------------------------
def extract(guard, path, data):
    TarTarget(guard, path).extract(Reader(data))


def test_tar_members_land_inside_with_modes_limited(root):
    top, guard = root
    archive = tar_of(({"name": "/abs/x", "mode": 0o4777, "mtime": 1_000_000}, b"x"),
                     ({"name": "sub/", "type": tarfile.DIRTYPE}, None),
                     ({"name": "sub/link", "type": tarfile.SYMTYPE, "linkname": "../abs/x"},
                      None),
                     ({"name": "sub/hard", "type": tarfile.LNKTYPE, "linkname": "abs/x"},
                      None),
                     ({"name": "deep/er/file", "mode": 0o600}, b"deep"))
    extract(guard, "/data", archive)
    data = top / "data"
    info = (data / "abs" / "x").stat()
    assert (stat.S_IMODE(info.st_mode), info.st_mtime, info.st_nlink) == (0o755, 1_000_000, 2)
    assert os.readlink(data / "sub" / "link") == "../abs/x"
    assert (data / "deep" / "er" / "file").read_bytes() == b"deep"
    assert not [n for n in os.listdir(data) if n.startswith(copyfiles.TEMP_PREFIX)]


@pytest.mark.parametrize("member, message", [
    ({"name": "../up", "type": tarfile.REGTYPE}, "outside the target"),
    ({"name": "a/../../up", "type": tarfile.REGTYPE}, "outside the target"),
    ({"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "absolute"),
    ({"name": "link", "type": tarfile.SYMTYPE, "linkname": "../../etc"}, "outside"),
    ({"name": "hard", "type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}, "absolute"),
    ({"name": "null", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, "device"),
    ({"name": "pipe", "type": tarfile.FIFOTYPE}, "device, FIFO"),
])
def test_tar_members_that_would_leave_or_make_devices_are_refused(root, member, message):
    top, guard = root
    with pytest.raises(CopyError, match=message):
        extract(guard, "/data", tar_of((dict(member), b"" if member["type"] == tarfile.REGTYPE
                                        else None)))
    assert os.listdir(top / "data") == []


def test_a_tar_member_never_replaces_a_fifo(root):
    top, guard = root
    os.mkfifo(top / "data" / "pipe")
    with pytest.raises(CopyError, match="not a regular file"):
        extract(guard, "/data", tar_of(({"name": "pipe"}, b"data"),))
    assert stat.S_ISFIFO(os.lstat(top / "data" / "pipe").st_mode)


def test_a_huge_extended_header_is_refused_before_it_is_read(root):
    top, guard = root
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 30          # tarfile would read a gigabyte into memory
    data = header.tobuf(tarfile.USTAR_FORMAT) + bytes(1 << 16)
    with pytest.raises(CopyError, match="extended header"):
        extract(guard, "/data", data)


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bzip2", "xz"])
def test_compressed_tar_streams_are_extracted_and_capped(root, compress, monkeypatch):
    top, guard = root
    payload = os.urandom(1 << 16)
    extract(guard, "/data", compress(tar_of(({"name": "f"}, payload),)))
    assert hashlib.sha256((top / "data" / "f").read_bytes()).digest() == \
        hashlib.sha256(payload).digest()
    monkeypatch.setattr(copyfiles, "EXPANSION_SLACK", 1 << 20)
    bomb = compress(tar_of(({"name": "zeros"}, bytes(64 << 20)),))
    with pytest.raises(CopyError, match="expands more than 100 times"):
        extract(guard, "/data", bomb)
    assert os.listdir(top / "data") == ["f"]


def test_a_nul_in_a_path_is_an_error_and_leaves_nothing_behind(root):
    top, guard = root
    for make in (lambda: Source(guard, "/data/f\0/../../x", None),
                 lambda: FileTarget(guard, "/data/new\0x", 0o644),
                 lambda: TarTarget(guard, "/data\0/x")):
        with pytest.raises(ValueError, match="null byte"):
            make()
    assert os.listdir(top / "data") == []


@pytest.mark.parametrize("form", ["gnu", "pax"])
def test_a_sparse_member_is_written_sparse_not_as_its_size_in_zeros(tmp_path, form):
    """A sparse member (GNU tar -S: the old GNU form, or PAX 1.0) is a few KiB of archive
    that may say its file is terabytes long. It used to be written out whole, holes as
    zeros: an uncompressed tar bomb past the expansion cap, filling the disk under the
    container root (a host directory, in the sandbox). Its holes are holes now."""
    from helpers import require_tool, small_tmpfs
    require_tool("tar")
    size = 1 << 30                                       # 64 times the disk below
    source = tmp_path / "src"
    source.mkdir()
    with open(source / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(size // 2)
        f.write(b"middle")
        f.truncate(size)
    archive = subprocess.run(["tar", "-C", str(source), "-cSf", "-", f"--format={form}",
                              "sparse"], check=True, capture_output=True).stdout
    assert len(archive) < 1 << 16
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        (disk / "data").mkdir()
        guard = Guard(str(disk))
        try:
            extract(guard, "/data", archive)
        finally:
            guard.close()
        out = disk / "data" / "sparse"
        info = out.stat()
        assert info.st_size == size
        assert info.st_blocks * 512 < 1 << 20, "the holes were written as zeros"
        with open(out, "rb") as f:
            assert f.read(4) == b"head"
            f.seek(size // 2 - 2)
            assert f.read(10) == b"\0\0middle\0\0"
