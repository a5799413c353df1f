"""VM boot figures under QEMU TCG, against a floor: `python benchmarks/vm.py [--runs 5]`.

Boots examples/hello.json with `tether vm`'s code (VmRun) and, interleaved with it, the
floor: the same QEMU machine, kernel and command line with a minimal initramfs whose
/init is benchmarks/floor_init.c (built here with gcc -static). It loads the modules
that make the guestinfo port appear and writes the primary's `started` at once: no
agent can be faster. Printed, medians of RUNS rounds (and the range):

  start -> started=true         QEMU spawn until the host holds started=true (ours, floor)
  ratio                         ours / floor, per round, then its median
  ... --template                the same, started from a VM template (`tether vm
                                --template`; saved by one run before the rounds)
  QEMU start -> agent start     until the agent's first guestinfo request
  agent start -> started        from there until started=true
  total wall per VM             QEMU spawn until QEMU exited after the guest powered off
  the boot timeline's phases    what the agent wrote back (guestinfo.tether.boot.*)

`--compare-with DIR` also boots, interleaved, the tether of another checkout DIR (its own
code and its built image in DIR/build), e.g. a `git worktree` of main, to measure a
change against it under the same load. Builds the image first if it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOOR_MODULES = ("virtio_pci", "virtio_console")   # what makes the guestinfo port appear


# --------------------------------------------------------------------------- the floor

def read_cpio(data: bytes) -> dict[str, bytes]:
    """The regular files of a newc cpio archive (concatenated archives included)."""
    files, at = {}, 0
    while at + 110 <= len(data):
        if data[at:at + 6] != b"070701":
            at += 1             # padding between concatenated archives
            continue
        field = lambda i: int(data[at + 6 + 8 * i:at + 14 + 8 * i], 16)   # noqa: E731
        mode, size, name_size = field(1), field(6), field(11)
        name_at = at + 110
        name = data[name_at:name_at + name_size - 1].decode()
        body_at = (name_at + name_size + 3) & ~3
        if name == "TRAILER!!!":
            at = (body_at + 3) & ~3
            continue
        if mode & 0o170000 == 0o100000:
            files[name.lstrip("./")] = data[body_at:body_at + size]
        at = (body_at + size + 3) & ~3
    return files


def write_cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc archive of {path: (mode, content)}; directories are made for the paths."""
    entries, dirs = [], set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    items = [(d, 0o040755, b"") for d in sorted(dirs)] + \
        [(p, mode, body) for p, (mode, body) in sorted(files.items())]
    for ino, (name, mode, body) in enumerate(items + [("TRAILER!!!", 0, b"")], 1):
        raw = name.encode() + b"\0"
        head = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(raw), 0))
        entry = head.encode() + raw
        entry += b"\0" * (-len(entry) % 4) + body
        entries.append(entry + b"\0" * (-len(entry) % 4))
    return b"".join(entries)


def build_floor(image: Path, workdir: Path) -> Path:
    """The floor's initramfs: floor_init.c as /init, the image's own modules."""
    if shutil.which("gcc") is None:
        raise SystemExit("benchmarks/vm.py: the floor needs gcc (apt-get install gcc libc6-dev)")
    init = workdir / "floor-init"
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(init),
                    str(REPO / "benchmarks" / "floor_init.c")], check=True)
    stage0 = read_cpio((image / "initrd.img").read_bytes())
    order = []
    for line in stage0["stage0/modules"].decode().splitlines():
        name, *paths = line.split()
        if name in FLOOR_MODULES:
            order += [p for p in paths if p not in order]
    files = {"init": (0o100755, init.read_bytes()),
             "modules.load": (0o100644, "".join(f"/{p}\n" for p in order).encode())}
    files.update({p: (0o100644, stage0[p]) for p in order})
    floor = workdir / "floor.img"
    floor.write_bytes(write_cpio(files))
    return floor


# --------------------------------------------------------------------------- one boot

def boot(image: str, config_path: str, floor: Path | None = None,
         templates: str | None = None) -> dict[str, float]:
    """One VM (ours, or the floor's initramfs in the same machine; with `templates`,
    ours started from a VM template there): seconds from QEMU spawn, and the phases of
    the boot timeline."""
    from tether.bootchart import read_phases
    from tether.jsonform import load_config
    from tether.vm import VmRun, primary_started_key
    config = load_config(config_path)
    args = f"floor.started={primary_started_key(config)}" if floor else ""
    run = VmRun(config, image, kernel_args=args, template=templates is not None,
                template_root=templates)
    if floor:
        run.spec.initrd = str(floor)
    try:
        run.start()
        result = run.finish(300)
    finally:
        run.close()
    m = result.marks
    if "started" not in m or (result.exit_code != 0 and not floor):
        raise SystemExit(f"benchmark VM failed: {result.message}\n{result.console[-3000:]}")
    row = {"start -> started=true": m["started"] - m["qemu_start"],
           "total wall per VM": m.get("qemu_exit", m["started"]) - m["qemu_start"]}
    if templates is not None:
        row["template"] = result.template
    elif not floor:
        row["QEMU start -> agent start"] = m["agent_start"] - m["qemu_start"]
        row["agent start -> started"] = m["started"] - m["agent_start"]
        for phase in read_phases(result.guestinfo):
            if not phase.point:
                row[f"  {phase.label}"] = phase.end - phase.start
    return row


COMPARE_SCRIPT = """
import json, sys, time
sys.path.insert(0, {repo!r})
from tether.jsonform import load_config
from tether.vm import VmRun
run = VmRun(load_config({config!r}), {image!r})
try:
    run.start(); result = run.finish(300)
finally:
    run.close()
m = result.marks
print(json.dumps({{"start -> started=true": m["started"] - m["qemu_start"],
                  "total wall per VM": m["qemu_exit"] - m["qemu_start"],
                  "ok": result.exit_code == 0}}))
"""


def boot_other(repo: Path, config_path: str) -> dict[str, float]:
    """One boot with another checkout's code and image (its own process)."""
    script = COMPARE_SCRIPT.format(repo=str(repo), config=config_path, image=str(repo / "build"))
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                         text=True, timeout=600)
    try:
        row = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"the boot with {repo} failed:\n{out.stderr[-3000:]}")
    if not row.pop("ok"):
        raise SystemExit(f"the boot with {repo} failed")
    return row


# --------------------------------------------------------------------------- report

def median_line(name: str, values: list[float], unit: str = "s") -> str:
    return (f"  {name:<48} {statistics.median(values):7.3f} {unit}  "
            f"({min(values):.3f}-{max(values):.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(REPO / "build"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default=str(REPO / "examples" / "hello.json"))
    parser.add_argument("--compare-with", type=Path, metavar="DIR",
                        help="another checkout, booted with its own code and DIR/build")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.image, "initrd.img")):
        subprocess.run([str(REPO / "init" / "build"), "--out", args.image], check=True)
    if args.compare_with and not (args.compare_with / "build" / "bootstrap.iso").is_file():
        subprocess.run([str(args.compare_with / "init" / "build")], cwd=args.compare_with,
                       check=True)
    load_before = os.getloadavg()
    ours: dict[str, list[float]] = {}
    floors: list[float] = []
    others: list[float] = []
    ratios: list[float] = []
    other_ratios: list[float] = []
    restored: list[float] = []
    restored_ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tether-floor-") as tmp:
        floor = build_floor(Path(args.image), Path(tmp))
        templates = os.path.join(tmp, "vm-templates")
        saving = boot(args.image, args.config, templates=templates)   # saves the template
        print(f"template saved: the first run took {saving['start -> started=true']:.2f} s",
              file=sys.stderr)
        for i in range(args.runs):
            began = time.monotonic()
            floor_row = boot(args.image, args.config, floor)
            row = boot(args.image, args.config)
            from_template = boot(args.image, args.config, templates=templates)
            if from_template["template"] != "restored":
                raise SystemExit("the run with --template did not start from the template")
            for name, value in row.items():
                ours.setdefault(name, []).append(value)
            floors.append(floor_row["start -> started=true"])
            ratios.append(row["start -> started=true"] / floors[-1])
            restored.append(from_template["start -> started=true"])
            restored_ratios.append(restored[-1] / floors[-1])
            extra = ""
            if args.compare_with:
                others.append(boot_other(args.compare_with, args.config)["start -> started=true"])
                other_ratios.append(row["start -> started=true"] / others[-1])
                extra = f", {args.compare_with.name} {others[-1]:.2f} s"
            print(f"round {i + 1}/{args.runs}: ours {row['start -> started=true']:.2f} s, "
                  f"from the template {restored[-1]:.2f} s, floor "
                  f"{floors[-1]:.2f} s{extra} ({time.monotonic() - began:.0f} s, load "
                  f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    started = ours["start -> started=true"]
    print(f"VM boot under QEMU TCG, {os.path.relpath(args.config, REPO)}, median of {args.runs} "
          f"interleaved rounds (min-max); load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after:")
    print(median_line("start -> started=true, tether", started))
    print(median_line("start -> started=true, C-init floor", floors))
    print(median_line("ratio tether / floor (per round)", ratios, "x"))
    print(f"  {'ratio of the medians':<48} {statistics.median(started) / statistics.median(floors):7.3f} x")
    print(median_line("start -> started=true, tether vm --template", restored))
    print(median_line("ratio template / floor (per round)", restored_ratios, "x"))
    if others:
        print(median_line(f"start -> started=true, {args.compare_with.name}", others))
        print(median_line(f"ratio tether / {args.compare_with.name} (per round)", other_ratios, "x"))
        print(f"  {'ratio of the medians':<48} "
              f"{statistics.median(started) / statistics.median(others):7.3f} x")
    for name in ("QEMU start -> agent start", "agent start -> started", "total wall per VM"):
        print(median_line(name, ours[name]))
    print("where the time goes (the boot timeline the agent wrote back, medians):")
    for name, values in ours.items():
        if name.startswith("  "):
            print(median_line(name.strip(), [1000 * v for v in values], "ms"))
    print("sizes:")
    for name in ("vmlinux", "vmlinuz", "initrd.img", "initrd-debug.img", "root.ext4",
                 "bootstrap.iso", "root.sqfs", "tether.sqfs", "stage0.cpio.xz",
                 "containerfs.img"):
        path = Path(args.image) / name
        if path.exists():
            sparse = name.endswith((".img", ".ext4")) and not name.startswith("initrd")
            size = path.stat().st_blocks * 512 if sparse else path.stat().st_size
            print(f"  {name:<48} {size / 1048576:7.1f} MiB")
    manifest = Path(args.image) / "manifest.json"
    if manifest.exists():
        print(f"  kernel {json.loads(manifest.read_text())['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
