"""VM templates for `tether vm --template`: a snapshot of a guest that has booted and is
waiting for its config, restored instead of booting cold (Kata's VM templating and
Firecracker's snapshots do the same).

The first run with a given machine boots cold with the kernel argument
`tether.template=1`. The agent does every step that does not depend on the config, then
asks for `guestinfo.tether.resume`; the host does not answer yet: it live-migrates the
guest into the cache (QEMU `migrate` to a file), then answers and lets the guest go on.
Later runs of the same machine start QEMU with `-incoming` from that file: the guest
continues inside that same request, and the host answers it as soon as the state is
loaded. The answer sets the guest's wall clock and reseeds its RNG (docs/vm.md).

A template is keyed by everything the guest can see of its machine: the QEMU command
line (socket paths aside) and the identity of every file it names (kernel, initrd, disks,
firmware, the QEMU binary). Writable disks are not templated: the guest read their first
blocks while booting, and what it cached could be stale by the next run. Templates hold
no config and no secret (the snapshot is taken before the agent reads either).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time

from tether.resume import RESUME_KEY, TEMPLATE_ARG   # the guest's side

KERNEL_ARG = f"{TEMPLATE_ARG}=1"
KEEP = 4                        # templates kept per cache; the least recently used go
STATE = "state"                 # QEMU's migration stream
CAPTURE_TIMEOUT = 120.0
MIGRATION_ENDS = ("completed", "failed", "cancelled")


class TemplateError(RuntimeError):
    pass


def cache_root() -> str:
    """$TETHER_CACHE/vm-templates (init/build's cache: /var/cache/tether by default),
    or the user's cache directory where that is not writable."""
    base = os.environ.get("TETHER_CACHE", "/var/cache/tether")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        pass
    if not os.access(base, os.W_OK):
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                            os.path.expanduser("~/.cache"), "tether")
    return os.path.join(base, "vm-templates")


def unsuitable(spec) -> str | None:
    """Why this machine (a tether.vm.MachineSpec) cannot use a template, or None."""
    if not spec.kernel or spec.vic_serial:
        return "the ISO boot (--vic-serial) always boots cold"
    if any(arg.startswith(("tether.image=", "tether.shell=")) for arg in spec.kernel_args.split()):
        return "a debug boot (its shell reads guestinfo before the agent) always boots cold"
    for nic in spec.nics:
        if nic.mac_per_run:
            return (f"network {nic.network} is on a shared backend ({nic.backend}) with a MAC "
                    "of its own per run, and every clone would have the template's; give "
                    "its endpoint a MAC as ID, or use a user-mode network")
    for disk in spec.disks:
        if not (disk.readonly or disk.snapshot):
            return (f"{disk.path} is a writable disk: the guest caches its first blocks "
                    "while booting, so a template's view of it could be stale")
    return None


def file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def template_key(argv: list[str], files: list[str]) -> str:
    """The key of a machine: its QEMU command line (with placeholder socket paths) and
    the identity of each file it uses; any change to either is another template."""
    digest = hashlib.sha256()
    for word in argv:
        digest.update(word.encode() + b"\0")
    for path in sorted(set(files)):
        digest.update(file_identity(path).encode() + b"\0")
    return digest.hexdigest()[:24]


def resume_value(cold: bool = False) -> str:
    """The answer to the agent's resume request (tether/resume.py): the host's wall
    clock, 32 bytes for the guest's RNG (clones of one template would share its state
    otherwise) and, for the run that booted the guest, `cold=1`."""
    ns = time.time_ns()
    return (f"clock={ns // 10**9}.{ns % 10**9:09d} seed={os.urandom(32).hex()}"
            + (" cold=1" if cold else ""))


class Template:
    """One cached template: a directory holding QEMU's migration stream."""

    def __init__(self, root: str, key: str):
        self.root = root
        self.key = key
        self.directory = os.path.join(root, key)
        self.state = os.path.join(self.directory, STATE)

    def exists(self) -> bool:
        return os.path.isfile(self.state)

    def incoming_args(self) -> list[str]:
        """QEMU's arguments to start from the template instead of booting."""
        os.utime(self.directory)     # recently used: kept by `evict`
        return ["-incoming", f"exec:cat {shlex.quote(self.state)}"]

    def capture(self, qmp, argv: list[str], timeout: float = CAPTURE_TIMEOUT) -> int:
        """Save the running guest through `qmp(command, arguments)` (QEMU's monitor) and
        return the size of the state. The guest is left paused (QEMU's `postmigrate`):
        the caller continues it. Raises TemplateError."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        # unique per capture: two runs of one machine (even in one process) may save at once
        partial = f"{self.state}.{os.getpid()}.{os.urandom(4).hex()}.partial"
        qmp("migrate", {"uri": f"exec:cat > {shlex.quote(partial)}"})
        ended = wait_for_migration(lambda: qmp("query-migrate", None).get("status"),
                                   timeout, interval=0.01)
        if ended != "completed":
            _remove(partial)
            raise TemplateError(f"QEMU's migration to the template {ended or 'timed out'}")
        os.chmod(partial, 0o600)        # the guest's memory: the owner's alone
        os.replace(partial, self.state)
        with open(os.path.join(self.directory, "template.json"), "w") as f:
            json.dump({"created": time.time(), "argv": argv}, f, indent=1)
        evict(self.root, keep=KEEP, spare=self.key)
        return os.path.getsize(self.state)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_for_migration(status, timeout: float, interval: float,
                       running=lambda: True) -> str | None:
    """Poll `status()` (QMP query-migrate's status; None while it cannot be asked)
    until the migration ends, in either direction: its last status ("completed",
    "failed", "cancelled"), or None at the timeout or once `running()` is false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running():
        current = status()
        if current in MIGRATION_ENDS:
            return current
        time.sleep(interval)
    return None


def evict(root: str, keep: int = KEEP, spare: str = "") -> list[str]:
    """Remove all but the `keep` most recently used templates (never `spare`)."""
    try:
        names = [n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))]
    except OSError:
        return []
    names.sort(key=lambda n: os.stat(os.path.join(root, n)).st_mtime, reverse=True)
    removed = [n for n in names[keep:] if n != spare]
    for name in removed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return removed


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
