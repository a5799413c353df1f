"""`tether attach --vic`: the port layer's side of VIC's attach, for a person to try it.

Connects to `unix:PATH` (the sandbox's --vic-attach, or `tether vm --vic-serial`'s COM1
socket) or `tcp:HOST:PORT`, runs the sync handshake as the port layer does (one second
per attempt, again until it holds), then SSH as user `daemon` with asyncssh: the same
requests as lib/portlayer/attach/communication (container-ids, version, an `attach`
channel, window-change, close-stdin, unblock).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

from tether.attach.client import peer_text
from tether.attach.vic import handshake as hs
from tether.attach.vic import wire


class VicError(Exception):
    pass


def open_stream(endpoint: str, timeout: float) -> socket.socket:
    kind, _, rest = endpoint.partition(":")
    if kind == "unix" and rest:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = rest
    elif kind == "tcp" and ":" in rest:
        host, _, port = rest.rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        address = (host.strip("[]"), int(port))
    else:
        raise VicError(f"endpoint {endpoint!r}: use unix:PATH or tcp:HOST:PORT")
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def handshake(sock: socket.socket, variant: str, timeout: float) -> None:
    """The port layer's loop: an attempt per second until one succeeds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = hs.ClientHandshake(variant)
        sock.sendall(client.start())
        attempt_end = min(deadline, time.monotonic() + hs.CLIENT_TIMEOUT)
        try:
            while not client.established:
                left = attempt_end - time.monotonic()
                if left <= 0:
                    raise hs.HandshakeError("timed out")
                sock.settimeout(left)
                data = sock.recv(client.need)
                if not data:
                    raise VicError("the agent closed the connection during the handshake")
                reply = client.receive(data)
                if reply:
                    sock.sendall(reply)
            sock.settimeout(None)
            return
        except (hs.HandshakeError, socket.timeout):
            continue
    raise VicError(f"no handshake within {timeout:g}s (is the agent serving VIC attach "
                   "there, with the same handshake version?)")


async def open_connection(sock: socket.socket, key_pem: bytes | None = None):
    import asyncssh
    keys = [asyncssh.import_private_key(key_pem)] if key_pem else []
    sock.setblocking(False)
    return await asyncssh.connect(sock=sock, username=wire.SSH_USER, known_hosts=None,
                                  client_keys=keys, agent_path=None, password=None,
                                  preferred_auth="publickey,none" if keys else "none",
                                  config=None)


async def global_request(conn, kind: str) -> tuple[bool, bytes]:
    from asyncssh.constants import MSG_REQUEST_SUCCESS
    pkttype, packet = await conn._make_global_request(kind.encode())
    return pkttype == MSG_REQUEST_SUCCESS, packet.get_remaining_payload()


async def container_ids(conn) -> list[str]:
    ok, payload = await global_request(conn, wire.CONTAINER_IDS)
    if not ok:
        raise VicError("container-ids refused")
    return wire.decode_name_list(payload)


async def container_version(conn) -> int:
    ok, payload = await global_request(conn, wire.VERSION)
    return wire.decode_uint32(payload) if ok else 0


def _attach_channel_class():
    from asyncssh.channel import SSHForwardChannel

    class AttachClientChannel(SSHForwardChannel):
        _read_datatypes = {wire.EXTENDED_DATA_STDERR}

        async def request(self, name: str, payload: bytes = b"") -> bool:
            return bool(await self._make_request(name.encode(), payload))

    return AttachClientChannel


class _Output:
    """asyncssh session: stdout and stderr to our fds; `done` when the agent closes."""

    def __init__(self, stdout_fd: int, stderr_fd: int):
        self.stdout_fd, self.stderr_fd = stdout_fd, stderr_fd
        self.done = asyncio.get_event_loop().create_future()

    def connection_made(self, chan) -> None:
        pass

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype) -> None:
        fd = self.stderr_fd if datatype == wire.EXTENDED_DATA_STDERR else self.stdout_fd
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(exc)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


async def open_attach(conn, session_id: str, output: _Output):
    from asyncssh.misc import ChannelOpenError
    chan = _attach_channel_class()(conn, asyncio.get_event_loop(), None, "strict",
                                   2 << 20, 32 << 10)
    try:
        await chan._open_forward(lambda: output, wire.ATTACH_CHANNEL.encode(),
                                 session_id.encode())
    except ChannelOpenError as err:
        raise VicError(f"attach {session_id}: refused: {peer_text(err.reason)}") from None
    return chan


async def attach(endpoint: str, session_id: str | None, *, variant: str = hs.HEAD,
                 key_pem: bytes | None = None, timeout: float = 30.0, stdin_fd: int | None = 0,
                 list_only: bool = False, unblock: bool = True) -> int:
    from tether.attach.terminal import DETACH_KEYS, DetachScanner
    sock = open_stream(endpoint, timeout)
    handshake(sock, variant, timeout)
    conn = await open_connection(sock, key_pem)
    try:
        ids = await container_ids(conn)
        if list_only:
            for sid in ids:
                print(peer_text(sid))     # the agent's text: escaped, as every line we print
            return 0
        version = await container_version(conn)
        output = _Output(1, 2)
        chan = await open_attach(conn, session_id, output)
        if unblock and version >= wire.EXEC_SUPPORTED_VERSION:
            if not await chan.request(wire.UNBLOCK, wire.UNBLOCK_PAYLOAD):
                raise VicError(f"unblock {session_id} refused (the launch failed?)")
        return await _interact(chan, output, stdin_fd, DetachScanner(DETACH_KEYS))
    finally:
        conn.close()


async def _interact(chan, output: _Output, stdin_fd: int | None, scanner) -> int:
    import termios
    import tty

    from tether.attach.terminal import END_SIGNALS
    loop = asyncio.get_event_loop()
    tty_in = stdin_fd is not None and os.isatty(stdin_fd)
    saved = None
    detached = loop.create_future()
    ended = loop.create_future()      # SIGTERM or SIGHUP: 128+N, the terminal restored

    def on_stdin() -> None:
        data = os.read(stdin_fd, 64 << 10)
        if not data:
            loop.remove_reader(stdin_fd)
            loop.create_task(_close_stdin(chan))
            return
        if tty_in:
            data, detach = scanner.feed(data)
            if data:
                chan.write(data)
            if detach and not detached.done():
                detached.set_result(True)
        else:
            chan.write(data)

    # Everything from the terminal going raw on is inside the try: whatever ends the
    # attach (an error, SIGTERM, SIGHUP) restores it.
    try:
        if tty_in:
            for signum in END_SIGNALS:
                loop.add_signal_handler(signum, lambda n=signum: ended.done()
                                        or ended.set_result(128 + n))
            saved = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd, termios.TCSANOW)

            def resize() -> None:
                size = os.get_terminal_size(stdin_fd)
                loop.create_task(chan.request(wire.WINDOW_CHANGE, wire.encode_window_change(
                    size.columns, size.lines)))
            resize()
            loop.add_signal_handler(signal.SIGWINCH, resize)
        if stdin_fd is not None:
            loop.add_reader(stdin_fd, on_stdin)
        done, _ = await asyncio.wait([output.done, detached, ended],
                                     return_when=asyncio.FIRST_COMPLETED)
        if ended in done:
            return ended.result()
        if detached in done:
            print("\r\nread escape sequence", file=sys.stderr)
        return 0
    finally:
        if stdin_fd is not None:
            loop.remove_reader(stdin_fd)
        if tty_in:
            for signum in (*END_SIGNALS, signal.SIGWINCH):
                loop.remove_signal_handler(signum)
        if saved is not None:
            try:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass   # the terminal is gone (hung up): nothing left to restore


async def _close_stdin(chan) -> None:
    """As the port layer's CloseStdin: ask for EOF to reach the process, then send ours."""
    await chan.request(wire.CLOSE_STDIN)
    chan.write_eof()


def attach_main(args) -> int:
    """`tether attach --vic ENDPOINT ID` (or `--list`)."""
    key_pem = None
    if args.vic_key_file:
        with open(args.vic_key_file, "rb") as f:
            key_pem = f.read()
    try:
        return asyncio.run(attach(args.endpoint, args.session, variant=args.vic_handshake,
                                  key_pem=key_pem, timeout=args.timeout,
                                  stdin_fd=None if args.no_stdin else 0,
                                  list_only=args.session is None))
    except (VicError, OSError, TimeoutError) as err:
        print(f"tether attach: {peer_text(str(err))}", file=sys.stderr)
        return 1
    except Exception as err:   # noqa: BLE001 - asyncssh's errors: a message, no traceback
        print(f"tether attach: {type(err).__name__}: {peer_text(str(err))}", file=sys.stderr)
        return 1
