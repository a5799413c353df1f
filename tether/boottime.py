"""The boot timeline, guest side: where a VM's boot went, on the kernel's boot clock.

Stage 0 (init/stage0/stage0.c) hands the agent the ends of its own steps in the
environment variable TETHER_BOOT_MARKS (`kernel=1.712345,modules=2.034567,...`); the
agent adds a mark at the end of each of its steps (`mark`), and once the primary session
has started it writes every phase back, once, as read-write guestinfo keys of a prefix
of our own (the reference decodes only the keys its config structs name, so it never
reads these):

    guestinfo.tether.boot.<phase> = "<start> <end>"   seconds on CLOCK_BOOTTIME
    guestinfo.tether.boot.clock   = "<now>"           the clock when they were written

Each phase starts where the one before it ended: `kernel` runs from the clock's zero to
stage 0's first instruction.

A VM restored from a template (docs/agent.md, "Templates, guest side") did its boot in
the template's run: `resumed(at)` drops every mark made so far, stage 0's with them, and
this run's timeline starts at `at`, the moment the host's resume answer came, with the
zero-length phase `resume` ("<at> <at>"); `config` then starts there.

The clock key goes last, so a host that notes when it arrives can place its own marks
on the guest's clock (`tether vm` does). Importing this module costs nothing on the boot
path: `time` and `os` are loaded already.
"""
from __future__ import annotations

import os
import time

PREFIX = "guestinfo.tether.boot."
CLOCK_KEY = PREFIX + "clock"
MARKS_ENV = "TETHER_BOOT_MARKS"

_marks: list[tuple[str, float]] = []    # (phase that ends here, boot clock), in order
_written = False
_origin: float | None = None    # where this run's timeline starts, once resumed (else: zero)
RESUME = "resume"


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def mark(phase: str) -> None:
    """The phase `phase` ends now (it began at the previous mark)."""
    _marks.append((phase, now()))


def resumed(at: float) -> None:
    """This run was restored from a VM template at `at` (boot clock): what was marked
    before (stage 0's marks too) belongs to the template's boot. The timeline starts
    again at `at`, with the zero-length phase `resume`."""
    global _origin
    _origin = at
    _marks[:] = [(RESUME, at)]


def stage0_marks(text: str | None = None) -> list[tuple[str, float]]:
    """Stage 0's marks from TETHER_BOOT_MARKS; `kernel` keeps its name, the rest get
    `stage0.` in front. Malformed entries are skipped."""
    text = os.environ.get(MARKS_ENV, "") if text is None else text
    marks = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            continue
        if sep and name:
            marks.append((name if name == "kernel" else f"stage0.{name}", seconds))
    return marks


def key_name(phase: str) -> str:
    """A phase name as it can stand in a read-write key: no whitespace, no `/`."""
    return "".join("_" if c.isspace() or c == "/" else c for c in phase)


def phases(marks: list[tuple[str, float]],
           origin: float = 0.0) -> list[tuple[str, float, float]]:
    """(name, start, end) for consecutive marks; the first phase starts at `origin`."""
    out, start = [], origin
    for name, end in marks:
        out.append((name, start, end))
        start = end
    return out


def timeline_keys(marks: list[tuple[str, float]], clock: float,
                  origin: float = 0.0) -> dict[str, str]:
    """The keys to write, in writing order; a repeated phase name keeps its first run."""
    keys: dict[str, str] = {}
    for name, start, end in phases(marks, origin):
        keys.setdefault(PREFIX + key_name(name), f"{start:.6f} {end:.6f}")
    keys[CLOCK_KEY] = f"{clock:.6f}"
    return keys


def booted_by_stage0() -> bool:
    """Only a VM booted by our stage 0 has a boot timeline worth writing back."""
    return MARKS_ENV in os.environ


def write_back(transport, log=None) -> bool:
    """Write the timeline through `transport.info_set`, once per boot. Failures are
    logged, never raised: the timeline must not disturb the sessions."""
    global _written
    if _written or not booted_by_stage0():
        return False
    _written = True
    origin = 0.0 if _origin is None else _origin
    marks = (stage0_marks() if _origin is None else []) + _marks
    try:
        for key, value in timeline_keys(marks, now(), origin).items():
            transport.info_set(key, value)
    except Exception as err:   # noqa: BLE001
        if log is not None:
            log.warning("boot timeline not written back: %s", err)
        return False
    if log is not None:
        log.info("boot timeline: %s", ", ".join(
            f"{name} {1000 * (end - start):.0f} ms" for name, start, end in
            phases(marks, origin)))
    return True
