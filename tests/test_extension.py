"""Our config extension (tether/extension.py): its keys under the `tether` prefix, the
JSON form's fields, and that neither VIC's keys nor our decoder of VIC's model notice it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from extraconfig.codec import decode, encode
from extraconfig.transport import GuestSink, GuestSource, MapTransport
from helpers import executor_config, session_config
from tether.config import ExecutorConfig, ExitRecord, Hook, Limits, run_block_write_key
from tether.extension import decode_config, encode_config, encode_session_into
from tether.jsonform import ConfigError, config_from_json, config_to_json

VECTORS = Path(__file__).parent / "data" / "tether-extension.jsonl"
OURS = ("guestinfo.vice./tether/", "guestinfo.vice./tether", "guestinfo.vice..tether.")


def records():
    with open(VECTORS) as f:
        return [json.loads(line) for line in f if line.strip()]


def ours(keys: dict) -> dict:
    return {k: v for k, v in keys.items() if k.startswith(OURS)}


VECTOR_CASES = [r for r in records() if r["kind"] == "extension"]


@pytest.mark.parametrize("record", VECTOR_CASES, ids=[r["name"] for r in VECTOR_CASES])
def test_public_vectors_encode_to_exactly_these_keys(record):
    cfg = config_from_json(record["json"])
    assert ours(encode_config(cfg)) == record["keys"]


@pytest.mark.parametrize("record", VECTOR_CASES, ids=[r["name"] for r in VECTOR_CASES])
def test_public_vectors_decode_back_to_their_json(record):
    keys = encode(config_from_json(record["json"]))
    keys.update(record["keys"])
    assert config_to_json(decode_config(keys)) == record["json"]


@pytest.mark.parametrize("record", VECTOR_CASES, ids=[r["name"] for r in VECTOR_CASES])
def test_the_vic_keys_are_exactly_what_the_vic_encoder_writes(record):
    cfg = config_from_json(record["json"])
    everything = encode_config(cfg)
    vic = {k: v for k, v in everything.items() if k not in ours(everything)}
    assert vic == encode(cfg)


def test_every_key_of_ours_is_under_the_tether_prefix():
    cfg = config_from_json(VECTOR_CASES[0]["json"])
    for key in set(encode_config(cfg)) - set(encode(cfg)):
        assert key.startswith(("guestinfo.vice./tether/", "guestinfo.vice..tether.")), key


class Recording:
    """A source that remembers every key it was asked for."""

    def __init__(self, data):
        self.data = data
        self.asked: list[str] = []

    def get(self, key, default=None):
        self.asked.append(key)
        return self.data.get(key, default)


def test_our_decoder_of_the_vic_model_never_asks_for_our_keys():
    record = next(r for r in VECTOR_CASES if r["name"] == "hooks")
    cfg = config_from_json(record["json"])
    cfg.sessions["web"].limits = Limits(memory_bytes=1 << 25, pids=20)
    everything = encode_config(cfg)
    source = Recording(everything)
    with_ours = decode(source, ExecutorConfig)
    assert source.asked and not [k for k in source.asked if "tether" in k]
    without = decode({k: v for k, v in everything.items() if k not in ours(everything)},
                     ExecutorConfig)
    assert with_ours == without
    # and the VIC model read that way carries none of our settings
    assert with_ours.sessions["web"].limits == Limits()
    assert not with_ours.hooks.any()


def test_the_json_form_of_limits_is_exactly_this():
    text = '{"sessions": {"web": {"limits": {"memory_bytes": 33554432, "cpus": 0.2, "pids": 20}}}}'
    cfg = config_from_json(json.loads(text))
    assert cfg.sessions["web"].limits == Limits(memory_bytes=33554432, cpus=0.2, pids=20)
    assert config_to_json(cfg)["sessions"]["web"]["limits"] == {
        "memory_bytes": 33554432, "cpus": 0.2, "pids": 20}


@pytest.mark.parametrize("limits", [{"memory_bytes": 1 << 20}, {"cpus": 1}, {"pids": 5},
                                    {"cpu_mhz": 800}, {}])
def test_each_limit_is_optional(limits):
    cfg = config_from_json({"sessions": {"web": {"limits": limits}}})
    back = decode_config(encode_config(cfg))
    assert config_to_json(back)["sessions"]["web"].get("limits", {}) == limits


def test_a_misspelt_limit_is_refused_with_its_path():
    with pytest.raises(ConfigError, match=r"sessions\.web\.limits\.memory: unknown field"):
        config_from_json({"sessions": {"web": {"limits": {"memory": 5}}}})


def test_an_empty_keep_list_is_not_the_default_set():
    none = decode_config(encode_config(config_from_json(
        {"sessions": {"a": {"capabilities": []}}})))
    default = decode_config(encode_config(config_from_json({"sessions": {"a": {}}})))
    assert none.sessions["a"].capabilities == []
    assert default.sessions["a"].capabilities is None
    assert config_to_json(none)["sessions"]["a"] == {"capabilities": []}


def test_exit_records_go_back_through_the_guest_sink_as_read_write_keys():
    cfg = config_from_json({"common": {"id": "web"}, "sessions": {"web": {}}})
    session = cfg.sessions["web"]
    session.exit_records = [ExitRecord(exit_code=137, signal=9, oom_killed=True, reason="oom")]
    store = MapTransport()
    encode_session_into(GuestSink(store), cfg, session)
    # read-only keys never leave the guest; the records do
    assert all("/" not in k for k in store.data)
    assert store.data["guestinfo.vice..tether.sessions|web.exitrecords|0.oomkilled"] == "true"
    assert store.data["guestinfo.vice..tether.sessions|web.exitrecords|0.reason"] == "oom"
    # the host reads them back alongside the config it wrote
    host = encode_config(cfg)
    host.update({k: ("" if v == "<nil>" else v) for k, v in store.data.items()})
    back = decode_config(GuestSource(MapTransport(host)))
    assert back.sessions["web"].exit_records[0].oom_killed is True
    assert back.sessions["web"].exit_records[0].exit_code == 137


def test_hooks_keep_their_order_and_fields():
    cfg = config_from_json({"hooks": {"prestart": [
        {"path": "/a", "args": ["a", "x y"], "env": ["K=V"], "timeout": 3}, {"path": "/b"}]}})
    back = decode_config(encode_config(cfg))
    assert [h.path for h in back.hooks.prestart] == ["/a", "/b"]
    assert back.hooks.prestart[0] == Hook(path="/a", args=["a", "x y"], env=["K=V"], timeout=3)


def test_a_reload_takes_the_hosts_extension_fields_and_keeps_our_records():
    from tether.config import take_host_fields
    from tether.extension import take_host_extension
    ours = config_from_json({"common": {"id": "web"}, "sessions": {"web": {
        "limits": {"pids": 5}, "exit_records": [{"exit_code": 3, "reason": "exited"}]}}})
    session = ours.sessions["web"]
    fresh = decode_config(encode_config(config_from_json({
        "common": {"id": "web"}, "hooks": {"poststop": [{"path": "/bin/true"}]},
        "sessions": {"web": {"limits": {"memory_bytes": 1 << 25}, "capabilities": []}}})))
    take_host_fields(ours, fresh)
    take_host_extension(ours, fresh)
    assert ours.sessions["web"] is session           # the live object, updated in place
    assert session.limits == Limits(memory_bytes=1 << 25)
    assert session.capabilities == []
    assert [h.path for h in ours.hooks.poststop] == ["/bin/true"]
    assert [r.exit_code for r in session.exit_records] == [3]


@pytest.mark.parametrize("read_only, read_write, blocks", [
    ("true", None, True),        # a port layer before VIC v1.2: the read-only key
    (None, "true", True),        # v1.2 and later (vmware/vic 5ce6ef1f4): the read-write key
    ("true", "false", False),    # both: the read-write key wins (the agent writes it)
    ("false", "true", True),
    (None, None, False),
])
def test_run_block_is_read_from_either_key(read_only, read_write, blocks):
    blocked = session_config("blocked", ["/bin/true"])
    other = session_config("b", ["/bin/true"])
    keys = encode_config(executor_config(blocked, other))
    ro_key = "guestinfo.vice./sessions|blocked/runblock"
    assert keys.pop(ro_key) == "false" and run_block_write_key("blocked") == \
        "guestinfo.vice..sessions|blocked.runblock"
    if read_only is not None:
        keys[ro_key] = read_only
    if read_write is not None:
        keys[run_block_write_key("blocked")] = read_write
    for source in (keys, GuestSource(MapTransport(dict(keys)))):
        config = decode_config(source)
        assert config.sessions["blocked"].run_block is blocks
        assert config.sessions["b"].run_block is False
