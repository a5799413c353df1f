"""The SSH-2 server of VIC's attach, on asyncssh: the port layer's requests on our Sessions.

asyncssh does the transport (key exchange, ciphers, host key) and user authentication.
VIC's connection layer is not a shell's: channel type `attach` with the session ID as
raw extra data, global requests `container-ids` and `version`, channel requests
`window-change`, `close-stdin`, `ping`, `unblock` with raw payloads, and refusals that
carry the reference's texts (vmware/vic cmd/tether/attach.go). That part is ours, hooked
in where asyncssh dispatches by message type and request name.

Everything here runs on the agent's thread (aiobridge). The session side is the same
Session and OutputFanout objects the msgpack server uses: an attached channel is one more
output listener and one more stdin writer.
"""
from __future__ import annotations

import struct
import time

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHServerConnection
from asyncssh.constants import (MSG_CHANNEL_OPEN, MSG_GLOBAL_REQUEST, MSG_REQUEST_FAILURE,
                                MSG_REQUEST_SUCCESS)
from asyncssh.misc import ChannelOpenError, ProtocolError

from tether.attach.vic import wire
from tether.console import RateLimit, clip
from tether.log import ERROR, INFO, WARNING, get_logger
from tether.sessions import Phase

log = get_logger("tether.attach.vic")

WINDOW = 2 << 20
MAX_PACKET = 32 << 10
HOLD_LIMIT = 60.0        # a channel whose client reads nothing this long is closed
SMALL_RSA_BITS = 768     # below this, rsa-sha2-512 signatures do not fit the modulus
# Open attach channels to one session on one connection. The port layer opens one per
# session (vmware/vic lib/portlayer/attach/communication interactor.go); every channel
# holds its own copy of the session's output until its window opens, so without a cap
# a host that opens many and reads none makes PID 1 hold output many times over
# (60 KB of output held as 118 MB with 2000 channels).
CHANNELS_PER_SESSION = 16

# What a host can repeat at will is logged at a rate (per kind, across connections): the
# console drops its oldest output when it is behind, so one line per request would let
# a host push the agent's own log off it.
_request_log = RateLimit(burst=10, interval=10.0)        # global requests
_refusal_log = RateLimit(burst=10, interval=10.0)        # users and channels refused
_request_error_log = RateLimit(burst=10, interval=10.0)  # channel requests refused


# -- host key and algorithms ----------------------------------------------------------------
def load_host_key(pem: bytes | None):
    """ExecutorConfig.Key (the port layer's PEM RSA key); an ephemeral key without one."""
    if pem:
        return asyncssh.import_private_key(pem)
    log.warning("no ExecutorConfig.Key: the VIC attach uses an ephemeral host key")
    return asyncssh.generate_private_key("ssh-ed25519")


def host_key_algorithms(key) -> list[str]:
    """What this key can sign with. The reference's port layer offers only `ssh-rsa`
    (SHA-1) for RSA host keys; a 512-bit key cannot make rsa-sha2-512 signatures."""
    algs = [a.decode() for a in key.sig_algorithms]
    if key.algorithm == b"ssh-rsa":
        bits = getattr(getattr(key, "pyca_key", None), "key_size", 2048)
        if bits < SMALL_RSA_BITS:
            algs = [a for a in algs if a in ("rsa-sha2-256", "ssh-rsa")]
        if "ssh-rsa" not in algs:
            algs.append("ssh-rsa")
    return algs


def restrict_host_key_algorithms(options, key) -> None:
    """Offer only the signature algorithms `key` can make (asyncssh offers all of them)."""
    allowed = {a.encode() for a in host_key_algorithms(key)}
    for alg in list(options.server_host_keys):
        if alg not in allowed:
            del options.server_host_keys[alg]


# -- authentication ------------------------------------------------------------------------
class VicSSHServer(asyncssh.SSHServer):
    """User `daemon` as the reference accepts it (no credentials), or -- opt-in -- only a
    client that signs with the private half of ExecutorConfig.Key."""

    def __init__(self, link, require_key: bool, key):
        self.link = link
        self.require_key = require_key
        self.key = key

    def connection_made(self, conn) -> None:
        self.link.ssh_connected(conn)

    def connection_lost(self, exc) -> None:
        self.link.ssh_lost(exc)

    def begin_auth(self, username: str) -> bool:
        if username != wire.SSH_USER:
            _refusal_log.log(log, WARNING, "VIC attach: refusing user %s (only %s)",
                             clip(username), wire.SSH_USER)
            return True      # auth required, and nothing will do
        return self.require_key

    def public_key_auth_supported(self) -> bool:
        return self.require_key

    def validate_public_key(self, username: str, key) -> bool:
        return (username == wire.SSH_USER and self.require_key
                and key.public_data == self.key.public_data)


# -- the connection layer -------------------------------------------------------------------
class VicServerConnection(SSHServerConnection):
    """VIC's global requests and its one channel type."""

    vic = None      # the VicService, set per connection
    vic_open = None  # session id -> its attach channels open on this connection

    def _process_global_request(self, _pkttype, _pktid, packet) -> None:
        kind = packet.get_string().decode("ascii", "replace")
        want_reply = packet.get_boolean()
        payload = packet.get_remaining_payload()
        handler = {wire.CONTAINER_IDS: self._vic_container_ids,
                   wire.VERSION: self._vic_version}.get(kind)
        _request_log.log(log, INFO, "VIC attach: global request %s", clip(kind))
        if handler is None:
            ok, reply = False, wire.unknown_global_request(kind).encode()
        else:
            ok, reply = True, handler(payload)
        if want_reply:
            # Go's Request.Reply sends the payload with a failure too (RFC 4254 has none).
            self.send_packet(MSG_REQUEST_SUCCESS if ok else MSG_REQUEST_FAILURE, reply)

    def _vic_container_ids(self, _payload: bytes) -> bytes:
        return wire.encode_name_list(self.vic.container_ids())

    def _vic_version(self, _payload: bytes) -> bytes:
        return wire.encode_uint32(wire.PLUGIN_VERSION)

    def _process_channel_open(self, _pkttype, _pktid, packet) -> None:
        kind = packet.get_string().decode("ascii", "replace")
        send_chan = packet.get_uint32()
        send_window = packet.get_uint32()
        send_pktsize = packet.get_uint32()
        if send_pktsize <= 0:
            raise ProtocolError("Invalid maximum packet size")
        extra = packet.get_remaining_payload()
        try:
            if kind != wire.ATTACH_CHANNEL:
                raise ChannelOpenError(wire.OPEN_UNKNOWN_CHANNEL_TYPE,
                                       wire.unknown_channel_type(kind))
            session = self.vic.check_attach(extra)
            if self.vic_open is None:
                self.vic_open = {}
            if self.vic_open.get(session.id, 0) >= CHANNELS_PER_SESSION:
                raise ChannelOpenError(wire.OPEN_RESOURCE_SHORTAGE, wire.too_many_channels(
                    session.id, CHANNELS_PER_SESSION))
            chan = AttachChannel(self, self._loop, None, "strict", WINDOW, MAX_PACKET)
            self.vic_open[session.id] = self.vic_open.get(session.id, 0) + 1
            chan.process_open(send_chan, send_window, send_pktsize,
                              Attachment(self.vic, session, chan, self.vic_open))
        except ChannelOpenError as exc:
            _refusal_log.log(log, WARNING, "VIC attach: %s", clip(exc.reason, 240))
            self.send_channel_open_failure(send_chan, exc.code, exc.reason, exc.lang)

    _packet_handlers = {**SSHServerConnection._packet_handlers,
                        MSG_GLOBAL_REQUEST: _process_global_request,
                        MSG_CHANNEL_OPEN: _process_channel_open}


class AttachChannel(SSHChannel):
    """An `attach` channel: stdout as data, stderr as extended data 1 (non-tty)."""

    _read_datatypes: set = set()
    _write_datatypes = {wire.EXTENDED_DATA_STDERR}

    def _attachment(self) -> "Attachment":
        return self._session

    def _process_window_change_request(self, packet) -> bool:
        return self._attachment().window_change(packet.get_remaining_payload())

    def _process_close_stdin_request(self, _packet) -> bool:
        return self._attachment().close_stdin()

    def _process_ping_request(self, packet) -> bool:
        return packet.get_remaining_payload() == wire.PING_PAYLOAD

    def _process_unblock_request(self, packet) -> bool:
        return self._attachment().unblock(packet.get_remaining_payload())

    def _process_signal_request(self, packet) -> bool:
        return self._attachment().signal(packet.get_remaining_payload())


class Attachment:
    """One channel on one Session: an output listener and a stdin source."""

    def __init__(self, vic, session, chan: AttachChannel, open_counts: dict):
        self.vic = vic
        self.session = session
        self.chan = chan
        self._open_counts = open_counts     # the connection's, this channel counted
        self.tty = bool(session.config.tty)
        self.attached = False
        self.reading = False        # counts among the session's stdin readers
        self.paused_at = 0.0
        self.input_held = False     # stdin backlog: the channel's input paused

    # asyncssh's session interface
    def connection_made(self, chan) -> None:
        self.attached = True
        self.reading = True
        self.vic.attached(self)
        self.session.output.subscribe(self)
        chan.resume_reading()
        log.info("VIC attach: attached to %s", self.session.id)

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, _datatype) -> None:
        # A process that does not read its input holds the host back through the
        # channel's window, as the reference's blocking write does, instead of the
        # agent holding the input (or dropping it past the session's limit).
        if not self.session.write_stdin(data) and not self.input_held:
            self.input_held = True
            self.chan.pause_reading()
            self.session.when_stdin_drained(self._input_drained)

    def _input_drained(self) -> None:
        self.input_held = False
        if self.attached:
            self.chan.resume_reading()
            self.vic.bridge.kick()      # asyncssh delivers what it held on its next step

    def eof_received(self) -> bool:
        self.vic.input_eof(self)
        return True     # half-close: output keeps flowing

    def connection_lost(self, _exc) -> None:
        self.detach()
        left = self._open_counts.get(self.session.id, 0) - 1
        if left > 0:
            self._open_counts[self.session.id] = left
        else:
            self._open_counts.pop(self.session.id, None)

    def pause_writing(self) -> None:
        self.paused_at = time.monotonic()
        self.vic.hold(self)

    def resume_writing(self) -> None:
        self.paused_at = 0.0
        self.vic.release(self)

    # the output listener (OutputFanout)
    def on_output(self, stream: str, data: bytes) -> None:
        if not self.attached:
            return
        if stream == "stderr" and not self.tty:
            self.vic.bridge.call(self._write, data, wire.EXTENDED_DATA_STDERR)
        else:
            self.vic.bridge.call(self._write, data, None)

    def _write(self, data: bytes, datatype) -> None:
        if self.attached and self.chan._send_state == "open":
            self.chan.write(data, datatype)

    def on_close(self) -> None:
        """The process ended: EOF, then close, as the reference closes its writers."""
        self.vic.bridge.call(self._finish)

    def _finish(self) -> None:
        self.vic.session_ended(self.session)
        if self.chan._send_state == "open":
            self.chan.write_eof()
        self.chan.close()
        self.detach()

    # requests
    def window_change(self, payload: bytes) -> bool:
        if not self.tty:
            _request_error_log.log(log, ERROR, "VIC attach: illegal window-change request "
                                   "for non-tty %s", self.session.id)
            return False
        try:
            cols, rows, _, _ = wire.decode_window_change(payload)
        except ValueError as err:
            _request_error_log.log(log, ERROR, "VIC attach: %s", err)
            return False
        if not (0 < rows < 65536 and 0 < cols < 65536):
            return False
        try:
            self.session.resize(rows, cols)
        except OSError as err:
            _request_error_log.log(log, ERROR, "VIC attach: resize %s: %s", self.session.id,
                                   err)
            return False
        return True

    def close_stdin(self) -> bool:
        self.vic.propagate_eof(self.session)
        return True

    def unblock(self, payload: bytes) -> bool:
        if payload != wire.UNBLOCK_PAYLOAD:
            return False
        if self.session.phase is Phase.FAILED:
            # the reference answers false and aborts the channel, so the caller sees
            # the failure
            self.chan._loop.call_soon(self.chan.close)
            return False
        self.chan._loop.call_soon(self.vic.unblock, self.session)   # after the reply
        return True

    def signal(self, payload: bytes) -> bool:
        from tether.sessions import parse_signal
        try:
            signum = parse_signal(wire.decode_signal(payload))
        except (ValueError, UnicodeDecodeError, struct.error):
            return False
        if not self.session.running:
            return False
        self.session.signal(signum)
        return True

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            self.session.output.unsubscribe(self)
            self.vic.detached(self)
