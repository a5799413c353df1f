"""A session: its life as one state machine, launching its process, fanning out its output.

A session is in exactly one `Phase`; `TRANSITIONS` (in the style of h11's tables) says
which event moves it where, and nothing else changes it. `running`, `blocked`,
`finishing`, the `list` reply's state and the port layer's ProcessRunState are all read
from the phase.

A session runs in its own session and process group (setsid; a tty session also gets
its pty as controlling tty), chrooted into the container root, as the configured user,
with exactly the configured environment and only fds 0-2 open. The child resolves the
path itself, after chroot and chdir, so container symlinks resolve inside the container;
any failure before exec comes back over a close-on-exec pipe as an errno and the
`started` text: 126 or 127 as the agent's exit code come from that errno (EACCES,
ENOENT), as in tini, never from the text.

Output is read non-blocking on the loop and goes, for every session, to the output log
(iolog framing), the replay ring (last 64 KiB) and attach listeners. Its pipes hold 4 MiB
(F_SETPIPE_SZ; 1 MiB where the agent may not go past the system's maximum). A process
that streams (a wake-up found COALESCE_AT bytes or more) is read again only after
COALESCE_DELAY, so a wake-up moves much, not a few KiB. When one attach client on a
socket is the only consumer (no output log, no echo, no other listener), a burst goes to
that client by splice(2), the agent never touching the bytes; its last 64 KiB are
duplicated by tee(2) into a pipe of the ring's on their way, and read from there only
when a replay asks, so the ring stays the output's last 64 KiB.
"""
from __future__ import annotations

import errno
import os
import time
from _collections import deque   # collections' deque, without importing collections (startup)
from _collections_abc import Callable   # collections.abc's, already loaded by os

from tether import signals
from tether.symbols import Symbols
from tether.console import SECRETS_DEBUG_LEVEL
from tether.log import WARNING, get_logger
from tether.reaper import describe_status

log = get_logger("tether.sessions")

REPLAY_LIMIT = 64 << 10
STDIN_LIMIT = 4 << 20       # input held for a process that does not read: then dropped
STDIN_HIGH = 1 << 20        # over this, writers stop taking input (`write_stdin` says so)
STDIN_LOW = 256 << 10       # ... until it is down to this (`when_stdin_drained`)
READ_CHUNK = 256 << 10
PIPE_SIZES = (4 << 20, 1 << 20)   # output pipes (F_SETPIPE_SZ): the first the kernel allows
TAIL_PIPE_SIZES = (1 << 20, 256 << 10)   # the ring's tail pipe: room for many tails
READ_BUDGET = 4 << 20       # bytes read per wake-up, at most (the loop has other work)
SPLICE_MIN = 128 << 10      # a burst this big is spliced to a lone client (smaller: read)
COALESCE_AT = 16 << 10      # a wake-up that moved this much from a pipe: the process streams,
COALESCE_DELAY = 0.0005     # so its pipe fills this long (seconds) before the next read
COALESCE_MIN, COALESCE_MAX = 0.00005, 0.002   # (adapted per session within these)
EXIT_OUTPUT_GRACE = 2.0     # seconds to wait for output after the process exited
MAX_EXIT_LOGS = 5
EOT = b"\x04"

# The signals our own handlers use: reset to default in the child before exec.
_AGENT_SIGNALS = ("SIGCHLD", "SIGHUP", "SIGTERM", "SIGINT", "SIGPWR", "SIGUSR1", "SIGUSR2",
                  "SIGPIPE", "SIGXFSZ", "SIGQUIT")


class LaunchError(Exception):
    """A session could not start; the text goes into `started`, the errno (0 when there is
    none) decides the exit code (`launch_failure_code`)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.errno = code


def launch_failure_code(code: int) -> int:
    """The shell's convention, as tini and docker use it: 126 when the command was found
    but may not be executed (EACCES), 127 when it was not found (ENOENT) or the launch
    failed before it was looked for."""
    return 126 if code == errno.EACCES else 127


# -- the state machine ------------------------------------------------------------------------
class Phase(Symbols):
    CREATED = "created"        # configured, not launched (or its RunBlock wait cancelled)
    BLOCKED = "blocked"        # RunBlock: waits for an attach to release it
    RUNNING = "running"
    FINISHING = "finishing"    # the process exited; its last output is being collected
    EXITED = "exited"          # the exit is recorded; a restart may launch it again
    FAILED = "failed"          # the launch failed: `started` says why, `launch_errno` the errno


class Event(Symbols):
    BLOCK = "block"                    # asked to launch, but RunBlock holds it
    CANCEL = "cancel"                  # the agent stops: a blocked session will not launch
    LAUNCHED = "launched"
    LAUNCH_FAILED = "launch failed"
    PROCESS_EXITED = "process exited"  # the reaper has its wait status
    OUTPUT_DONE = "output done"        # its pipes are drained: the exit is recorded


TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.CREATED: {Event.BLOCK: Phase.BLOCKED, Event.LAUNCHED: Phase.RUNNING,
                    Event.LAUNCH_FAILED: Phase.FAILED},
    Phase.BLOCKED: {Event.LAUNCHED: Phase.RUNNING, Event.LAUNCH_FAILED: Phase.FAILED,
                    Event.CANCEL: Phase.CREATED},
    Phase.RUNNING: {Event.PROCESS_EXITED: Phase.FINISHING},
    Phase.FINISHING: {Event.OUTPUT_DONE: Phase.EXITED},
    Phase.EXITED: {Event.LAUNCHED: Phase.RUNNING, Event.LAUNCH_FAILED: Phase.FAILED},
    Phase.FAILED: {Event.LAUNCHED: Phase.RUNNING, Event.LAUNCH_FAILED: Phase.FAILED},
}
LAUNCHABLE = frozenset(p for p, moves in TRANSITIONS.items() if Event.LAUNCHED in moves)


class SessionStateError(RuntimeError):
    """An event the session's phase does not allow: a bug in the caller."""


# -- signals ------------------------------------------------------------------------------
def parse_signal(spec: str, default: int = signals.SIGTERM) -> int:
    """'TERM', 'SIGTERM', 'term' or '15' -> 15; '' -> default. ValueError otherwise."""
    spec = (spec or "").strip()
    if not spec:
        return default
    if spec.isdigit():
        num = int(spec)
        if 0 < num < signals.NSIG:
            return num
        raise ValueError(f"unknown signal {spec!r}")
    name = spec.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signals.NUMBERS[name]
    except KeyError:
        raise ValueError(f"unknown signal {spec!r}") from None


# -- users and groups, from the container's files ----------------------------------------
class Credentials:
    __slots__ = ("uid", "gid", "groups", "home")

    def __init__(self, uid: int, gid: int, groups: list[int], home: str):
        self.uid, self.gid, self.groups, self.home = uid, gid, groups, home


# /etc/passwd and /etc/group are the image's: read inside its root (a symlink there to
# /etc/shadow must not read the agent's), only as regular files (a FIFO would hang PID 1,
# /dev/zero never ends) and only so much of them. Without a container root ("/": a VM
# with no container disk, a plain process) they are the agent's own, read as they are.
USER_DB_LIMIT = 4 << 20


def _read_db(root: str, name: str) -> list[list[str]]:
    path = f"/etc/{name}"
    if root in ("", "/"):   # no container root: the agent's own files (tether.rootfs and
        try:                # its openat2 stay off a plain agent's way to its primary)
            with open(path, "rb") as f:
                data = f.read(USER_DB_LIMIT + 1)
        except FileNotFoundError:
            data = None
    else:
        from tether.rootfs import read_file_in_root
        data = read_file_in_root(root, path, USER_DB_LIMIT + 1)
    if data is None:
        return []   # missing, or not a regular file: as the reference, no entries
    if len(data) > USER_DB_LIMIT:
        raise LaunchError(f"{os.path.join(root, path[1:])} is larger than the "
                          f"{USER_DB_LIMIT} bytes the agent reads of it")
    return [line.split(":") for line in data.decode(errors="replace").split("\n")
            if line.strip() and not line.startswith("#")]


def _parse_id(text: str, what: str) -> int:
    value = int(text)
    if not 0 <= value <= 2**31 - 1:
        raise LaunchError(f"{what} {text} is out of range 0..2147483647")
    return value


def resolve_credentials(root: str, user: str, group: str) -> Credentials:
    """User and group by name or number from `root`/etc/passwd and /etc/group.
    Raises LaunchError; it never falls back to root for a user that is not found."""
    if ":" in user and not group:
        user, group = user.split(":", 1)
    passwd = [e for e in _read_db(root, "passwd") if len(e) >= 7]
    groups_db = [e for e in _read_db(root, "group") if len(e) >= 3]
    user = user or "0"
    entry = None
    if user.isdigit():
        uid = _parse_id(user, "user")
        entry = next((e for e in passwd if e[2] == user), None)
    else:
        entry = next((e for e in passwd if e[0] == user), None)
        if entry is None:
            raise LaunchError(f"unable to find user {user}: no matching entries in passwd "
                              f"file {os.path.join(root, 'etc/passwd')}")
        uid = _parse_id(entry[2], "user")
    gid = _parse_id(entry[3], "group") if entry else 0
    home = entry[5] if entry and entry[5] else "/"
    if group:
        if group.isdigit():
            gid = _parse_id(group, "group")
        else:
            match = next((e for e in groups_db if e[0] == group), None)
            if match is None:
                raise LaunchError(f"unable to find group {group}: no matching entries in group "
                                  f"file {os.path.join(root, 'etc/group')}")
            gid = _parse_id(match[2], "group")
    # a dict: in order, and no scan of a list per entry (an image's group file of 200k
    # lines held PID 1 for minutes)
    supplementary = {gid: None}
    name = entry[0] if entry else None
    if name is not None:
        for e in groups_db:
            members = e[3].split(",") if len(e) > 3 and e[3] else []
            if name in members and e[2].isdigit():
                supplementary[int(e[2])] = None
    most = _ngroups_max()
    if len(supplementary) > most:
        raise LaunchError(f"user {name} is in {len(supplementary)} groups in "
                          f"{os.path.join(root, 'etc/group')}; the kernel allows {most}")
    return Credentials(uid, gid, list(supplementary), home)


def _ngroups_max() -> int:
    try:
        with open("/proc/sys/kernel/ngroups_max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65536   # NGROUPS_MAX


# -- output fan-out -------------------------------------------------------------------------
class OutputFanout:
    """Every byte a session writes: to the output log, the replay ring and listeners.

    The ring's oldest entry may be bytes still in a pipe of ours (`keep_tail`): the tail
    of a burst spliced to a client, duplicated there by tee(2) rather than read. Those
    are read only when someone asks for the replay; until then a later tail just makes
    them obsolete, and obsolete bytes are drained from the pipe now and then."""

    def __init__(self, session_id: str, log_port=None, primary: bool = True,
                 echo: Callable[[bytes], object] | None = None):
        self.session_id = session_id
        self._listeners: list = []
        self._ring: deque[tuple[str, bytes | None]] = deque()   # None: in the tail pipe
        self._ring_size = 0
        self._tail_pipe: tuple[int, int] | None = None   # (read end, write end)
        self._tail_room = 0       # its buffer size
        self._tail_fill = 0       # bytes in it: obsolete ones, then the live ones
        self._tail_live = 0       # the last bytes in it: the ring's entry of None
        self._log_port = log_port
        self._echo = echo
        self._framers = {}
        if log_port is not None:   # the output log's framing, loaded only for one
            from tether.iolog import STDERR, STDOUT, LineFramer
            tag = None if primary else session_id
            self._framers = {"stdout": LineFramer(STDOUT, tag),
                             "stderr": LineFramer(STDERR, tag)}
        self.closed = False

    def subscribe(self, listener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def splice_target(self):
        """The listener that may take this output straight from the pipe: the only
        consumer there is (no output log, no echo, one listener), when it can."""
        if self._log_port is not None or self._echo is not None or len(self._listeners) != 1:
            return None
        listener = self._listeners[0]
        can = getattr(listener, "can_splice", None)
        return listener if can is not None and can() else None

    def replay(self) -> list[tuple[str, bytes]]:
        """The remembered output, oldest first, one entry a run of one stream: a process
        writing a byte at a time would otherwise replay as that many frames."""
        self._read_tail()
        runs: list[tuple[str, list[bytes]]] = []
        for stream, data in self._ring:
            if runs and runs[-1][0] == stream:
                runs[-1][1].append(data)
            else:
                runs.append((stream, [data]))
        return [(stream, parts[0] if len(parts) == 1 else b"".join(parts))
                for stream, parts in runs]

    def keep_tail(self, stream: str, fd: int, count: int) -> bool:
        """The output's last `count` (>= REPLAY_LIMIT) bytes wait at the front of the pipe
        `fd`, about to be spliced to a listener: they become the whole ring, duplicated
        into our tail pipe by tee(2), not read. False when that cannot be done (then the
        caller reads them and gives them to `remember`)."""
        if count < REPLAY_LIMIT or self.closed:
            return False
        if self._tail_pipe is None:
            try:
                self._tail_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return False
            self._tail_room = _widen_pipe(self._tail_pipe[0], TAIL_PIPE_SIZES)
        # Kept or read, these bytes are the whole ring: what is in it is obsolete.
        self._ring.clear()
        self._ring_size = self._tail_live = 0
        if self._tail_fill + 2 * count > self._tail_room:
            _discard(self._tail_pipe[0], self._tail_fill)
            self._tail_fill = 0
        from tether.system import tee   # its C extension: loaded by the first spliced output
        try:
            kept = tee(fd, self._tail_pipe[1], count)
        except OSError:
            kept = 0
        if kept != count:   # no room after all (the user's pipe quota): read them instead
            self._read_tail(junk=kept)
            return False
        self._tail_fill += count
        self._tail_live = count
        self._ring.append((stream, None))
        self._ring_size = count
        self._trim()
        return True

    def remember(self, stream: str, data: bytes) -> None:
        """Bytes that went to a listener by splice after all: into the ring only."""
        self._read_tail()
        self._ring.append((stream, data))
        self._ring_size += len(data)
        self._trim()

    def _trim(self) -> None:
        while self._ring_size > REPLAY_LIMIT:
            first_stream, first = self._ring[0]
            extra = self._ring_size - REPLAY_LIMIT
            size = self._tail_live if first is None else len(first)
            if size <= extra:
                self._ring.popleft()
                self._ring_size -= size
                if first is None:
                    self._tail_live = 0
            else:
                if first is None:
                    self._tail_live -= extra
                else:
                    self._ring[0] = (first_stream, first[extra:])
                self._ring_size -= extra

    def _read_tail(self, junk: int = 0) -> None:
        """The ring's entry in the tail pipe as bytes; the pipe left empty (`junk`: bytes
        after the live ones, from a tee that came up short)."""
        if self._tail_pipe is None:
            return
        fd = self._tail_pipe[0]
        live, self._tail_live = self._tail_live, 0
        _discard(fd, self._tail_fill - live)
        data = _read_exactly(fd, live) if live else b""
        _discard(fd, junk)
        self._tail_fill = 0
        if self._ring and self._ring[0][1] is None:
            self._ring[0] = (self._ring[0][0], data)

    def publish(self, stream: str, data: bytes) -> None:
        if self._tail_live:
            self._read_tail()
        self._ring.append((stream, data))
        self._ring_size += len(data)
        self._trim()
        if self._log_port is not None:
            self._log_port.write(self._framers[stream].feed(data))
        if self._echo is not None:
            self._echo(data)
        for listener in list(self._listeners):
            try:
                listener.on_output(stream, data)
            except Exception:
                log.exception("output listener %r failed; dropping it", listener)
                self.unsubscribe(listener)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._tail_pipe is not None:   # the ring outlives the run: as bytes
            self._read_tail()
            for fd in self._tail_pipe:
                os.close(fd)
            self._tail_pipe = None
        if self._log_port is not None:
            for framer in self._framers.values():
                self._log_port.write(framer.close())
        for listener in list(self._listeners):
            try:
                listener.on_close()
            except Exception:
                log.exception("output listener %r failed on close", listener)
        self._listeners.clear()

    def reopen(self) -> None:
        """A restarted session gets a fresh output stream (listeners re-attach)."""
        self.closed = False


# -- the child side ------------------------------------------------------------------------
def _go_error(prefix: str, err: OSError) -> str:
    text = os.strerror(err.errno) if err.errno else str(err)
    return f"{prefix}: {text[:1].lower()}{text[1:]}"


def _is_executable(path: str) -> LaunchError | None:
    """None when `path` can be executed, else why not (the `started` text and errno)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return LaunchError(_go_error(f"stat {path}", err), err.errno or 0)
    if (st.st_mode & 0o170000) == 0o040000:
        return LaunchError(f"{path}: is a directory", errno.EACCES)   # as execve(2) says
    if not st.st_mode & 0o111:
        return LaunchError(f"{path}: permission denied", errno.EACCES)
    return None


def lookup_path(path: str, env: list[str], cwd: str) -> str:
    """The reference's lookup against the session's own PATH. Raises LaunchError."""
    if not path:
        raise LaunchError("no command given (cmd.Path is empty)", errno.ENOENT)
    if path.startswith("./") or path.startswith("../"):
        candidate = os.path.normpath(os.path.join(cwd, path))
    elif "/" in path:
        candidate = os.path.normpath(path)
    else:
        search = next((e[5:] for e in env if e.startswith("PATH=")), None)
        if search is None:
            raise LaunchError(f"{path}: no such executable in PATH (the session has no PATH)",
                              errno.ENOENT)
        for directory in search.split(":"):
            candidate = os.path.join(directory or ".", path)
            if _is_executable(candidate) is None:
                return os.path.normpath(candidate)
        raise LaunchError(f"{path}: no such executable in PATH", errno.ENOENT)
    problem = _is_executable(candidate)
    if problem:
        raise problem
    return candidate


class LaunchSpec:
    """Plain data for the child: everything decided before the fork."""
    __slots__ = ("path", "args", "env", "dir", "root", "creds", "stdin", "stdout", "stderr",
                 "tty", "setup", "sync_fd")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name))


# The failure report: errno (4 bytes, little-endian), then the `started` text. int.to_bytes,
# not `struct`: that extension module would be loaded on every boot for these four bytes.
_ERRNO_SIZE = 4


def _errno_bytes(code: int) -> bytes:
    return code.to_bytes(_ERRNO_SIZE, "little", signed=True)


def _child_exec(spec: LaunchSpec, errw: int) -> None:
    """Runs in the forked child; never returns. Only os-level calls, no logging."""
    setup = spec.setup   # the agent's isolation: cgroup, launch hooks, privileges
    step = "join the session's cgroup"
    code = 0
    try:
        if setup is not None:
            setup.join()
        step = "setsid"
        os.setsid()
        if spec.tty:
            step = "set controlling tty"
            import fcntl   # loaded before the fork (_spawn): no file is read here
            import termios
            fcntl.ioctl(spec.stdin, termios.TIOCSCTTY, 0)
        step = "set up stdio"
        os.dup2(spec.stdin, 0)
        os.dup2(spec.stdout, 1)
        os.dup2(spec.stderr, 2)
        if spec.root not in ("", "/"):
            step = f"chroot {spec.root}"
            if setup is not None:
                setup.enter_root(spec.root)
            else:
                os.chroot(spec.root)
            os.chdir("/")   # a relative Dir starts in the root, not the agent's cwd outside it
        directory = spec.dir or "/"
        step = f"chdir {directory}"
        os.chdir(directory)
        if spec.sync_fd is not None:
            step = "wait for the launch hooks"
            setup.wait(spec.sync_fd)
        creds = spec.creds
        if setup is not None:
            step = "set capabilities"
            setup.before_setuid()
        step = (f"set groups {creds.groups}" if len(creds.groups) <= 16
                else f"set {len(creds.groups)} groups")   # `started` stays short
        os.setgroups(creds.groups)
        step = f"setgid {creds.gid}"
        os.setgid(creds.gid)
        step = f"setuid {creds.uid}"
        os.setuid(creds.uid)
        if setup is not None:
            step = "set capabilities"
            setup.after_setuid()
        try:
            path = lookup_path(spec.path, spec.env, directory)
        except LaunchError as err:
            os.write(errw, _errno_bytes(err.errno) + str(err).encode(errors="replace"))
            os._exit(127)
        step = f"fork/exec {path}"
        os.closerange(3, errw)
        os.closerange(errw + 1, 1 << 20)
        for name in _AGENT_SIGNALS:
            signals.signal(signals.NUMBERS[name], signals.SIG_DFL)
        signals.pthread_sigmask(signals.SIG_SETMASK, ())
        os.execve(path, spec.args, dict(e.split("=", 1) if "=" in e else (e, "")
                                        for e in spec.env))
    except OSError as err:
        msg = _go_error(step, err)
        code = err.errno or 0
    except BaseException as err:   # noqa: BLE001 - the child must never return
        msg = f"{step}: {err}"
    try:
        os.write(errw, _errno_bytes(code) + msg.encode(errors="replace"))
    finally:
        os._exit(127)


_null_fd = -1


def _discard(fd: int, count: int) -> None:
    """Drop the first `count` bytes waiting in the pipe `fd`: spliced into /dev/null,
    never read (read only where /dev/null cannot be opened)."""
    global _null_fd
    if count and _null_fd < 0:
        try:
            _null_fd = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            _read_exactly(fd, count)
            return
    while count > 0:
        count -= os.splice(fd, _null_fd, count, flags=os.SPLICE_F_NONBLOCK)


def _read_exactly(fd: int, count: int) -> bytes:
    """`count` bytes known to be waiting in the pipe `fd`."""
    data = os.read(fd, count)
    while len(data) < count:
        more = os.read(fd, count - len(data))
        if not more:
            raise OSError(errno.EIO, f"{count - len(data)} bytes missing from a pipe")
        data += more
    return data


def _pipe_bytes(fd: int) -> int:
    """The bytes waiting in a pipe (FIONREAD)."""
    import fcntl   # the output path only, not the agent's startup
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _widen_pipe(fd: int, sizes: tuple[int, ...] = PIPE_SIZES) -> int:
    """A bigger buffer for an output pipe, best effort (past /proc/sys/fs/pipe-max-size
    only with CAP_SYS_RESOURCE, never past the per-user pipe quota); its size."""
    import fcntl
    for size in sizes:
        try:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            continue
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def describe_command(cmd, full: bool) -> str:
    """A command line for the log: the whole argv when `full`, else the path and the
    number of arguments (arguments may carry secrets, as the environment does)."""
    args = list(cmd.args or [])
    if full:
        return " ".join(args or [cmd.path])
    return f"{cmd.path or (args[0] if args else '')} ({len(args)} argument" \
           f"{'' if len(args) == 1 else 's'})"


# -- the session -----------------------------------------------------------------------
class Session:
    """One configured process: its phase, launch, I/O and exit (see architecture.md)."""

    def __init__(self, config, *, loop, reaper, root: str = "/", log_port=None,
                 primary: bool = False, echo: Callable[[bytes], object] | None = None,
                 on_change: Callable[["Session", Phase, Phase], object] | None = None,
                 on_unblock: Callable[["Session"], object] | None = None,
                 isolation=None, debug_level: Callable[[], int] = lambda: 0):
        self.id: str = config.common.id
        self.config = config
        self.loop = loop
        self.reaper = reaper
        self.root = root
        self.primary = primary
        self.phase = Phase.CREATED
        self.pid: int | None = None
        self.exit_signal = 0                # the signal that killed the last run, if any
        self.launch_errno = 0               # the errno of the last failed launch
        self.launches = 0                   # successful launches
        self.output = OutputFanout(self.id, log_port, primary, echo)
        self._on_change = on_change
        self._on_unblock = on_unblock       # RunBlock released: the agent writes it back
        self._readers: dict[int, str] = {}  # fd -> stream name
        self._stdin_fd = -1
        self._stdin_buf = bytearray()
        self._stdin_closing = False
        self._stdin_drops = None       # RateLimit of the "dropping input" warning, once needed
        self._stdin_waiters: list = []  # writers held back: called once the backlog drains
        self._master_fd = -1
        self._wait_status: int | None = None
        self._grace_timer = None
        self._unblocked = not config.run_block
        self._output_holders: set = set()   # who paused the output (flow control)
        self._pipe_owners: set = set()      # who owes a client bytes still in our pipes
        self._pipe_sizes: dict[int, int] = {}   # output pipe fd -> its buffer size
        self._resting: set[int] = set()     # output pipes left to fill a moment (streaming)
        self._streaming: set[int] = set()   # output pipes whose last wake-up moved much
        self.output_bytes = 0               # output taken from the process, in all...
        self.spliced_bytes = 0              # ...and of it spliced to a client unread
        self._coalesce_delay = COALESCE_DELAY
        self.isolation = isolation          # tether.isolation.Isolation: cgroup, privileges, hooks
        self.cgroup = None                  # this run's tether.cgroups.Group, if any
        self.stop_requested = False         # the agent asked it to stop (exit record reason)
        self._debug_level = debug_level     # the agent's, read at each launch

    # -- the phase ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def blocked(self) -> bool:
        """Waiting for an attach to release RunBlock."""
        return self.phase is Phase.BLOCKED

    @property
    def finishing(self) -> bool:
        """Exited, but its last output is still being collected."""
        return self.phase is Phase.FINISHING

    def _change(self, event: Event) -> None:
        old = self.phase
        new = TRANSITIONS[old].get(event)
        if new is None:
            raise SessionStateError(f"session {self.id}: {event.value!r} is not possible "
                                    f"while {old.value}")
        self.phase = new
        if self._on_change is not None:
            self._on_change(self, old, new)

    # -- launching --------------------------------------------------------------------
    def start(self) -> None:
        """Launch now, or hold it until `unblock` when RunBlock is set."""
        if self.phase not in LAUNCHABLE:
            raise SessionStateError(f"session {self.id}: cannot launch while "
                                    f"{self.phase.value}")
        if not self._unblocked:
            if self.phase is not Phase.BLOCKED:
                log.info("session %s waits for an attach to release RunBlock", self.id)
                self._change(Event.BLOCK)
            return
        self._launch()

    def unblock(self) -> None:
        """Release RunBlock (any attach protocol's `unblock`): the config says so from
        now on, and the agent is told before the launch, so a restart does not block."""
        released = self.config.run_block
        self._unblocked = True
        self.config.run_block = False
        if released and self._on_unblock is not None:
            self._on_unblock(self)
        if self.phase is Phase.BLOCKED:
            self._launch()

    def refuse(self, reason: str) -> None:
        """Do not launch: record `reason` as a failed launch (the agent is stopping)."""
        if self.phase not in LAUNCHABLE:
            raise SessionStateError(f"session {self.id}: cannot refuse a launch while "
                                    f"{self.phase.value}")
        self._failed(reason, 0)

    def cancel(self) -> None:
        """The agent is stopping: a session still waiting for RunBlock never launches."""
        if self.phase is Phase.BLOCKED:
            self._change(Event.CANCEL)

    def _launch(self) -> None:
        cfg = self.config
        cfg.detail.start_time = int(time.time())
        cfg.detail.stop_time = 0
        self._wait_status = None
        self.exit_signal = 0
        self.stop_requested = False
        try:
            self._spawn()
        except LaunchError as err:
            self._failed(str(err), err.errno)
            cfg.exit_status = 0
            return
        except OSError as err:
            self._failed(_go_error("start", err), err.errno or 0)
            return
        except Exception as err:   # noqa: BLE001 - one bad session must not stop the rest
            log.exception("session %s did not start", self.id)
            self._failed(f"internal error starting the session: {err}", 0)
            return
        cfg.started = "true"
        self.launch_errno = 0
        self.launches += 1
        # arguments may carry secrets: whole only from the config dump's level (console.py)
        log.info("session %s started: pid %d, %s", self.id, self.pid,
                 describe_command(cfg.cmd, full=self._debug_level() >= SECRETS_DEBUG_LEVEL))
        self._change(Event.LAUNCHED)
        if self.isolation is not None:
            self.isolation.launched(self)

    def _failed(self, reason: str, code: int) -> None:
        if self.isolation is not None:
            self.isolation.launch_failed(self)
        self.config.started = reason
        self.launch_errno = code
        log.error("session %s did not start: %s", self.id, reason)
        self._change(Event.LAUNCH_FAILED)

    def _spawn(self) -> None:
        cfg = self.config
        creds = resolve_credentials(self.root, cfg.user, cfg.group)
        env = list(cfg.cmd.env or [])
        if not any(e.startswith("HOME=") for e in env):
            env.append(f"HOME={creds.home}")
        args = list(cfg.cmd.args) if cfg.cmd.args else [cfg.cmd.path]
        child_fds: list[int] = []
        parent_fds: list[int] = []
        setup = None
        try:
            if cfg.tty:
                import fcntl  # noqa: F401 - the child sets its controlling tty with them
                import termios  # noqa: F401
                from tether.rootfs import open_pty   # tty sessions only
                master, slave = open_pty(self.root)
                parent_fds.append(master)
                child_fds.append(slave)
                stdio = (slave, slave, slave)
                readers = {master: "stdout"}
                stdin_fd = master
            else:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                parent_fds += [out_r, err_r]
                child_fds += [out_w, err_w]
                if cfg.open_stdin:
                    in_r, in_w = os.pipe2(os.O_CLOEXEC)
                    parent_fds.append(in_w)
                    child_fds.append(in_r)
                    stdin_fd = in_w
                else:
                    in_r = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                    child_fds.append(in_r)
                    stdin_fd = -1
                stdio = (in_r, out_w, err_w)
                readers = {out_r: "stdout", err_r: "stderr"}
            setup = self.isolation.prepare(self, creds.uid) if self.isolation else None
            spec = LaunchSpec(path=cfg.cmd.path, args=args, env=env, dir=cfg.cmd.dir,
                              root=self.root, creds=creds, stdin=stdio[0], stdout=stdio[1],
                              stderr=stdio[2], tty=cfg.tty, setup=setup)
            release = None
            if setup is not None and setup.sync:
                release = lambda pid: self.isolation.before_release(self, pid)  # noqa: E731
            pid = self._fork(spec, release)
        except BaseException:
            for fd in parent_fds:
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
            if setup is not None:
                setup.close()
        self.pid = pid
        self.reaper.watch(pid, self._on_wait_status)
        if not cfg.tty:   # after the fork: not on the way to the process's exec
            for fd in readers:
                self._pipe_sizes[fd] = _widen_pipe(fd)
        self.output.reopen()
        self._master_fd = stdin_fd if cfg.tty else -1
        self._stdin_fd = stdin_fd
        self._stdin_closing = False
        for fd, stream in readers.items():
            os.set_blocking(fd, False)
            self._readers[fd] = stream
            if not self._output_holders:
                self.loop.add_reader(fd, lambda fd=fd: self._on_readable(fd))
        if stdin_fd >= 0:
            os.set_blocking(stdin_fd, False)
            if self._stdin_buf:
                self._flush_stdin()

    @staticmethod
    def _fork(spec: LaunchSpec, release: Callable[[int], object] | None = None) -> int:
        """Fork and exec; with `release`, the child waits, set up, until `release(pid)`
        returns (the launch hooks); if it raises, the child is killed."""
        errr, errw = os.pipe2(os.O_CLOEXEC)
        sync = None
        if release is not None:
            import socket
            sync = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)   # CLOEXEC
            spec.sync_fd = sync[1].fileno()
        # Signals stay blocked across the fork so no Python handler runs in the child.
        old_mask = signals.pthread_sigmask(signals.SIG_BLOCK, signals.valid_signals())
        try:
            pid = os.fork()
        except BaseException:
            signals.pthread_sigmask(signals.SIG_SETMASK, old_mask)
            os.close(errr)
            os.close(errw)
            if sync is not None:
                sync[0].close()
                sync[1].close()
            raise
        if pid == 0:
            os.close(errr)
            _child_exec(spec, errw)   # never returns
        signals.pthread_sigmask(signals.SIG_SETMASK, old_mask)
        os.close(errw)
        if sync is not None:
            sync[1].close()
            try:
                ready = sync[0].recv(1) == b"R"   # set up and waiting; else see errr
            except OSError:
                ready = False
            try:
                if ready:
                    try:
                        release(pid)
                    except BaseException:
                        os.kill(pid, signals.SIGKILL)
                        os.close(errr)
                        os.waitpid(pid, 0)
                        raise
                    try:
                        sync[0].sendall(b"G")
                    except OSError:
                        pass   # the child is gone; what it reported (if anything) is in errr
            finally:
                sync[0].close()
        try:
            chunks = []
            while True:
                chunk = os.read(errr, 4096)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(errr)
        if chunks:
            # The child failed before exec and exits 127; collect it right here so the
            # reaper never sees a session that never ran.
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            report = b"".join(chunks)
            code = int.from_bytes(report[:_ERRNO_SIZE], "little", signed=True) \
                if len(report) >= _ERRNO_SIZE else 0
            raise LaunchError(report[_ERRNO_SIZE:].decode(errors="replace"), code)
        return pid

    # -- output ---------------------------------------------------------------------------
    def pause_output(self, holder: object = None) -> None:
        """Stop reading the process's output (flow control: `holder`, a client, is behind).
        Output stays paused while any holder holds it; every attach server shares this."""
        if not self._output_holders:
            for fd in self._readers:
                self.loop.remove_reader(fd)
        self._output_holders.add(holder)

    def resume_output(self, holder: object = None) -> None:
        if holder not in self._output_holders:
            return
        self._output_holders.discard(holder)
        if not self._output_holders:
            for fd in self._readers:
                if fd not in self._resting:
                    self.loop.add_reader(fd, lambda fd=fd: self._on_readable(fd))

    def hold_pipes(self, owner: object) -> None:
        """`owner` has promised a client bytes still in our output pipe (a spliced frame
        under way): nobody reads the pipes, not even the drain at the process's exit,
        until it lets go."""
        self._pipe_owners.add(owner)
        self.pause_output(owner)

    def release_pipes(self, owner: object) -> None:
        self._pipe_owners.discard(owner)
        self.resume_output(owner)

    def _on_readable(self, fd: int, budget: int = READ_BUDGET) -> None:
        stream = self._readers.get(fd)
        if stream is None or self._pipe_owners:
            return
        moved = 0
        if not self.config.tty:   # a pty is interactive: no splicing, no waiting
            moved = self._splice_out(fd, stream)
            if moved < 0:
                return   # the rest of those frames waits in the pipe for the client
        if not moved:   # (spliced: what came since waits for the next wake-up)
            moved = self._read_out(fd, stream, budget)
            if moved < 0:
                return
        if self.config.tty or fd not in self._readers:
            return
        if moved >= COALESCE_AT:
            self._streaming.add(fd)
            self._coalesce(fd, moved)
        elif fd in self._streaming:
            # The first small wake-up after streaming rests too: a producer that slowed
            # for a moment (or the bytes a whole frame left) does not get a wake-up per
            # write from then on. A second one in a row is interactive output: no rest.
            self._streaming.discard(fd)
            self._coalesce(fd, moved)

    def _read_out(self, fd: int, stream: str, budget: int) -> int:
        """Read and publish up to `budget` bytes, until a short read from a pipe (it is
        empty: epoll says when it is not, so no read ends in EAGAIN; a pty gives a few
        KiB a read, so it is read until EAGAIN); -1 at the end of it."""
        short_is_empty = not self.config.tty
        moved = 0
        while moved < budget:
            want = min(READ_CHUNK, budget - moved)
            try:
                data = os.read(fd, want)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.EIO:   # EIO: the pty's other side is gone
                    log.warning("session %s: reading %s: %s", self.id, stream, err)
                data = b""
            if not data:
                self._close_reader(fd)
                return -1
            moved += len(data)
            self.output_bytes += len(data)
            self.output.publish(stream, data)
            if len(data) < want and short_is_empty:
                break
        return moved

    def _coalesce(self, fd: int, moved: int) -> None:
        """The process streams: read its pipe again after a pause, in which it fills. The
        pause adapts: halved when this wake-up found the pipe (nearly) full, the writer
        having waited for us; longer when it found it less than half full."""
        size = self._pipe_sizes.get(fd, 0)
        if size and moved >= size - size // 8:
            self._coalesce_delay = max(COALESCE_MIN, self._coalesce_delay / 2)
        elif moved < size // 2:
            self._coalesce_delay = min(COALESCE_MAX, self._coalesce_delay * 1.5)
        if fd not in self._resting and not self._output_holders:
            self._resting.add(fd)
            self.loop.remove_reader(fd)
            self.loop.call_later(self._coalesce_delay, lambda: self._rested(fd))

    def _rested(self, fd: int) -> None:
        """The pause is over: the pipe has (most likely) filled, so it is read now, not
        after a round trip through epoll; epoll watches it again only once a wake-up
        does not rest (the process writes little, or has stopped)."""
        self._resting.discard(fd)
        if fd not in self._readers or self._output_holders:
            return
        self._on_readable(fd)
        if fd in self._readers and fd not in self._resting and not self._output_holders:
            self.loop.add_reader(fd, lambda: self._on_readable(fd))

    def _splice_out(self, fd: int, stream: str) -> int:
        """A burst, for the one client that is our only consumer, goes to it by
        splice(2), unread; its last REPLAY_LIMIT bytes are duplicated into the ring by
        tee(2) on their way (`_keep_tail`). The bytes spliced (the client may take whole
        frames only, leaving the rest for the next wake-up), or -1 while it has not
        taken them all: our output is paused until it has, and nobody else reads that
        pipe meanwhile."""
        target = self.output.splice_target()
        if target is None:
            return 0
        count = _pipe_bytes(fd)
        if count < SPLICE_MIN:
            return 0
        taken, gone = target.splice_output(
            stream, fd, count, self, REPLAY_LIMIT,
            lambda pipe, size: self._keep_tail(stream, pipe, size))
        self.output_bytes += taken
        self.spliced_bytes += taken
        return taken if gone else -1

    def _keep_tail(self, stream: str, fd: int, count: int) -> bytes | None:
        """The last `count` bytes of a spliced burst are at the front of the pipe `fd`:
        the ring gets them by tee (None: splice them on), or, where tee cannot, they are
        read here and the client gets them as bytes."""
        if self.output.keep_tail(stream, fd, count):
            return None
        data = _read_exactly(fd, count)
        self.output.remember(stream, data)
        return data

    def _close_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._streaming.discard(fd)
        self.loop.remove_reader(fd)
        if fd == self._stdin_fd:   # a tty's master is both: keep it until the end
            if self.phase is not Phase.FINISHING:
                return
            self._stdin_fd = -1
            self._master_fd = -1
            self.loop.remove_writer(fd)
        os.close(fd)
        self._maybe_finish()

    # -- input ----------------------------------------------------------------------------
    def write_stdin(self, data: bytes) -> bool:
        """Queue input for the process. False when the backlog is over STDIN_HIGH: the
        writer should stop taking input from its client (an SSH channel's window, a
        socket's reads) and go on when `when_stdin_drained` calls it, so input waits in
        the client's transport rather than here. Past STDIN_LIMIT input is dropped: a
        writer that does not hold back loses it, with a warning."""
        if self._stdin_closing or not data:
            return True
        if len(self._stdin_buf) + len(data) > STDIN_LIMIT:
            if self._stdin_drops is None:   # a client typing into a stuck process: a few lines
                from tether.console import RateLimit
                self._stdin_drops = RateLimit(burst=3, interval=30.0)
            self._stdin_drops.log(log, WARNING, "session %s: stdin backlog over %d bytes, "
                                  "dropping input", self.id, STDIN_LIMIT)
            return False
        self._stdin_buf += data
        if self._stdin_fd >= 0:
            self._flush_stdin()
        return len(self._stdin_buf) <= STDIN_HIGH

    def when_stdin_drained(self, callback: Callable[[], object]) -> None:
        """Call `callback` once on the loop when the input backlog is down to STDIN_LOW,
        or when input can no longer be taken (stdin closed, the session finished)."""
        if len(self._stdin_buf) <= STDIN_LOW:
            self.loop.call_soon(callback)
        else:
            self._stdin_waiters.append(callback)

    def _stdin_drained(self) -> None:
        if self._stdin_waiters and len(self._stdin_buf) <= STDIN_LOW:
            waiters, self._stdin_waiters = self._stdin_waiters, []
            for callback in waiters:
                callback()

    def close_stdin(self) -> None:
        if self.config.tty:
            self.write_stdin(EOT)
            return
        self._stdin_closing = True
        if self._stdin_fd >= 0:
            self._flush_stdin()

    def _flush_stdin(self) -> None:
        fd = self._stdin_fd
        if fd < 0:
            return
        try:
            while self._stdin_buf:
                n = os.write(fd, self._stdin_buf)
                del self._stdin_buf[:n]
        except BlockingIOError:
            self.loop.add_writer(fd, self._flush_stdin)
            self._stdin_drained()
            return
        except OSError:   # EPIPE: the process closed its stdin
            self._stdin_buf.clear()
        self.loop.remove_writer(fd)
        self._stdin_drained()
        if self._stdin_closing and not self.config.tty:
            os.close(fd)
            self._stdin_fd = -1

    def resize(self, rows: int, cols: int) -> None:
        if self._master_fd < 0:
            return
        import fcntl   # tty sessions only
        import struct
        import termios
        fcntl.ioctl(self._master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, signum: int) -> None:
        if not self.running or self.pid is None:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    # -- exit -----------------------------------------------------------------------------
    def _on_wait_status(self, status: int) -> None:
        self._wait_status = status
        self._change(Event.PROCESS_EXITED)
        for fd in list(self._readers):   # output still in the pipes belongs before the exit
            self._on_readable(fd, budget=1 << 20)
        if self._readers:
            self._grace_timer = self.loop.call_later(EXIT_OUTPUT_GRACE, self._abandon_output)
        self._maybe_finish()

    def _abandon_output(self) -> None:
        log.info("session %s exited but something still holds its output open; "
                 "closing it", self.id)
        for fd in list(self._readers):
            self._close_reader(fd)

    def _maybe_finish(self) -> None:
        if self.phase is not Phase.FINISHING or self._readers:
            return
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        for fd in (self._stdin_fd, self._master_fd):
            if fd >= 0:
                self.loop.remove_writer(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._stdin_fd = self._master_fd = -1
        self._stdin_buf.clear()
        self._stdin_drained()
        status, self._wait_status = self._wait_status, None
        self._record_exit(status)
        self.output.close()
        self._change(Event.OUTPUT_DONE)

    def _record_exit(self, status: int) -> None:
        from extraconfig.gotime import GoTime
        from tether.config import ExitLog
        cfg = self.config
        message = describe_status(status)
        if os.WIFSIGNALED(status):
            self.exit_signal = os.WTERMSIG(status)
            cfg.exit_status = -1
        else:
            self.exit_signal = 0
            cfg.exit_status = os.waitstatus_to_exitcode(status)
        cfg.detail.stop_time = int(time.time())
        logs = list(cfg.diagnostics.exit_logs or [])
        logs.append(ExitLog(time=GoTime.now(), exit_status=cfg.exit_status, message=message))
        cfg.diagnostics.exit_logs = logs[-MAX_EXIT_LOGS:]
        log.info("session %s (pid %s) %s", self.id, self.pid, message)
        if self.isolation is not None:
            self.isolation.exited(self, status)

    def exit_code(self) -> int:
        """Shell convention: the exit code, or 128+N when signal N killed it."""
        if self.exit_signal:
            return 128 + self.exit_signal
        return self.config.exit_status & 0xFF

    def state(self) -> dict:
        cfg = self.config
        return {"id": self.id, "pid": self.pid, "started": cfg.started,
                "status": cfg.exit_status, "starttime": cfg.detail.start_time,
                "stoptime": cfg.detail.stop_time, "running": self.running,
                "tty": cfg.tty, "blocked": self.blocked,
                "resurrections": cfg.diagnostics.resurrection_count}
