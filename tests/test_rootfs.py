"""Resolving paths inside a container root through directory fds (tether/rootfs.py), with
both walks: the kernel's openat2(RESOLVE_IN_ROOT) and ours, component by component."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from helpers import missing
from swapper import USER, Swapper
from tether import rootfs, system
from tether.rootfs import (O_PATH_DIR, container_path, makedirs_in_root, open_in_root,
                           open_parent_in_root, open_root)

@pytest.fixture(params=[False, True], ids=["walk", "openat2"])
def kernel(request) -> bool:
    """Each walk in turn: ours (False), then the kernel's openat2 (True)."""
    if request.param and not system.have_openat2():
        missing("openat2", "the kernel has no openat2 (before 5.6)")
    return request.param


@pytest.fixture
def root(tmp_path):
    top = tmp_path / "root"
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "hosts").write_text("inside\n")
    (top / "run" / "dir").mkdir(parents=True)
    os.symlink("/etc", top / "abs")                 # absolute: from the root
    os.symlink("../etc", top / "run" / "rel")       # relative: from its directory
    os.symlink("../../../../../../..", top / "up")  # climbs: stops at the root
    os.symlink("loop2", top / "loop1")
    os.symlink("loop1", top / "loop2")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("OUTSIDE\n")
    fd = open_root(str(top))
    yield top, fd
    os.close(fd)


def read(fd: int) -> str:
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def test_symlinks_and_dotdot_resolve_inside_the_root(root, kernel):
    top, fd = root
    for path in ("/etc/hosts", "abs/hosts", "/run/rel/hosts", "/up/etc/hosts",
                 "/../../etc/hosts", "/run/dir/../../abs/../etc/./hosts", "/up/up/abs/hosts"):
        assert read(open_in_root(fd, path, use_openat2=kernel)) == "inside\n", path


def test_loops_no_follow_and_no_symlinks(root, kernel):
    top, fd = root
    with pytest.raises(OSError) as err:
        open_in_root(fd, "/loop1", use_openat2=kernel)
    assert err.value.errno == errno.ELOOP and err.value.filename == "/loop1"
    with pytest.raises(OSError) as err:
        open_in_root(fd, "/abs", follow_last=False, use_openat2=kernel)
    assert err.value.errno == errno.ELOOP
    link = open_in_root(fd, "/abs", os.O_PATH, follow_last=False, use_openat2=kernel)
    assert stat.S_ISLNK(os.fstat(link).st_mode)
    os.close(link)
    with pytest.raises(OSError) as err:
        open_in_root(fd, "/run/rel/hosts", no_symlinks=True, use_openat2=kernel)
    assert err.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        open_in_root(fd, "/etc/missing", use_openat2=kernel)
    assert container_path(fd, dir_fd := open_in_root(fd, "/up/run", O_PATH_DIR)) == "/run"
    os.close(dir_fd)


def test_magic_links_are_refused(kernel):
    """/proc/self/root followed as the kernel would lead to the agent's root."""
    fd = open_root("/")
    try:
        with pytest.raises(OSError) as err:
            open_in_root(fd, "/proc/self/root/etc/hostname", use_openat2=kernel)
        assert err.value.errno == errno.ELOOP
    finally:
        os.close(fd)


def test_parent_follows_the_last_link_inside_the_root(root, kernel):
    top, fd = root
    os.symlink("/etc/new-name", top / "dangling")
    dir_fd, name = open_parent_in_root(fd, "/dangling", use_openat2=kernel)
    assert (container_path(fd, dir_fd), name) == ("/etc", "new-name")
    os.close(dir_fd)
    dir_fd, name = open_parent_in_root(fd, "/dangling", follow_last=False, use_openat2=kernel)
    assert (container_path(fd, dir_fd), name) == ("/", "dangling")
    os.close(dir_fd)
    for path in ("/", "/etc/.."):
        with pytest.raises(IsADirectoryError):
            open_parent_in_root(fd, path, use_openat2=kernel)


def test_makedirs_goes_through_links_and_stays_inside(root, tmp_path):
    top, fd = root
    made = makedirs_in_root(fd, "/up/abs/a/b/c")
    assert container_path(fd, made) == "/etc/a/b/c"
    os.close(made)
    assert (top / "etc" / "a" / "b" / "c").is_dir()
    assert not (tmp_path / "etc" / "a").exists()


def test_makedirs_makes_a_dangling_links_target_with_its_parents(root, tmp_path):
    """An image's `data -> /srv/data` with no /srv: a volume mounted on /data (or a copy
    into it) makes /srv/data, as the path-string form did, inside the root; a link
    cycle is ELOOP, not a recursion without end."""
    top, fd = root
    os.symlink("/srv/data", top / "data")
    os.symlink("../missing/deeper", top / "run" / "rel2")
    made = makedirs_in_root(fd, "/data/sub")
    assert container_path(fd, made) == "/srv/data/sub"
    os.close(made)
    made = makedirs_in_root(fd, "/run/rel2")
    assert container_path(fd, made) == "/missing/deeper"
    os.close(made)
    assert (top / "srv" / "data" / "sub").is_dir() and not (tmp_path / "srv").exists()
    os.symlink("cycle/x", top / "cycle")
    with pytest.raises(OSError) as err:
        makedirs_in_root(fd, "/cycle/y")
    assert err.value.errno == errno.ELOOP


def test_the_string_form_resolves_as_before(root):
    top, _ = root
    assert rootfs.resolve_in_root(str(top), "/up/abs/hosts") == str(top / "etc" / "hosts")


# -- a real process in the root swapping a component for a symlink --------------------------
@pytest.fixture
def racing_root(tmp_path):
    """root/data/dir (a directory) and root/data/alt (a symlink to a host directory),
    exchanged by a swapper running as an unprivileged user chrooted in root."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("HOST")
    os.chmod(outside / "f", 0o600)
    top = tmp_path / "root"
    (top / "data" / "dir").mkdir(parents=True)
    (top / "data" / "dir" / "f").write_text("inside")
    os.symlink(str(outside), top / "data" / "alt")
    for path in ("data", "data/dir", "data/dir/f"):
        os.chown(top / path, USER, USER)
    os.lchown(top / "data" / "alt", USER, USER)
    swapper = Swapper(top, "/data/dir", "/data/alt")
    fd = open_root(str(top))
    try:
        yield fd, outside
    finally:
        swapper.stop()
        os.close(fd)


def test_a_swapped_component_never_leads_out(racing_root, kernel):
    fd, outside = racing_root
    host = os.stat(outside / "f")
    opened = created = 0
    for i in range(400):
        try:
            f = open_in_root(fd, "/data/dir/f", use_openat2=kernel)
        except OSError:
            continue
        info = os.fstat(f)
        os.close(f)
        assert (info.st_dev, info.st_ino) != (host.st_dev, host.st_ino), f"call {i}"
        opened += 1
    for i in range(400):
        try:
            dir_fd, name = open_parent_in_root(fd, f"/data/dir/new{i}", use_openat2=kernel)
        except OSError:
            continue
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600, dir_fd=dir_fd))
            created += 1
        finally:
            os.close(dir_fd)
    assert os.listdir(outside) == ["f"]
    assert opened + created < 800, "no call saw the symlink: the race did not run"
