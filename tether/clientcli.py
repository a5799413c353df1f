"""`tether attach`, `exec`, `ps`, `kill` and `cp`: the attach client on the command line.

ENDPOINT is unix:PATH, vsock:CID:PORT, serial:DEVICE or tcp:HOST:PORT. The HMAC key is
read from --key-file, else $TETHER_KEY_FILE, else the bytes of $TETHER_KEY, else empty.
In `cp`, the agent side is written ENDPOINT::PATH (two colons), e.g.
`tether cp unix:/run/a.sock::/etc/hosts ./hosts`. See docs/attach-protocol.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile

from tether.attach.terminal import REPLAY_SETTLE, interact


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tether {prog}", description=description)
    parser.add_argument("--key-file", help="file holding the executor Key (raw bytes); "
                        "default $TETHER_KEY_FILE, else $TETHER_KEY, else empty")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the agent (default 30)")
    return parser


def _connect(endpoint: str, args):
    from tether.attach.client import Client, read_key
    return Client.connect(endpoint, read_key(args.key_file), timeout=args.timeout)


ERROR_LIMIT = 2000   # characters of an error message we print


def _fail(prog: str, err: BaseException | str) -> int:
    """Print the error as one line: escaped and clipped, as it may quote the agent (a
    name in its tar, a refusal's text) or a file name of any bytes."""
    print(f"tether {prog}: {_shown(str(err), ERROR_LIMIT)}", file=sys.stderr)
    return 1


def _shown(value, limit: int | None = None) -> str:
    """A field of the agent's reply (or an error) as a cell of our tables or a line of
    our output: tether.attach.client.peer_text, loaded when first needed."""
    from tether.attach.client import peer_text
    return peer_text(value) if limit is None else peer_text(value, limit)


def _ended(code: int | None) -> int:
    """The session's exit code; 1 when the agent ended the attach without one."""
    if code is None:
        print("tether: the agent ended the attach", file=sys.stderr)
        return 1
    return code


def _guard(prog: str, body) -> int:
    from tether.attach.client import ClientError
    from tether.attach.transports import EndpointError
    try:
        return body()
    except (ClientError, EndpointError, OSError, TimeoutError) as err:
        return _fail(prog, err)


# -- commands ---------------------------------------------------------------------------------
def attach_main(argv: list[str]) -> int:
    parser = _parser("attach", "Attach to a session's input and output, like docker attach. "
                     "Detach with ctrl-p ctrl-q; the exit code is the session's.")
    parser.add_argument("endpoint")
    parser.add_argument("session", nargs="?" if "--vic" in argv else None)
    parser.add_argument("--no-stdin", action="store_true", help="do not send our input")
    parser.add_argument("--no-unblock", action="store_true",
                        help="only watch: leave a RunBlock session waiting (by default it "
                        "is released once attached, like docker start -a)")
    parser.add_argument("--replay", action="store_true",
                        help="first print the session's last 64 KiB of output")
    parser.add_argument("--vic", action="store_true",
                        help="speak VIC's attach (sync handshake, then SSH as the port layer "
                        "does) to unix:PATH or tcp:HOST:PORT; without a session: list the IDs")
    parser.add_argument("--vic-handshake", default="head", choices=("head", "v0.9"),
                        help="with --vic: the handshake version (default head)")
    parser.add_argument("--vic-key-file", help="with --vic: sign in with this PEM key (the "
                        "executor's Key), for an agent serving with --vic-auth key")
    args = parser.parse_args(argv)
    if args.vic:
        from tether.attach.vic.client import attach_main as vic_attach_main
        return vic_attach_main(args)

    def body() -> int:
        with _connect(args.endpoint, args) as client:
            stream = client.attach(args.session, replay=args.replay,
                                   stdin=not args.no_stdin, unblock=not args.no_unblock)
            if args.no_unblock and not stream.running:
                print(f"tether attach: session {args.session} is not running; watching "
                      "(--no-unblock)", file=sys.stderr)
            return _ended(interact(client, stream, stdin_fd=None if args.no_stdin else 0,
                                   replay_settle=REPLAY_SETTLE if args.replay else None))
    return _guard("attach", body)


def exec_main(argv: list[str]) -> int:
    parser = _parser("exec", "Start a process in a running agent and attach to it.")
    parser.add_argument("endpoint")
    parser.add_argument("-t", "--tty", action="store_true", help="give it a pty")
    parser.add_argument("-d", "--detach", action="store_true",
                        help="print its session ID and return")
    parser.add_argument("-e", "--env", action="append", default=None, metavar="NAME=VALUE")
    parser.add_argument("-w", "--workdir", default="")
    parser.add_argument("-u", "--user", default="")
    parser.add_argument("--id", help="session ID (default: random)")
    if "--" in argv:   # options before --, the command (options and all) after it
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        command = argv[cut + 1:]
    else:
        parser.add_argument("command", nargs=argparse.REMAINDER)
        args = parser.parse_args(argv)
        command = args.command
    if not command:
        parser.error("no command given (tether exec ENDPOINT [-t] -- CMD...)")
    env = None
    if args.env is not None:
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + args.env

    def body() -> int:
        with _connect(args.endpoint, args) as client:
            result = client.exec(command, tty=args.tty, env=env, dir=args.workdir,
                                 user=args.user, id=args.id, attach=not args.detach)
            if args.detach:
                print(_shown(result["id"]))
                return 0
            return _ended(interact(client, result, stdin_fd=0))
    return _guard("exec", body)


def ps_main(argv: list[str]) -> int:
    parser = _parser("ps", "List the agent's sessions.")
    parser.add_argument("endpoint")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    def body() -> int:
        with _connect(args.endpoint, args) as client:
            sessions = client.list()
        if args.json:
            try:   # bytes as text; json escapes what a terminal would act on
                text = json.dumps(sessions, indent=2, default=_json_default)
            except RecursionError:
                return _fail("ps", "the agent's reply is nested too deeply to print")
            print(text)
            return 0
        print(f"{'SESSION':<24} {'PID':>7} {'STATE':<10} {'STATUS':>6} STARTED")
        for s in sessions:
            run_state = s.get("run_state")
            state = run_state.get("Status", "?") if isinstance(run_state, dict) else "?"
            print(f"{_shown(s.get('id'))[:24]:<24} {_shown(s.get('pid') or '-'):>7} "
                  f"{_shown(state):<10} {_shown(s.get('status')):>6} "
                  f"{_shown(s.get('started'))}")
        return 0
    return _guard("ps", body)


def _json_default(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return f"(a {type(value).__name__})"


def kill_main(argv: list[str]) -> int:
    parser = _parser("kill", "Send a signal (name or number, default TERM) to a session's "
                     "process group.")
    parser.add_argument("endpoint")
    parser.add_argument("session")
    parser.add_argument("signal", nargs="?", default="TERM")
    args = parser.parse_args(argv)
    spec = int(args.signal) if args.signal.isdigit() else args.signal

    def body() -> int:
        with _connect(args.endpoint, args) as client:
            client.signal(args.session, spec)
        return 0
    return _guard("kill", body)


def split_remote(spec: str) -> tuple[str, str] | None:
    """'ENDPOINT::PATH' -> (ENDPOINT, PATH); None for a local path."""
    endpoint, sep, path = spec.partition("::")
    if not sep or not endpoint or ":" not in endpoint:
        return None
    return endpoint, path or "/"


def cp_main(argv: list[str]) -> int:
    parser = _parser("cp", "Copy a file or directory into or out of the container root. "
                     "The agent side is ENDPOINT::PATH; the other is a local path, or - "
                     "for a tar stream on stdin/stdout.")
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    src_remote, dst_remote = split_remote(args.src), split_remote(args.dst)
    if bool(src_remote) == bool(dst_remote):
        parser.error("exactly one of SRC and DST must be ENDPOINT::PATH")

    def body() -> int:
        if dst_remote:
            return _copy_in(args, args.src, *dst_remote)
        return _copy_out(args, *src_remote, args.dst)
    return _guard("cp", body)


def _copy_in(args, local: str, endpoint: str, path: str) -> int:
    from tether.attach.client import ClientError
    with _connect(endpoint, args) as client:
        if local == "-":
            client.copy_to(path, sys.stdin.buffer, tar=True)
            return 0
        if os.path.isdir(local):
            with tempfile.TemporaryFile() as spool:
                with tarfile.open(fileobj=spool, mode="w") as archive:
                    archive.add(local, arcname=os.path.basename(os.path.abspath(local)))
                spool.seek(0)
                client.copy_to(path, spool, tar=True)
            return 0
        mode = os.stat(local).st_mode & 0o7777
        with open(local, "rb") as source:
            try:
                client.copy_to(path, source, mode=mode)
            except ClientError as err:
                if "is a directory" not in str(err):
                    raise
                source.seek(0)
                client.copy_to(path.rstrip("/") + "/" + os.path.basename(local), source,
                               mode=mode)
    return 0


def _safe_mode(mode: int) -> int:
    """A copied-out file's mode on this machine, as tarfile's "data" filter leaves a
    directory's files: no setuid, setgid or sticky bit, no write for group or others,
    readable and writable by its owner. The container chose the mode; on the host, root
    running `tether cp` must not end with a setuid file of the container's making."""
    return (mode & 0o755) | 0o600


def _copy_out(args, endpoint: str, path: str, local: str) -> int:
    with _connect(endpoint, args) as client:
        if local == "-":
            client.copy_from(path, sys.stdout.buffer, tar=True)
            sys.stdout.flush()
            return 0
        with tempfile.TemporaryFile() as spool:
            info = client.copy_from(path, spool)
            spool.seek(0)
            if info["kind"] == "tar":
                os.makedirs(local, exist_ok=True)
                _extract(spool, local, path)
                return 0
            target = local
            if os.path.isdir(target):
                target = os.path.join(target, os.path.basename(path.rstrip("/")))
            with open(target, "wb") as out:
                while chunk := spool.read(1 << 20):
                    out.write(chunk)
            os.chmod(target, _safe_mode(info.get("mode") or 0o644))
    return 0


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def _extract(spool, local: str, path: str) -> None:
    """Extract the agent's tar of `path` under the directory `local`, as the agent
    extracts a client's: every member placed through directory fds with `local` as the
    root (tether/attach/copyfiles.py), so no name or link (however long the path it
    makes) reaches outside it, with the data filter's limits on names, links, modes and
    special files. tarfile's own filter checks names with os.path.realpath, which a
    chain of links past PATH_MAX gets wrong (CVE-2025-4517, and its kin in Python
    versions we may run on). The agent sends plain tar: a compressed stream would
    expand on the user's disk at the agent's will, and is refused."""
    from tether.attach.client import ClientError
    from tether.attach.copyfiles import CopyError, Guard, TarTarget
    head = spool.read(6)
    spool.seek(0)
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            raise ClientError(f"copy-from {path}: the agent sent a {name}-compressed tar, "
                              "not the plain tar an agent sends: refused")
    guard = Guard(local)
    try:
        TarTarget(guard, "/").extract(spool)
    except (CopyError, tarfile.TarError) as err:
        raise ClientError(f"copy-from {path}: the agent's tar: {err}") from None
    finally:
        guard.close()
