"""Generated /etc files: rendering line by line, and the bind mounts in a private mount namespace."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from helpers import RACE_AT_FIRST_MOUNT, require_root, run_in_mount_namespace
from tether.etcfiles import EtcFiles
from tether.rootfs import resolve_in_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGE_HOSTS = """\
# image comment
127.0.0.1\tlocalhost
10.9.9.9 oldname web.localhost
192.168.1.5 printer
"""


def test_hosts_blends_image_lines_and_ours():
    etc = EtcFiles("/nonexistent", "/nonexistent-state")
    etc.set_hostname("abcdef012345", ["mycontainer"])
    etc.set_network_host("web", "172.16.0.2")
    etc.set_network_host("db", "172.17.0.2")
    lines = etc.render_hosts(IMAGE_HOSTS.splitlines()).splitlines()
    assert lines == [
        "::1\tlocalhost ip6-localhost ip6-loopback",   # v6 localhost ensured, v4 was there
        "# image comment",
        "127.0.0.1\tlocalhost",
        "10.9.9.9 oldname",                            # our managed name removed from it
        "192.168.1.5 printer",
        "127.0.1.1\tabcdef012345 mycontainer",
        "172.16.0.2\tweb.localhost",
        "172.17.0.2\tdb.localhost",
    ]


def test_hosts_without_image_file():
    etc = EtcFiles("/nonexistent", "/nonexistent-state")
    etc.set_hostname("h1")
    etc.set_network_host("net", None)     # no address yet: no entry
    assert etc.render_hosts([]).splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "127.0.1.1\th1",
    ]


def test_resolv_static_beats_dhcp_and_gateway_fallback():
    etc = EtcFiles("/x", "/y")
    assert etc.render_resolv() is None         # no network: the image's file stays
    etc.set_nameservers("a", [], [], "10.0.0.1")
    assert etc.render_resolv().splitlines() == [
        "nameserver 10.0.0.1", "options timeout:15", "options attempts:5"]
    etc.set_nameservers("b", [], ["10.1.0.53", "10.1.0.54"], "10.1.0.1")
    etc.set_nameservers("c", ["8.8.8.8"], ["10.2.0.53"], "10.2.0.1")
    assert etc.render_resolv().splitlines() == [
        "nameserver 8.8.8.8", "nameserver 10.1.0.53", "nameserver 10.1.0.54",
        "options timeout:15", "options attempts:5"]


def test_resolv_stale_dhcp_servers_removed_on_renewal():
    etc = EtcFiles("/x", "/y")
    etc.set_nameservers("a", [], ["10.1.0.53"], "10.1.0.1")
    etc.set_nameservers("a", [], ["10.1.0.99"], "10.1.0.1")
    assert "10.1.0.53" not in etc.render_resolv()
    assert etc.render_resolv().splitlines()[0] == "nameserver 10.1.0.99"


def testresolve_in_root_keeps_absolute_links_inside(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "run" / "resolve").mkdir(parents=True)
    os.symlink("/run/resolve/stub.conf", tmp_path / "etc" / "resolv.conf")
    os.symlink("../../..", tmp_path / "run" / "resolve" / "up")
    assert resolve_in_root(str(tmp_path), "/etc/resolv.conf") == str(
        tmp_path / "run" / "resolve" / "stub.conf")
    assert resolve_in_root(str(tmp_path), "/run/resolve/up/etc") == str(tmp_path / "etc")


SCRIPT = textwrap.dedent("""
    import json, os, sys
    from tether.etcfiles import EtcFiles
    root, state = sys.argv[1], sys.argv[2]
    etc = EtcFiles(root, state)
    etc.set_hostname("abcdef012345", ["box"])
    etc.set_network_host("bridge", "172.16.0.2")
    etc.set_nameservers("bridge", [], ["10.0.0.53"], "172.16.0.1")
    etc.flush()
    read = lambda n: open(os.path.join(root, "etc", n)).read()
    first = {n: read(n) for n in ("hostname", "hosts", "resolv.conf")}
    etc.set_nameservers("bridge", [], ["10.0.0.54"], "172.16.0.1")
    etc.flush()
    etc.flush()   # unchanged: no new mount
    mounts = [l.split()[4] for l in open("/proc/self/mountinfo")]
    print(json.dumps({"first": first, "resolv2": read("resolv.conf"), "hosts2": read("hosts"),
                      "mounts": [m for m in mounts if m.startswith(root)]}))
""")


@pytest.mark.root
def test_flush_binds_generated_files_and_leaves_image_untouched(tmp_path):
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text(IMAGE_HOSTS)
    (root / "etc" / "hostname").write_text("imagehost\n")
    # no resolv.conf in the image: the mount target is created
    got = run_in_mount_namespace(SCRIPT, str(root), str(state), timeout=120)
    assert got["first"]["hostname"] == "abcdef012345\n"
    assert "127.0.1.1\tabcdef012345 box" in got["first"]["hosts"].splitlines()
    assert "192.168.1.5 printer" in got["first"]["hosts"].splitlines()
    assert "172.16.0.2\tbridge.localhost" in got["first"]["hosts"].splitlines()
    assert got["first"]["resolv.conf"].splitlines()[0] == "nameserver 10.0.0.53"
    assert got["resolv2"].splitlines() == [
        "nameserver 10.0.0.54", "options timeout:15", "options attempts:5"]
    assert got["hosts2"] == got["first"]["hosts"]
    # hostname, hosts, resolv.conf: the change to resolv.conf left one mount of it
    assert sorted(got["mounts"]) == sorted(
        [str(root / "etc" / n) for n in ("hostname", "hosts", "resolv.conf")])
    # outside the namespace the image's files are as they were
    assert (root / "etc" / "hosts").read_text() == IMAGE_HOSTS
    assert (root / "etc" / "hostname").read_text() == "imagehost\n"
    assert (root / "etc" / "resolv.conf").read_text() == ""
    assert (state / "resolv.conf").read_text() == got["resolv2"]


CHURN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from tether.etcfiles import EtcFiles
    root, state = sys.argv[1], sys.argv[2]
    etc = EtcFiles(root, state)
    etc.set_hostname("abcdef012345")
    wrong = []
    for i in range(300):
        etc.set_nameservers("n", [], [f"10.0.{i % 2}.53"], None)
        etc.set_network_host("n", f"10.0.{i % 3}.2")
        etc.flush()
        resolv = open(os.path.join(root, "etc", "resolv.conf")).read()
        hosts = open(os.path.join(root, "etc", "hosts")).read()
        if resolv.splitlines()[0] != f"nameserver 10.0.{i % 2}.53" or \\
                f"10.0.{i % 3}.2\\tn.localhost" not in hosts.splitlines():
            wrong.append(i)
    mounts = [l.split()[4] for l in open("/proc/self/mountinfo")]
    print(json.dumps({"wrong": wrong, "mounts": [m for m in mounts if m.startswith(root)],
                      "state": sorted(os.listdir(state))}))
""")


@pytest.mark.root
def test_a_dhcp_server_changing_everything_at_every_renewal_does_not_stack_mounts(tmp_path):
    """Each change used to stack one more bind mount and keep one more state file, for
    as long as the server kept changing its answers (mount-max is 100000, then the
    container's own mounts fail too). Now each file keeps one mount of ours."""
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "etc").mkdir(parents=True)
    got = run_in_mount_namespace(CHURN_SCRIPT, str(root), str(state), timeout=120)
    assert got["wrong"] == []
    assert sorted(got["mounts"]) == sorted(
        str(root / "etc" / n) for n in ("hostname", "hosts", "resolv.conf"))
    assert len(got["state"]) == 6, got["state"]     # each file's mounted one and latest copy


# -- a hostile image's /etc/hosts, and a container racing the bind ---------------------------
SEED_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    # an endless file must fail this child, not eat the test machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from tether.etcfiles import EtcFiles
    etc = EtcFiles(sys.argv[1], sys.argv[2])
    etc.set_hostname("abcdef012345")
    print(json.dumps(etc.render_hosts(etc._read_seed_hosts())))
""")


@pytest.mark.parametrize("kind", ["fifo", "zero", "huge"])
def test_a_hosts_file_that_never_ends_is_not_read(tmp_path, kind):
    """The image's /etc/hosts is read by PID 1 before anything runs: a named pipe (no
    writer: the read waits for ever), a link to an endless device or a huge file must
    not hang or exhaust the agent; only a regular file of sane size is blended in."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    hosts = root / "etc" / "hosts"
    if kind == "fifo":
        os.mkfifo(hosts)
    elif kind == "zero":
        require_root("a device node in the test root")
        (root / "dev").mkdir()
        os.mknod(root / "dev" / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        os.symlink("/dev/zero", hosts)
    else:
        with open(hosts, "wb") as f:   # sparse: 4 GiB of NULs, no newline
            f.truncate(4 << 30)
    try:
        out = subprocess.run([sys.executable, "-c", SEED_SCRIPT, str(root), str(tmp_path / "s")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a {kind} as the image's /etc/hosts never ended")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout).splitlines() == [
        "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
        "127.0.1.1\tabcdef012345"]


# The container's move at the worst time (a DHCP renewal rewrites resolv.conf while it
# runs): /etc goes aside and a symlink out of the root takes its name.
RACE_SCRIPT = RACE_AT_FIRST_MOUNT + textwrap.dedent("""
    import json, sys
    root, outside, state = sys.argv[1], sys.argv[2], sys.argv[3]
    swap_at_first_mount(root, "etc", outside)   # before tether.etcfiles takes the name
    from tether.etcfiles import EtcFiles
    etc = EtcFiles(root, state)
    etc.set_hostname("abcdef012345")
    error = None
    try:
        etc.flush()
    except Exception as exc:
        error = str(exc)
    print(json.dumps({"swapped": bool(swapped), "error": error,
                      "mounts": [l.split()[4] for l in open("/proc/self/mountinfo")]}))
""")


@pytest.mark.root
def test_a_symlink_swapped_in_for_etc_mid_flush_keeps_the_bind_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    outside.mkdir()
    for name in ("hostname", "hosts", "resolv.conf"):
        (root / "etc" / name).write_text("image\n")
        (outside / name).write_text("not the container's\n")
    got = run_in_mount_namespace(RACE_SCRIPT, str(root), str(outside), str(tmp_path / "state"),
                                 timeout=120)
    assert got["swapped"], "the swap did not run: the test tested nothing"
    assert got["error"] is None
    assert not [m for m in got["mounts"] if m.startswith(str(outside))], \
        "a generated /etc file was bound outside the container root"
    assert str(root / "etc.old" / "hostname") in got["mounts"]


# -- names from the config that would write lines of their own ---------------------------------
@pytest.mark.parametrize("bad", ["web\n6.6.6.6 bank.example", "web\r6.6.6.6", "web 6.6.6.6",
                                 "web\t6.6.6.6", "web#x", "web\x00", "web\x0b6.6.6.6"])
def test_names_that_would_add_lines_to_the_files_are_left_out(bad):
    """The network name, the container name (an alias) and the executor ID (the
    hostname) come from the config: a newline in one wrote a line of its own into
    /etc/hosts (a name for any address) and /etc/hostname."""
    etc = EtcFiles("/nonexistent", "/nonexistent")
    etc.set_hostname("abcdef012345", [bad, "box"])
    etc.set_network_host(bad, "10.0.0.2")
    etc.set_network_host("db", "10.0.0.3")
    assert etc.render_hosts([]).splitlines() == [
        "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
        "127.0.1.1\tabcdef012345 box", "10.0.0.3\tdb.localhost"]
    etc.set_hostname(bad)
    assert etc.render_hostname() is None            # the image's file stays
    assert "6.6.6.6" not in etc.render_hosts([])
