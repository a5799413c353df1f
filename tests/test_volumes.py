"""Volumes: option building, superblock probing on real images, and real mounts of labelled
ext4 loop devices, tmpfs and bind mounts inside a private mount namespace."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import (RACE_AT_FIRST_MOUNT, loop_disks, missing, mkfs_ext4, require_root,
                     require_tool, run_in_mount_namespace)
from tether.system import MS_NOATIME, MS_NOEXEC, MS_RDONLY
from tether.volumes import (VolumeError, find_device_by_label, nfs_device, nfs_options,
                            parse_mode, probe)

REPO = Path(__file__).resolve().parents[1]

REFERENCE_NFS_MODE = ("rw,noatime,vers=3,rsize=131072,wsize=131072,hard,proto=tcp,timeo=600,"
                      "sec=sys,mountvers=3,mountproto=tcp,local_lock=none,addr=nfs.example")


def test_parse_mode():
    assert parse_mode("") == (0, [])
    assert parse_mode("ro,noexec,size=64m") == (MS_RDONLY | MS_NOEXEC, ["size=64m"])
    assert parse_mode("ro,rw") == (0, [])          # the last word wins, as mount(8) does


def test_nfs_options_rewrite_addr_and_keep_the_rest():
    flags, data = nfs_options(REFERENCE_NFS_MODE, "192.0.2.7")
    assert flags == MS_NOATIME
    assert data == ("vers=3,rsize=131072,wsize=131072,hard,proto=tcp,timeo=600,sec=sys,"
                    "mountvers=3,mountproto=tcp,local_lock=none,addr=192.0.2.7")
    assert nfs_options("ro", "2001:db8::1") == (MS_RDONLY, "addr=2001:db8::1")


def test_nfs_device_has_one_slash():
    assert nfs_device("server", "/export/vol1") == "server:/export/vol1"
    assert nfs_device("server", "export") == "server:/export"


def test_probe_reads_ext_labels_from_real_images(tmp_path):
    require_tool("mkfs.ext4")
    mkfs_ext4(tmp_path / "a.img", "vol-a")
    assert probe(str(tmp_path / "a.img")) == ("ext4", "vol-a")
    subprocess.run(["mkfs.ext2", "-q", "-F", "-L", "old", str(tmp_path / "a.img")], check=True,
                   capture_output=True, timeout=60)
    assert probe(str(tmp_path / "a.img")) == ("ext2", "old")
    (tmp_path / "zero.img").write_bytes(bytes(64 * 1024))
    assert probe(str(tmp_path / "zero.img")) is None


def test_probe_reads_iso9660_volume_id(tmp_path):
    require_tool("xorriso")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "CIDATA", "-o",
                    str(tmp_path / "c.iso"), str(tmp_path / "src")], check=True,
                   capture_output=True, timeout=60)
    assert probe(str(tmp_path / "c.iso")) == ("iso9660", "CIDATA")


def test_find_device_by_label_times_out_clearly():
    label = "nope-" + secrets.token_hex(4)
    started = time.monotonic()
    with pytest.raises(VolumeError) as err:
        find_device_by_label(label, 0.5)
    assert time.monotonic() - started >= 0.5
    assert str(err.value) == (
        f"no disk labelled {label!r} appeared within 0.5s "
        "(looked in /dev/disk/by-label and the superblocks of /sys/class/block)")


# -- real mounts -------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, os, sys
    from extraconfig.types import URL
    from tether.config import MountSpec
    from tether.volumes import mount_volumes, VolumeError
    spec = json.load(open(sys.argv[1]))
    mounts = {name: MountSpec(source=URL(scheme=m["scheme"], host=m.get("host", ""),
                                         path=m.get("path", "")),
                              path=m["dest"], mode=m.get("mode", ""))
              for name, m in spec["mounts"].items()}
    result = {}
    try:
        mount_volumes(mounts, spec["root"], label_timeout=spec.get("timeout", 10),
                      staging_dir=spec["staging"])
    except VolumeError as exc:
        result["error"] = str(exc)
    table = [line.split() for line in open("/proc/self/mountinfo")]
    result["mounts"] = [(f[4], f[5], f[f.index("-") + 1], f[f.index("-") + 2],
                         f[f.index("-") + 3])
                        for f in table if f[4].startswith(spec["root"])]
    probes = {}
    for rel in spec.get("write", []):
        path = os.path.join(spec["root"], rel)
        try:
            with open(path, "w") as f:
                f.write("data")
            probes[rel] = "ok"
        except OSError as exc:
            probes[rel] = exc.strerror
    result["write"] = probes
    result["listing"] = {rel: sorted(os.listdir(os.path.join(spec["root"], rel)))
                         for rel in spec.get("list", [])}
    result["stat"] = {rel: [st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)]
                      for rel in spec.get("stat", [])
                      for st in [os.stat(os.path.join(spec["root"], rel))]}
    result["read"] = {rel: open(os.path.join(spec["root"], rel)).read()
                      for rel in spec.get("read", [])}
    print(json.dumps(result))
""")


def run_in_mount_ns(tmp_path: Path, spec: dict) -> dict:
    spec_path = tmp_path / f"spec-{secrets.token_hex(3)}.json"
    spec_path.write_text(json.dumps(spec))
    return run_in_mount_namespace(CHILD, str(spec_path))


@pytest.fixture
def loopdisks(tmp_path):
    """make(populate_data_dir=False) -> label; a loop device with a labelled ext4 on it."""
    with loop_disks(tmp_path) as make:
        yield make


@pytest.mark.root
def test_label_volumes_nested_ro_and_lost_found_hidden(tmp_path, loopdisks):
    parent, child, readonly = loopdisks(), loopdisks(populate_data_dir=True), loopdisks()
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    os.chown(root / "data", 1234, 2345)
    os.chmod(root / "data", 0o750)
    result = run_in_mount_ns(tmp_path, {
        "root": str(root), "staging": str(tmp_path / "staging"),
        # the nested one first in the map: it must still be mounted after its parent
        "mounts": {
            "inner": {"scheme": "label", "path": child, "dest": "/data/inner"},
            "outer": {"scheme": "label", "path": parent, "dest": "/data"},
            "ro": {"scheme": "label", "path": readonly, "dest": "/readonly", "mode": "ro"},
        },
        "write": ["data/inner/file", "data/file", "readonly/file"],
        "list": ["data/inner"], "stat": ["data", "readonly"],
    })
    assert "error" not in result, result
    targets = [m[0] for m in result["mounts"]]
    assert targets == [str(root / "data"), str(root / "data" / "inner"), str(root / "readonly")]
    assert all(m[2] == "ext4" for m in result["mounts"])
    ro_options = next(m[1] for m in result["mounts"] if m[0] == str(root / "readonly"))
    assert ro_options.split(",")[0] == "ro"
    assert result["write"] == {"data/inner/file": "ok", "data/file": "ok",
                               "readonly/file": "Read-only file system"}
    # .vic.vol.data bound in: lost+found is not visible
    assert result["listing"]["data/inner"] == ["file"]
    # the mount point that existed keeps its owner and mode; a new one is 0755
    assert result["stat"]["data"] == [1234, 2345, "0o750"]
    assert result["stat"]["readonly"][2] == "0o755"


@pytest.mark.root
def test_missing_label_times_out_with_a_clear_error(tmp_path, loopdisks):
    label = "tvmissing" + secrets.token_hex(3)
    result = run_in_mount_ns(tmp_path, {
        "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"), "timeout": 1,
        "mounts": {"v": {"scheme": "label", "path": label, "dest": "/v"}}})
    assert result["error"] == (f"volume v: cannot mount label {label} on /v: "
                               f"no disk labelled {label!r} appeared within 1s "
                               "(looked in /dev/disk/by-label and the superblocks of "
                               "/sys/class/block)")
    assert result["mounts"] == []


@pytest.mark.root
def test_label_mount_waits_for_a_disk_that_appears_later(tmp_path, loopdisks):
    label = "tvlate" + secrets.token_hex(4)
    image = tmp_path / "late.img"
    mkfs_ext4(image, label)
    spec = {"root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
            "timeout": 60, "mounts": {"v": {"scheme": "label", "path": label, "dest": "/v"}}}
    spec_path = tmp_path / "late.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable,
                             "-c", CHILD, str(spec_path)], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev = None
    try:
        time.sleep(1.5)
        assert proc.poll() is None      # still waiting, not failed
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        out, err = proc.communicate(timeout=120)
        result = json.loads(out)
        assert "error" not in result, (result, err)
        assert [m[0] for m in result["mounts"]] == [str(tmp_path / "root" / "v")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.mark.root
def test_tmpfs_and_bind(tmp_path):
    require_root("a private mount namespace")
    require_tool("unshare")
    source = tmp_path / "bootstrap-share"
    source.mkdir()
    (source / "hello").write_text("from the bootstrap root")
    root = tmp_path / "root"
    result = run_in_mount_ns(tmp_path, {
        "root": str(root), "staging": str(tmp_path / "staging"),
        "mounts": {
            "scratch": {"scheme": "tmpfs", "dest": "/scratch", "mode": "size=4m,mode=1777"},
            "share": {"scheme": "bind", "path": str(source), "dest": "/share", "mode": "ro"},
            "share-rw": {"scheme": "bind", "path": str(source), "dest": "/share-rw"},
        },
        "write": ["scratch/f", "share/f", "share-rw/f"],
        "read": ["share/hello"], "stat": ["scratch"],
    })
    assert "error" not in result, result
    by_target = {m[0]: m for m in result["mounts"]}
    assert by_target[str(root / "scratch")][2] == "tmpfs"
    assert by_target[str(root / "share")][1].split(",")[0] == "ro"
    assert result["write"] == {"scratch/f": "ok", "share/f": "Read-only file system",
                               "share-rw/f": "ok"}
    assert result["read"]["share/hello"] == "from the bootstrap root"
    assert result["stat"]["scratch"][2] == "0o1777"
    # size from mode, as the kernel reports it in the superblock options
    assert "size=4096k" in by_target[str(root / "scratch")][4].split(",")


@pytest.mark.root
def test_failures_name_the_device_and_the_error(tmp_path):
    require_root("a private mount namespace")
    require_tool("unshare")
    result = run_in_mount_ns(tmp_path, {
        "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
        "mounts": {"gone": {"scheme": "bind", "path": "/nonexistent/share", "dest": "/x"}}})
    assert result["error"] == ("volume gone: cannot mount /nonexistent/share on /x: "
                               "No such file or directory")
    assert not (tmp_path / "root" / "x").exists()   # no mount point for a missing source
    result = run_in_mount_ns(tmp_path, {
        "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
        "mounts": {"t": {"scheme": "tmpfs", "dest": "/t", "mode": "size=bogus"}}})
    assert result["error"] == "volume t: cannot mount tmpfs on /t: Invalid argument"
    result = run_in_mount_ns(tmp_path, {
        "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
        "mounts": {"w": {"scheme": "weird", "dest": "/w"}}})
    assert result["error"] == "unsupported volume mount type for w: weird"


@pytest.mark.root
def test_nfs_errors_name_the_host_and_device(tmp_path):
    require_root("a private mount namespace")
    require_tool("unshare")
    result = run_in_mount_ns(tmp_path, {
        "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
        "mounts": {"n": {"scheme": "nfs", "host": "no-such-host.invalid", "path": "/exp",
                         "dest": "/n", "mode": REFERENCE_NFS_MODE}}})
    assert result["error"].startswith("volume n: cannot resolve NFS host no-such-host.invalid: ")
    # a resolvable host: the mount itself is tried with addr= the resolved address, and
    # whatever the kernel answers (no nfs here, or no server) is named with the device
    result = run_in_mount_ns(tmp_path, {
        "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
        "mounts": {"n": {"scheme": "nfs", "host": "127.0.0.1", "path": "/exp",
                         "dest": "/n", "mode": "ro,vers=3,proto=tcp,nolock,soft,timeo=10,retrans=1"}}})
    assert result["error"].startswith(
        "volume n: cannot mount 127.0.0.1:/exp on /n: 127.0.0.1: "), result


def _kernel_nfs_problem() -> tuple[str, str | None]:
    """(facility, reason) when the kernel lacks the NFS server or client, else ("", None)."""
    with open("/proc/filesystems") as f:
        names = {line.split()[-1] for line in f if line.strip()}
    if "nfsd" not in names:
        return "nfsd", "the kernel offers no NFS server: nfsd is not in /proc/filesystems"
    if "nfs" not in names:
        return "nfs", "the kernel offers no NFS client: nfs is not in /proc/filesystems"
    return "", None


NFSD_FS = "/proc/fs/nfsd"


def _nfsd_threads() -> int:
    """How many kernel nfsd threads run (0 when the nfsd filesystem is not mounted)."""
    try:
        with open(f"{NFSD_FS}/threads") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def kernel_nfs_server():
    """The kernel's NFS server, started for the test and stopped after it, unless it was
    already serving (then it is the machine's, and left alone)."""
    was_serving = _nfsd_threads() > 0
    was_mounted = os.path.ismount(NFSD_FS)
    if not was_serving:
        subprocess.run(["rpc.nfsd", "8"], check=True, timeout=60)
    try:
        yield
    finally:
        if not was_serving:
            subprocess.run(["rpc.nfsd", "0"], timeout=60)      # stops the kernel threads
            if not was_mounted and os.path.ismount(NFSD_FS):   # rpc.nfsd mounted it
                subprocess.run(["umount", NFSD_FS], timeout=60)


@pytest.mark.root
def test_nfs_against_a_real_kernel_server(tmp_path):
    facility, reason = _kernel_nfs_problem()
    if reason:
        missing(facility, reason)
    require_root("the kernel's NFS server")
    require_tool("exportfs", "rpc.nfsd")
    serving_before = _nfsd_threads() > 0
    export = tmp_path / "export"
    export.mkdir()
    (export / "hello").write_text("over nfs")
    subprocess.run(["exportfs", "-o", "rw,no_root_squash,insecure,fsid=77",
                    f"127.0.0.1:{export}"], check=True, timeout=60)
    try:
        with kernel_nfs_server():
            result = run_in_mount_ns(tmp_path, {
                "root": str(tmp_path / "root"), "staging": str(tmp_path / "staging"),
                "mounts": {"n": {"scheme": "nfs", "host": "localhost", "path": str(export),
                                 "dest": "/n", "mode": "rw,vers=4.2,proto=tcp"}},
                "read": ["n/hello"]})
        assert "error" not in result, result
        assert result["read"]["n/hello"] == "over nfs"
        assert serving_before or _nfsd_threads() == 0, "the test left nfsd running"
    finally:
        subprocess.run(["exportfs", "-u", f"127.0.0.1:{export}"], timeout=60)


# -- a container that swaps the mount point for a symlink while we mount (a reload) ---------
# The container's move at the worst time, before our first mount call: the mount point's
# directory goes aside and a symlink out of the root takes its name.
RACING_CHILD = RACE_AT_FIRST_MOUNT + textwrap.dedent("""
    import json, sys
    spec = json.load(open(sys.argv[1]))
    root, outside = spec["root"], spec["outside"]
    swap_at_first_mount(root, "data", outside)   # before tether.volumes takes the name
    from extraconfig.types import URL
    from tether.config import MountSpec
    from tether.volumes import mount_volumes, VolumeError
    m = spec["mount"]
    result = {"swapped": None}
    try:
        mount_volumes({"v": MountSpec(source=URL(scheme=m["scheme"], path=m.get("path", "")),
                                      path="/data", mode=m.get("mode", ""))},
                      root, staging_dir=spec["staging"])
    except VolumeError as exc:
        result["error"] = str(exc)
    result["swapped"] = bool(swapped)
    result["mounts"] = [(f[4], f[5].split(",")[0]) for f in
                        (line.split() for line in open("/proc/self/mountinfo"))]
    print(json.dumps(result))
""")


@pytest.mark.root
@pytest.mark.parametrize("mount", [
    {"scheme": "tmpfs", "mode": "size=1m"},
    {"scheme": "bind", "path": "SOURCE", "mode": "ro"},
], ids=["tmpfs", "bind-ro"])
def test_a_mount_point_swapped_for_a_symlink_mid_mount_stays_inside_the_root(tmp_path, mount):
    """On a reload the container runs: a symlink swapped in for the mount point between
    the agent's look and its mount must not take the mount out of the root."""
    root, outside, source = tmp_path / "root", tmp_path / "outside", tmp_path / "source"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    source.mkdir()
    mount = dict(mount, path=str(source)) if mount.get("path") else mount
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"root": str(root), "outside": str(outside),
                                     "staging": str(tmp_path / "staging"), "mount": mount}))
    result = run_in_mount_namespace(RACING_CHILD, str(spec_path))
    assert result["swapped"], "the swap did not run: the test tested nothing"
    assert "error" not in result, result
    targets = dict(result["mounts"])
    assert str(outside) not in targets, "the volume was mounted outside the container root"
    # it went onto the directory that was the mount point, wherever the container put it
    assert str(root / "data.old") in targets
    if mount.get("mode") == "ro":
        assert targets[str(root / "data.old")] == "ro"
    # no scratch mount is left behind
    assert not [t for t in targets if t.startswith(str(tmp_path / "staging"))]
