"""Where the agent serves VIC's attach and with which settings (tether/attach/vic/layout.py),
and the wire payloads (tether/attach/vic/wire.py)."""
from __future__ import annotations

import pytest

from helpers import session_config, sid
from tether.attach.vic import layout, wire


def test_vic_layout_by_transport_or_console():
    assert layout.vic_layout("extraconfig.backdoor", ["console=ttyS0"])
    assert layout.vic_layout("extraconfig.virtio", ["quiet", "console=ttyS1,115200n8"])
    assert not layout.vic_layout("extraconfig.virtio", ["console=ttyS0", "quiet"])
    assert not layout.vic_layout("extraconfig.transport", [])
    # the last console= is /dev/console
    assert layout.kernel_console(["console=ttyS1", "console=tty0"]) == "tty0"
    assert layout.kernel_console(["console=tty0", "console=ttyS1,115200n8"]) == "ttyS1"


def test_settings_options_then_kernel_arguments():
    assert layout.settings(None, []) == ("head", False)
    assert layout.settings(None, ["tether.vic_handshake=v0.9", "tether.vic_auth=key"]) == \
        ("v0.9", True)
    assert layout.settings({"handshake": "auto", "auth": "none"},
                           ["tether.vic_handshake=v0.9", "tether.vic_auth=key"]) == ("auto", False)
    with pytest.raises(ValueError):
        layout.settings({"auth": "password"}, [])
    with pytest.raises(ValueError):
        layout.settings({"handshake": "v2"}, [])


def test_a_released_runblock_is_written_as_heads_read_write_key():
    from extraconfig.transport import MapTransport
    from tether.writeback import WriteBack
    primary = session_config(sid(), ["/bin/true"], run_block=True)
    store = {}
    WriteBack(MapTransport(store)).runblock_released(primary.id)
    assert store == {f"guestinfo.vice..sessions|{primary.id}.runblock": "false"}


def test_wire_payloads_are_gos_marshal_forms():
    assert wire.encode_name_list(["abc", "def"]) == b"\x00\x00\x00\x07abc,def"
    assert wire.encode_name_list([]) == b"\x00\x00\x00\x00"
    assert wire.decode_name_list(b"\x00\x00\x00\x07abc,def") == ["abc", "def"]
    assert wire.encode_uint32(10) == b"\x00\x00\x00\x0a"
    assert wire.decode_window_change(bytes.fromhex("00000050" "00000018" "00000000" "00000000")) \
        == (80, 24, 0, 0)
    assert wire.decode_signal(b"\x00\x00\x00\x04TERM") == "TERM"
    with pytest.raises(ValueError):
        wire.decode_window_change(b"\x00" * 15)
    assert wire.invalid_session("x") == "session x is invalid"
    assert wire.unknown_global_request("y") == "unknown global request type: y"
