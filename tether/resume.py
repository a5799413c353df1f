"""VM templates, guest side: the wait point of a template boot and the host's answer.

With the kernel argument `tether.template=1` the agent, once every step that does not
depend on the config is done (signals, system, cgroups), loads the modules its later
steps would load (`PRELOAD`) and warms the config decoder, then asks the host for
`guestinfo.tether.resume` and waits for the answer without a time limit. The host saves
the VM (a live migration to a file) before it answers; a VM later restored from that
file continues inside the same request, and its host answers as soon as it runs
(tether/vmtemplate.py is the host's side). So everything done before the request is
paid once, in the template's run, for every restore.

The answer, space-separated `name=value` fields, each optional, unknown ones ignored:

    clock=<unix time: seconds, up to 9 decimals>   the wall clock to take
    seed=<64 hex digits>                            32 bytes for the kernel's RNG
    cold=1                                          this VM booted in this run (the one
                                                    that saved the template): its boot
                                                    timeline is its own, and kept

A restored guest's wall clock and RNG state are the template's: the agent sets the
clock, mixes the seed into the kernel's pool and makes the CRNG reseed (tether/system.py),
and reseeds Python's `random` if it is loaded. No answer (a host without templates, or
vSphere) or a malformed field is logged with what it means, and the boot goes on.

Imported only on a template boot: a plain boot neither loads this module nor asks.
"""
from __future__ import annotations

import sys

from extraconfig.scalars import ascii_digits
from tether import system
from tether.log import get_logger

log = get_logger("tether.resume")

RESUME_KEY = "guestinfo.tether.resume"
TEMPLATE_ARG = "tether.template"    # =1 on the kernel command line: a template's boot
SEED_BYTES = 32
MAX_CLOCK_DECIMALS = 9
# What a clone keeps of its template when a field is missing or malformed.
KEPT = {"clock": "the wall clock stays the template's",
        "seed": "the kernel's RNG state stays the template's, shared with its other clones"}

# What the steps after `config` load lazily, in the order they do, loaded at the wait
# point instead: in a restored VM they are in memory already. The network path and
# pyroute2 are the larger part (docs/agent.md, "Templates, guest side").
PRELOAD = (
    # config: decode, secrets, write-back
    "extraconfig.transport", "extraconfig.codec", "extraconfig.secret", "nacl.secret",
    "tether.config", "tether.extension", "tether.scrub", "tether.writeback",
    # rootfs, hostname, volumes
    "tether.rootfs", "tether.volumes", "tether.etcfiles",
    # networks: the manager, its links, NICs and DHCP (pyroute2), the firewall
    "tether.network", "tether.network.ports", "tether.network.link", "tether.network.nic",
    "tether.network.clientid", "tether.network.dhcp", "tether.network.firewall",
    "tether.network.nft", "pyroute2",
    # sessions: their launch, privileges, hooks, output log
    "tether.sessions", "tether.isolation", "tether.privileges", "tether.hooks",
    "tether.iolog", "_prctl", "fcntl", "termios",
    # the attach servers, started right after the launch
    "tether.attach.server", "tether.attach.vic.layout",
)


class Resume:
    """The host's answer, parsed: what to set, and what was wrong with it."""

    def __init__(self, clock_ns: int | None = None, seed: bytes | None = None,
                 problems: list[str] | None = None) -> None:
        self.clock_ns = clock_ns      # the wall clock, nanoseconds since the epoch
        self.seed = seed              # SEED_BYTES for the kernel's RNG
        self.problems = problems or []   # malformed fields, each with what it leaves undone
        self.seen: set[str] = set()      # the known fields the answer had, good or not
        self.cold = False                # booted in this run: not a clone (cold=1)

    def __repr__(self) -> str:
        return (f"Resume(clock_ns={self.clock_ns!r}, seed={self.seed!r}, cold={self.cold!r}, "
                f"problems={self.problems!r})")


def parse_resume(value: str) -> Resume:
    """The answer's fields; a malformed one is left out and named in `problems`."""
    resume = Resume()
    for word in value.split():
        name, sep, text = word.partition("=")
        if not sep:
            continue                      # not a field: ignored, like an unknown one
        if name == "clock":
            resume.seen.add(name)
            clock = parse_clock(text)
            if clock is None:
                resume.problems.append(
                    f"clock {text[:40]!r} is not seconds since the epoch (digits, up to "
                    f"{MAX_CLOCK_DECIMALS} decimals): {KEPT['clock']}")
            else:
                resume.clock_ns = clock
        elif name == "cold":
            resume.cold = text == "1"
        elif name == "seed":
            resume.seen.add(name)
            seed = parse_seed(text)
            if seed is None:
                # not echoed: a seed near the right form is most of a clone's RNG input
                resume.problems.append(f"the seed ({len(text)} characters) is not "
                                       f"{2 * SEED_BYTES} hex digits: {KEPT['seed']}")
            else:
                resume.seed = seed
    return resume


def parse_clock(text: str) -> int | None:
    """`seconds[.fraction]` (ASCII digits, at most 9 decimals) in nanoseconds, or None;
    None too past what the kernel's clock holds (2**63 ns, the year 2262)."""
    whole, dot, fraction = text.partition(".")
    if not ascii_digits(whole) or len(whole) > 19 or \
            (dot and not (ascii_digits(fraction) and len(fraction) <= MAX_CLOCK_DECIMALS)):
        return None
    ns = int(whole) * 1_000_000_000 + int(fraction.ljust(MAX_CLOCK_DECIMALS, "0"))
    return ns if ns < 1 << 63 else None


def parse_seed(text: str) -> bytes | None:
    """Exactly 2 * SEED_BYTES hex digits as bytes, or None."""
    if len(text) != 2 * SEED_BYTES or any(c not in "0123456789abcdefABCDEF" for c in text):
        return None
    return bytes.fromhex(text)


def preload(modules=PRELOAD) -> list[str]:
    """Import `modules` and compile the config decoder's plans (the decode of an empty
    config). Returns what could not be loaded, as `module: error`; never raises."""
    failed = []
    for name in modules:
        try:
            __import__(name)
        except Exception as err:   # noqa: BLE001 - the step that needs it will say so
            failed.append(f"{name}: {err}")
    try:
        from tether.extension import decode_config
        decode_config({})
    except Exception as err:   # noqa: BLE001
        failed.append(f"the config decoder: {err}")
    return failed


def ask(transport) -> str | None:
    """Ask for the resume answer and wait for it: over virtio-serial with no time limit
    (the host answers after saving the VM, which takes seconds); the other transports
    answer at once. None: no value."""
    virtio = sys.modules.get("extraconfig.virtio")
    if virtio is not None and isinstance(transport, virtio.VirtioSerialTransport):
        return transport.info_get(RESUME_KEY, timeout=None)
    return transport.info_get(RESUME_KEY)


def apply(resume: Resume) -> tuple[list[str], list[str]]:
    """Set the clock and reseed the RNGs from `resume`: (what was done, what failed),
    each as text for the log. Never raises."""
    done, failed = [], []
    if resume.clock_ns is not None:
        try:
            system.set_clock(resume.clock_ns)
            done.append(f"clock set to {iso_time(resume.clock_ns)}")
        except OSError as err:
            failed.append(f"the clock could not be set ({err}): it is the template's, "
                          "behind by the time since the template was saved")
    if resume.seed is not None:
        try:
            system.reseed_random(resume.seed)
            done.append("RNG reseeded")
        except OSError as err:
            failed.append(f"the kernel's RNG could not be reseeded ({err}): this VM may "
                          "produce the same random numbers as other clones of its template")
        random = sys.modules.get("random")
        if random is not None:     # seeded from the kernel when imported, in the template
            random.seed()
    return done, failed


def missing_fields(resume: Resume) -> list[str]:
    """The fields the answer left out, each with what the clone keeps, for a warning."""
    return [f"no {name}: {kept}" for name, kept in KEPT.items() if name not in resume.seen]


def iso_time(unix_ns: int) -> str:
    import time
    seconds, ns = divmod(unix_ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{ns // 1_000_000:03d}Z"
