"""tether.system.mount_missing, run for real in a private mount namespace: what it
mounts, what it leaves, and how often it reads the mount table."""
from __future__ import annotations

import json

from helpers import require_tool, run_in_mount_namespace

CHILD = r"""
import json, os, subprocess, sys
from tether import system
spec = json.loads(sys.argv[1])
for path in spec["premounted"]:
    subprocess.run(["mount", "-t", "tmpfs", "pre", path], check=True)
if spec["unmount_proc"]:
    subprocess.run(["umount", "-l", "/proc"], check=True)
reads = 0
real = system.mounted_paths
def counted():
    global reads
    reads += 1
    return real()
system.mounted_paths = counted
specs = [tuple(s) for s in spec["specs"]]
done = system.mount_missing(specs)
system.mounted_paths = real
print(json.dumps({"done": done, "reads": reads, "now": sorted(real())}))
"""


def run_isolated(tmp_path, specs, unmount_proc=False, premounted=()):
    """mount_missing(specs) in a private mount namespace (its mounts end with it)."""
    require_tool("mount", "umount")
    spec = {"specs": specs, "unmount_proc": unmount_proc,
            "premounted": [str(p) for p in premounted]}
    return run_in_mount_namespace(CHILD, json.dumps(spec), timeout=60)


def tmpfs(path):
    return [str(path), "tmpfs", "t", 0, None]


def test_mounts_what_is_missing_and_reads_the_table_once(tmp_path):
    there, missing = tmp_path / "there", tmp_path / "missing"
    for path in (there, missing):
        path.mkdir()
    result = run_isolated(tmp_path, [tmpfs(there), tmpfs(missing), tmpfs(missing / "sub")],
                          premounted=[there])
    assert result["done"] == [str(missing), str(missing / "sub")]
    assert {str(there), str(missing), str(missing / "sub")} <= set(result["now"])
    assert result["reads"] == 1


def test_without_proc_the_table_is_read_again_once_proc_is_mounted(tmp_path):
    there = tmp_path / "there"
    there.mkdir()
    proc = ["/proc", "proc", "proc", 0, None]
    result = run_isolated(tmp_path, [proc, tmpfs(there)], unmount_proc=True, premounted=[there])
    # /proc came back, and the tmpfs already there was seen as mounted, not stacked again
    assert result["done"] == ["/proc"]
    assert "/proc" in result["now"] and str(there) in result["now"]
    assert result["reads"] == 2
