"""What tests share: the machine's facilities, the sandbox runner, config builders.

Missing facilities. A test that cannot run because this machine lacks a tool, root or a
kernel facility says so with `require_tool`, `require_root`, `require_namespaces` or
`missing(facility, reason)`. Locally that is a skip with the reason; under CI (`CI=true`)
or `make test-strict` the conftest turns it into a failure, except for the facilities in
`ALLOWED_MISSING`, which the test machines' kernel really lacks. `not_applicable` is for
a test that has no meaning on this kind of machine (not for anything missing). Any other
skip also fails under strict mode.

The sandbox: the real agent as PID 1 of new namespaces (`tether sandbox`).

    result = run_sandbox(config)                  # config: ExecutorConfig or JSON dict
    result.returncode, result.log, result.guestinfo, result.config.sessions[id].started

    with running_sandbox(config) as box:          # leaves it running
        box.wait_for_log(r"serving")
        box.signal(signal.SIGTERM)
        result = box.wait()

The `sandbox` fixture (tests/conftest.py) gives the same two as `sandbox.run(...)` /
`sandbox.start(...)` with a per-test directory, and tears down anything still running.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 120.0


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def sid() -> str:
    """A session/container ID shaped like VIC's (64 hex)."""
    return uuid.uuid4().hex + uuid.uuid4().hex


# -- missing facilities -----------------------------------------------------------------
# The only facilities a strict run may lack, each with the reason. Nothing else may skip.
ALLOWED_MISSING = {
    "vsock-loopback": "the test machines' kernel has neither vsock_loopback nor vhost-vsock, "
                      "and cannot load modules: a vsock listener on the host is unreachable",
    "nfsd": "the test machines' kernel has no NFS server (nfsd is not in /proc/filesystems) "
            "and cannot load modules",
}

# Where a tool comes from, for the message (scripts/install-deps installs them all).
TOOL_PACKAGES = {
    "tmux": "tmux", "vi": "vim-tiny", "ps": "procps", "ip": "iproute2",
    "dnsmasq": "dnsmasq-base", "unshare": "util-linux", "losetup": "util-linux",
    "mkfs.ext4": "e2fsprogs", "mke2fs": "e2fsprogs", "debugfs": "e2fsprogs",
    "exportfs": "nfs-kernel-server", "rpc.nfsd": "nfs-kernel-server",
    "qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap",
    "mksquashfs": "squashfs-tools", "unsquashfs": "squashfs-tools", "xorriso": "xorriso",
    "busybox": "busybox-static", "go": "golang-go",
}


def strict_mode() -> bool:
    """CI, or `make test-strict`: a missing facility fails instead of skipping."""
    return (os.environ.get("CI", "").lower() in ("1", "true", "yes")
            or os.environ.get("TETHER_TEST_STRICT", "") not in ("", "0"))


class MissingFacility(pytest.skip.Exception):
    """A skip because this machine lacks `facility` (a tool, root, a kernel feature)."""

    def __init__(self, facility: str, reason: str):
        super().__init__(reason)
        self.facility = facility


class NotApplicable(pytest.skip.Exception):
    """A skip because the test has no meaning on this kind of machine."""


def missing(facility: str, reason: str):
    """Skip (locally) or fail (strict mode) because `facility` is missing here."""
    raise MissingFacility(facility, reason)


def not_applicable(reason: str):
    raise NotApplicable(reason)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        missing("root", f"needs root ({why})")


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            package = TOOL_PACKAGES.get(name)
            where = f" (Debian package {package}; scripts/install-deps installs it)" \
                if package else ""
            missing(f"tool {name}", f"{name} is not installed{where}")


def require_module(name: str):
    """The imported module, or a missing-facility skip when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"python module {name}", f"the Python module {name} is not installed "
                f"({err}); make setup installs the test dependencies")


_NAMESPACE_PROBE: str | None = None


def namespaces_unavailable() -> str | None:
    """None if PID/mount/UTS/IPC namespaces can be created here, else the reason."""
    global _NAMESPACE_PROBE
    if _NAMESPACE_PROBE is None:
        if os.geteuid() != 0:
            _NAMESPACE_PROBE = "needs root (PID/mount/UTS/IPC namespaces)"
        else:
            probe = ("from tether import system; system.unshare(system.CLONE_NEWPID | "
                     "system.CLONE_NEWNS | system.CLONE_NEWUTS | system.CLONE_NEWIPC)")
            run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                 cwd=REPO, timeout=60)
            _NAMESPACE_PROBE = "" if run.returncode == 0 else (
                "cannot create namespaces here: " + run.stderr.strip().splitlines()[-1])
    return _NAMESPACE_PROBE or None


def require_namespaces() -> None:
    require_root("PID/mount/UTS/IPC namespaces")
    reason = namespaces_unavailable()
    if reason:
        missing("namespaces", reason)


# -- the VM image ------------------------------------------------------------------------
def build_image(out: Path = REPO / "build") -> Path:
    """Build (or refresh from the cache) the bootstrap image with init/build."""
    require_root("init/build: debootstrap, tap devices, network namespaces")
    require_tool("qemu-system-x86_64", "debootstrap", "mksquashfs", "xorriso", "mke2fs")
    proc = subprocess.run([str(REPO / "init" / "build"), "--out", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3000)
    assert proc.returncode == 0, \
        "init/build failed:\n" + proc.stdout.decode(errors="replace")[-4000:]
    assert (out / "bootstrap.iso").is_file()
    return out


# -- the sandbox -------------------------------------------------------------------------
class SandboxResult:
    def __init__(self, returncode: int, guestinfo: dict[str, str], log: str,
                 output_log: bytes | None):
        self.returncode = returncode
        self.guestinfo = guestinfo
        self.log = log
        self.output_log = output_log

    @property
    def config(self):
        """The final guestinfo decoded as the host would: an ExecutorConfig."""
        from extraconfig.codec import decode
        from extraconfig.transport import GuestSource, MapTransport
        from tether.config import ExecutorConfig
        return decode(GuestSource(MapTransport(dict(self.guestinfo))), ExecutorConfig)

    def session(self, session_id: str):
        return self.config.sessions[session_id]

    def __repr__(self) -> str:
        return f"SandboxResult(returncode={self.returncode}, log=...{self.log[-2000:]!r})"


def write_config(config, directory: str) -> str:
    """An ExecutorConfig goes in as VMX lines; a dict as the JSON form; a path (a `.vmx`
    file of keys as a host wrote them, or the JSON form) as it is."""
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    if isinstance(config, dict):
        path = os.path.join(directory, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        return path
    from extraconfig.codec import encode
    from extraconfig.transport import format_vmx
    path = os.path.join(directory, "config.vmx")
    with open(path, "w") as f:
        f.write(format_vmx(encode(config)))
    return path


class SandboxProcess:
    """A running `tether sandbox`; its log is collected in a file you can poll."""

    def __init__(self, config, *, rootfs=None, attach_socket=None, output_log=False,
                 extra_args=(), env=None, directory=None, stop_grace=5.0, pass_fds=()):
        self.dir = directory or tempfile.mkdtemp(prefix="tether-test-")
        self.config_path = write_config(config, self.dir)
        self.out_path = os.path.join(self.dir, "guestinfo.out")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.output_log_path = os.path.join(self.dir, "output.log") if output_log else None
        argv = [sys.executable, "-m", "tether", "sandbox", self.config_path,
                "--out", self.out_path, "--stop-grace", str(stop_grace)]
        if rootfs is not None:
            argv += ["--rootfs", str(rootfs)]
        if attach_socket is not None:
            argv += ["--attach-socket", str(attach_socket)]
        if self.output_log_path:
            argv += ["--output-log", self.output_log_path]
        argv += list(extra_args)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log_file,
                                     cwd=REPO, env=full_env, pass_fds=pass_fds)
        self.pid = self.proc.pid

    def agent_pid(self) -> int:
        """The host PID of the agent (PID 1 inside), the sandbox command's only child."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            (pid,) = f.read().split()
        return int(pid)

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = DEFAULT_TIMEOUT, count: int = 1):
        """Wait until `pattern` (a regex) appears `count` times in the log."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.findall(self.log_text())
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"sandbox exited ({self.proc.returncode}) before "
                                     f"{pattern!r} appeared; log:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the log after {timeout}s; "
                                     f"log:\n{self.log_text()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> SandboxResult:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"sandbox still running after {timeout}s; log:\n"
                                 f"{self.log_text()}") from None
        return self._result(code)

    def _result(self, code: int) -> SandboxResult:
        from extraconfig.transport import parse_vmx
        self._log_file.close()
        guestinfo = {}
        if os.path.exists(self.out_path):
            with open(self.out_path, encoding="utf-8", errors="surrogateescape") as f:
                guestinfo = parse_vmx(f.read())
        output = None
        if self.output_log_path and os.path.exists(self.output_log_path):
            with open(self.output_log_path, "rb") as f:
                output = f.read()
        return SandboxResult(code, guestinfo, self.log_text(), output)

    def kill(self) -> None:
        """SIGKILL the sandbox; its PID 1 dies with it (parent-death signal), and with
        PID 1 the whole namespace."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if not self._log_file.closed:
            self._log_file.close()


def run_sandbox(config, rootfs=None, attach_socket=None, timeout: float = DEFAULT_TIMEOUT,
                **kw) -> SandboxResult:
    """Run the agent in a sandbox to the end: exit code, final guestinfo, log text."""
    box = SandboxProcess(config, rootfs=rootfs, attach_socket=attach_socket, **kw)
    try:
        return box.wait(timeout)
    finally:
        box.kill()


@contextlib.contextmanager
def running_sandbox(config, rootfs=None, attach_socket=None, **kw):
    """The agent left running in a sandbox; killed on the way out if still alive."""
    box = SandboxProcess(config, rootfs=rootfs, attach_socket=attach_socket, **kw)
    try:
        yield box
    finally:
        box.kill()


class SandboxRunner:
    def __init__(self, directory: Path):
        self.directory = directory
        self._boxes: list[SandboxProcess] = []

    def _dir(self) -> str:
        path = self.directory / unique("box")
        path.mkdir()
        return str(path)

    def run(self, config, timeout: float = DEFAULT_TIMEOUT, **kw) -> SandboxResult:
        box = self.start(config, **kw)
        return box.wait(timeout)

    def start(self, config, **kw) -> SandboxProcess:
        box = SandboxProcess(config, directory=self._dir(), **kw)
        self._boxes.append(box)
        return box

    def close(self) -> None:
        for box in self._boxes:
            box.kill()


@contextlib.contextmanager
def socket_paths(prefix: str):
    """Yields make() -> a fresh unix socket path under /tmp (a test's tmp_path can be
    longer than sun_path allows); every path made is removed on the way out."""
    made: list[str] = []

    def make() -> str:
        path = f"/tmp/{prefix}-{unique()}.sock"
        made.append(path)
        return path
    try:
        yield make
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def connect_client(endpoint: str, box: SandboxProcess, *, wait: float = DEFAULT_TIMEOUT,
                   **connect_kw):
    """An attach Client (tether.attach.client) of the agent in `box`, once its server
    listens: retried for up to `wait` seconds, or until the sandbox exits.
    `connect_kw` goes to Client.connect (key, timeout)."""
    from tether.attach.client import Client
    deadline = time.monotonic() + wait
    while True:
        try:
            return Client.connect(endpoint, **connect_kw)
        except OSError:
            if time.monotonic() > deadline or box.proc.poll() is not None:
                raise
            time.sleep(0.1)


# -- a simulated hypervisor and small mounts ------------------------------------------------
@contextlib.contextmanager
def simulated_hypervisor(directory, guestinfo: dict[str, str] | None = None):
    """A simulated VMware hypervisor (extraconfig.backdoor.simulator) serving its backdoor
    on a unix socket in `directory`, for the agent's --backdoor-sim: yields (sim, path).
    Its guestinfo can be read while the agent runs."""
    from extraconfig.backdoor.simulator import SimulatedHypervisor
    sim = SimulatedHypervisor(guestinfo)
    path = str(Path(directory) / f"vmx-{uuid.uuid4().hex[:8]}.sock")
    server = sim.serve_unix(path)
    try:
        yield sim, path
    finally:
        server.close()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of `size` (mount's form: 256k, 32m) at `path`, made if needed: a disk that
    fills up. Lazily unmounted on the way out."""
    require_root(f"mounts a {size} tmpfs")
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tether-test", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_in_mount_namespace(script: str, *args: str, timeout: float = 180) -> dict:
    """`script` (Python source, `python -c`) run with `args` in a private mount namespace
    (`unshare --mount`), whose mounts end with it; the JSON it printed."""
    require_root("a private mount namespace")
    require_tool("unshare")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", script, *args], cwd=str(REPO), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# Source for a child process (python -c) that plays a container racing the agent: the
# first time the agent calls tether.system.mount, `name` in `root` is moved aside and a
# symlink to `outside` (a directory out of the root) takes its place. `swapped` says
# whether it ran. Install it before the module under test takes the name `mount`.
RACE_AT_FIRST_MOUNT = """
import os
import tether.system as system
swapped = []


def swap_at_first_mount(root, name, outside):
    real_mount = system.mount

    def racing_mount(*args, **kwargs):
        if not swapped:
            swapped.append(True)
            os.rename(os.path.join(root, name), os.path.join(root, name + ".old"))
            os.symlink(outside, os.path.join(root, name))
        return real_mount(*args, **kwargs)
    system.mount = racing_mount
"""


def mkfs_ext4(path: Path, label: str, size_mb: int = 8) -> None:
    """An ext4 filesystem labelled `label` in the file `path`."""
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], check=True,
                   capture_output=True, timeout=60)


@contextlib.contextmanager
def loop_disks(directory: Path):
    """make(populate_data_dir=False) -> label: a loop device with a labelled ext4 on it
    (its image in `directory`); every device made is detached on the way out."""
    require_root("loop devices and mounts")
    require_tool("unshare", "losetup", "mkfs.ext4")
    if not os.path.exists("/dev/loop-control"):
        missing("loop devices", "the kernel offers no loop devices (/dev/loop-control missing)")
    attached = []

    def make(populate_data_dir=False):
        import secrets
        label = "tv" + secrets.token_hex(5)
        image = directory / f"{label}.img"
        mkfs_ext4(image, label)
        if populate_data_dir:
            # the port layer's layout: data under /.vic.vol.data, lost+found beside it
            subprocess.run(["debugfs", "-w", "-R", "mkdir .vic.vol.data", str(image)],
                           check=True, capture_output=True, timeout=60)
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
        attached.append(dev)
        return label
    try:
        yield make
    finally:
        for dev in attached:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


# -- building configs ----------------------------------------------------------------------
def session_config(session_id: str, argv: list[str], *, env=None, path=None, **fields):
    """A SessionConfig running `argv` (path defaults to argv[0])."""
    from tether.config import Cmd, Common, SessionConfig
    cfg = SessionConfig(common=Common(id=session_id),
                        cmd=Cmd(path=path or argv[0], args=list(argv),
                                env=list(env) if env is not None
                                else ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]))
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def executor_config(primary=None, *others, executor_id: str | None = None, debug: int = 0):
    """An ExecutorConfig whose primary session is `primary` (its ID is the executor's)."""
    from tether.config import Common, Diagnostics, ExecutorConfig
    sessions = {}
    for s in (primary, *others):
        if s is not None:
            sessions[s.common.id] = s
    ident = executor_id or (primary.common.id if primary is not None else sid())
    return ExecutorConfig(common=Common(id=ident, name="test"),
                          diagnostics=Diagnostics(debug_level=debug), sessions=sessions)


@contextlib.contextmanager
def vic_socket_server(directory, buffer_option: int, buffer_size: int):
    """A real VicAttachServer on a real Loop in this process (a host with no sessions),
    listening on a unix socket in `directory`, and a client socket connected to it with
    one of its buffers (SO_SNDBUF or SO_RCVBUF) set to `buffer_size` first: yields
    (loop, server, client), all closed after."""
    import socket
    from types import SimpleNamespace

    from tether.attach.vic import server as vic_server
    from tether.loop import Loop
    loop = Loop()
    host = SimpleNamespace(loop=loop, key=None, root="/", sessions={}, primary=None)
    path = os.path.join(str(directory), "vic.sock")
    server = vic_server.VicAttachServer(host, [f"unix:{path}"])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, buffer_option, buffer_size)
        client.connect(path)
        yield loop, server, client
    finally:
        client.close()
        server.close(grace=0)
        loop.close()


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM), in KiB. Not getrusage's ru_maxrss: Linux
    keeps that across execve, so a child of a big process (pytest, after tests that held
    a lot) starts with its parent's peak (462 MiB read as the client's own, once)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")
