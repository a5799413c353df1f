"""The attach server's channel kinds: a client attached to a session, a file (or tar
stream) copied in, a file (or a directory as tar) copied out.

A channel belongs to one `Connection` (tether/attach/server.py), which gives it `send`,
`send_parts`, `ok`, `finish`, `checked` (whether data frames carry a CRC), `channels`
(the connection's open channels), and flow control: `hold_if_behind(session)` pauses a
session's output while this client's backlog is high, `has_room()` says whether a
producer may queue more. The connection calls a channel's `on_data(bytes)`, `on_eof()`
and `on_detach()` with what the client sends, and `pump()` (when the channel has one)
when its backlog drains.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile

from tether.attach import protocol as p
from tether.rootfs import resolve_in_root
from tether.sessions import Phase

TAR_SPOOL = 8 << 20           # a tar stream is spooled in memory up to this, then on disk


def describe_error(err: Exception) -> str:
    """An error as the client reads it: the message, the path of an OSError."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)



class AttachChannel:
    """A client on a session: output listener, stdin source."""

    def __init__(self, connection, channel: int, session):
        self.connection = connection
        self.channel = channel
        self.session = session
        self.stdin = True
        self.attached = False

    def start(self, *, stdin: bool, replay: bool, extra: dict | None = None) -> None:
        connection, channel, session = self.connection, self.channel, self.session
        self.stdin = stdin
        connection.send({"t": p.OK, "ch": channel, "tty": bool(session.config.tty),
                         "running": bool(session.running), **(extra or {})})
        if replay:
            for stream, data in session.output.replay():
                if not self._forward(stream, data):
                    return
        if session.phase is Phase.EXITED:
            self.on_close()   # it has already ended: replay was all there is
            return
        session.output.subscribe(self)
        self.attached = True

    def _forward(self, stream: str, data: bytes) -> bool:
        connection = self.connection
        if not connection.send_parts(*p.data_parts(self.channel, data, stream,
                                                   connection.checked)):
            return False
        if self.attached:
            connection.hold_if_behind(self.session)
        return True

    # listener interface (OutputFanout)
    def on_output(self, stream: str, data: bytes) -> None:
        self._forward(stream, data)

    def on_close(self) -> None:
        self.attached = False
        session = self.session
        if self.connection.channels.get(self.channel) is not self:
            return
        self.connection.send({"t": p.EXIT, "ch": self.channel,
                              "status": session.config.exit_status,
                              "code": session.exit_code(),
                              "signal": session.exit_signal})
        self.connection.finish(self.channel)

    # from the client
    def on_data(self, data: bytes) -> None:
        if self.stdin:
            self.session.write_stdin(data)

    def on_eof(self) -> None:
        pass   # the client has no more input; the process's stdin stays open (detach rule)

    def on_detach(self) -> None:
        if self.attached:
            self.session.output.unsubscribe(self)
            self.attached = False


class CopyToChannel:
    """Data in, a file (written to a temporary name, renamed at the end) or a tar stream
    extracted under a directory."""

    def __init__(self, connection, channel: int, root: str, path: str, *,
                 mode, as_tar: bool):
        self.connection = connection
        self.channel = channel
        self.as_tar = as_tar
        self.digest = hashlib.sha256()
        self.size = 0
        self.target = resolve_in_root(root, path, follow_last=not as_tar)
        if as_tar:
            if not os.path.isdir(self.target):
                raise NotADirectoryError(20, "not a directory", path)
            self.file = tempfile.SpooledTemporaryFile(TAR_SPOOL)
        else:
            if os.path.isdir(self.target):
                raise IsADirectoryError(21, "is a directory (copy a tar stream into it)", path)
            directory = os.path.dirname(self.target)
            fd, self.temp = tempfile.mkstemp(prefix=".tether-copy-", dir=directory)
            self.file = os.fdopen(fd, "wb")
            self.mode = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0o644
        connection.send({"t": p.OK, "ch": channel})

    def on_data(self, data: bytes) -> None:
        if self.file is None:
            return
        try:
            self.file.write(data)
        except OSError as err:
            self._fail(f"writing {self.target}: {err.strerror}")
            return
        self.digest.update(data)
        self.size += len(data)

    def on_eof(self) -> None:
        if self.file is None:
            return
        try:
            if self.as_tar:
                self.file.seek(0)
                with tarfile.open(fileobj=self.file, mode="r|*") as archive:
                    archive.extractall(self.target, filter="data")
                self.file.close()
            else:
                self.file.flush()
                os.fchmod(self.file.fileno(), self.mode & 0o7777)
                self.file.close()
                os.rename(self.temp, self.target)
        except (OSError, tarfile.TarError) as err:
            self._fail(f"copy to {self.target}: {describe_error(err) if isinstance(err, OSError) else err}")
            return
        self.file = None
        self.connection.ok(self.channel, size=self.size, sha256=self.digest.hexdigest())
        self.connection.finish(self.channel)

    def _fail(self, reason: str) -> None:
        self._discard()
        self.connection.send({"t": p.ERROR, "ch": self.channel, "msg": reason})
        self.connection.channels.pop(self.channel, None)

    def _discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            if not self.as_tar:
                try:
                    os.unlink(self.temp)
                except FileNotFoundError:
                    pass

    def on_detach(self) -> None:
        self._discard()


class CopyFromChannel:
    """A file, or a directory as a tar stream, out to the client as the client keeps up."""

    def __init__(self, connection, channel: int, root: str, path: str, *, as_tar):
        self.connection = connection
        self.channel = channel
        target = resolve_in_root(root, path)
        info = os.stat(target)
        as_tar = stat.S_ISDIR(info.st_mode) if as_tar is None else bool(as_tar)
        if as_tar:
            self.file = tempfile.SpooledTemporaryFile(TAR_SPOOL)
            with tarfile.open(fileobj=self.file, mode="w") as archive:
                archive.add(target, arcname=os.path.basename(target.rstrip("/")) or ".")
            size = self.file.tell()
            self.file.seek(0)
        else:
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path} is not a regular file or directory")
            self.file = open(target, "rb")
            size = info.st_size
        connection.ok(channel, kind="tar" if as_tar else "file", size=size,
                       mode=stat.S_IMODE(info.st_mode))
        connection.loop.call_soon(self.pump)

    def pump(self) -> None:
        connection = self.connection
        while self.file is not None and connection.has_room():
            if connection.channels.get(self.channel) is not self:
                return self.on_detach()
            chunk = self.file.read(p.DATA_CHUNK)
            if not chunk:
                self.on_detach()
                connection.send({"t": p.EOF, "ch": self.channel})
                connection.finish(self.channel)
                return
            frames = p.encode_data(self.channel, chunk, "stdout", connection.checked)
            if not connection.send_bytes(frames[0]):
                return

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_detach(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
