"""VIC's SSH request names, payloads and refusal texts (vmware/vic lib/tether/msgs,
cmd/tether/attach.go), as plain functions: no SSH library here.

Payloads are Go's `ssh.Marshal` of small structs: a `[]string` is an SSH name-list
(uint32 length, then the names joined by commas), a `uint32` is 4 bytes big-endian.
Channel-request payloads are raw (not SSH strings): `Ping`, `Unblock`.
"""
from __future__ import annotations

import struct

ATTACH_CHANNEL = "attach"
CONTAINER_IDS = "container-ids"
VERSION = "version"
WINDOW_CHANGE = "window-change"
CLOSE_STDIN = "close-stdin"
PING = "ping"
UNBLOCK = "unblock"
SIGNAL = "signal"
PING_PAYLOAD = b"Ping"
UNBLOCK_PAYLOAD = b"Unblock"

# feature.MaxPluginVersion - 1 at the reference's HEAD; ExecSupportedVersion is 6
# (below it a port layer sends neither ping nor unblock).
PLUGIN_VERSION = 10
EXEC_SUPPORTED_VERSION = 6

SSH_USER = "daemon"
CLIENT_VERSION = "SSH-2.0-VIC"     # what the port layer's client announces

# RFC 4254 channel-open failure codes.
OPEN_ADMINISTRATIVELY_PROHIBITED = 1
OPEN_UNKNOWN_CHANNEL_TYPE = 3
OPEN_RESOURCE_SHORTAGE = 4
EXTENDED_DATA_STDERR = 1


def unknown_global_request(kind: str) -> str:
    return "unknown global request type: " + kind


def unknown_channel_type(kind: str) -> str:
    return f"unknown channel type {kind}"


NO_SESSION_ID = "attach channel requires ID in ExtraData"


def invalid_session(sid: str) -> str:
    return f"session {sid} is invalid"


def launch_failed(started: str) -> str:
    return f"launch failed with: {started}"


def process_finished(exit_status: int) -> str:
    return f"process finished with exit code: {exit_status}"


def too_many_channels(sid: str, limit: int) -> str:
    return f"session {sid} has {limit} attach channels on this connection already"


# A name-list has no escape: Go's ssh.Marshal joins a []string with commas as they are,
# and the port layer's ssh.Unmarshal splits on every comma (vmware/vic
# lib/portlayer/attach/communication/interactor.go ContainerIDs). An ID with a comma
# would reach it as two names that are no session's.
LIST_SEPARATOR = ","


def listable(sid: str) -> bool:
    return LIST_SEPARATOR not in sid


def unlistable_session(sid: str) -> str:
    return (f"session {sid} is not served by the VIC attach: a ',' in its ID would split "
            "the container-ids list, which has no escape")


# -- payloads -------------------------------------------------------------------------------
def encode_name_list(names) -> bytes:
    names = list(names)
    for name in names:
        if not listable(name):
            raise ValueError(f"name-list: {name!r} contains a comma")
    joined = LIST_SEPARATOR.join(names).encode()
    return struct.pack(">I", len(joined)) + joined


def decode_name_list(payload: bytes) -> list[str]:
    if len(payload) < 4:
        raise ValueError("name-list: short payload")
    (size,) = struct.unpack_from(">I", payload)
    if len(payload) < 4 + size:
        raise ValueError("name-list: truncated")
    text = payload[4:4 + size].decode()
    return text.split(",") if text else []


def encode_uint32(value: int) -> bytes:
    return struct.pack(">I", value)


def decode_uint32(payload: bytes) -> int:
    if len(payload) < 4:
        raise ValueError("uint32: short payload")
    return struct.unpack_from(">I", payload)[0]


def encode_window_change(cols: int, rows: int, width_px: int = 0, height_px: int = 0) -> bytes:
    return struct.pack(">IIII", cols, rows, width_px, height_px)


def decode_window_change(payload: bytes) -> tuple[int, int, int, int]:
    """(cols, rows, width_px, height_px) from msgs.WindowChangeMsg."""
    if len(payload) < 16:
        raise ValueError("window-change: short payload")
    return struct.unpack_from(">IIII", payload)


def encode_ssh_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(data)) + data


def decode_signal(payload: bytes) -> str:
    """RFC 4254's signal request: one string, the name without SIG."""
    if len(payload) < 4:
        raise ValueError("signal: short payload")
    (size,) = struct.unpack_from(">I", payload)
    if len(payload) < 4 + size:
        raise ValueError("signal: truncated")
    return payload[4:4 + size].decode()
