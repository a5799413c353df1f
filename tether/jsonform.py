"""The human JSON form of ExecutorConfig (documented in docs/config.md).

Names are the dataclasses' snake_case attribute names. Addresses are text
(`"10.0.0.2/24"`, `"8.8.8.8"`; IPv4 text becomes the 4-byte form), times RFC 3339,
the key base64, a mount's source a URL (`"label://data"`, `"nfs://host/path"`).
Sessions, networks and mounts are objects keyed by ID or name; a session's or
network's `common.id` defaults to its key. Zero values are left out when writing,
so `config_to_json(config_from_json(x))` is a stable, minimal form.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import types
import typing
import urllib.parse
from typing import Any, Union

from extraconfig.gotime import GoTime
from extraconfig.types import IP, URL, IPNet, Userinfo

from .config import ExecutorConfig, NetworkEndpoint, SessionConfig


class ConfigError(ValueError):
    """The JSON config is malformed; the message names the path (e.g. sessions.web.cmd)."""


# --------------------------------------------------------------------------- leaves

def ip_to_text(ip: bytes) -> str:
    return str(IP(ip)) if ip else ""


def ip_from_text(text: str, path: str) -> IP:
    try:
        return IP.parse(text)
    except ValueError:
        raise ConfigError(f"{path}: {text!r} is not an IP address") from None


def ipnet_from_text(text: str, path: str) -> IPNet:
    try:
        return IPNet.parse(text)
    except ValueError:
        raise ConfigError(f"{path}: {text!r} is not an address or CIDR like 10.0.0.2/24") from None


_PATH_SAFE = "/:@!$&'()*+,;=~"


def url_to_text(u: URL) -> str:
    """Go's url.URL.String(), for the fields the wire keeps."""
    out = ""
    if u.scheme:
        out += u.scheme + ":"
    if u.opaque:
        out += u.opaque
    else:
        if u.scheme or u.host or u.user is not None:
            out += "//"
            if u.user is not None:
                out += urllib.parse.quote(u.user.username, safe="")
                if u.user.password is not None:
                    out += ":" + urllib.parse.quote(u.user.password, safe="")
                out += "@"
            out += u.host
        path = u.raw_path or urllib.parse.quote(u.path, safe=_PATH_SAFE)
        if path and not path.startswith("/") and (u.host or u.scheme):
            path = "/" + path
        out += path
    if u.force_query or u.raw_query:
        out += "?" + u.raw_query
    if u.fragment:
        out += "#" + urllib.parse.quote(u.fragment, safe=_PATH_SAFE + "?")
    return out


def url_from_text(text: str, path: str) -> URL:
    """Go's url.Parse for the common shapes: scheme://[user@]host/path?query#fragment."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as e:
        raise ConfigError(f"{path}: {text!r} is not a URL: {e}") from None
    u = URL(scheme=parts.scheme, raw_query=parts.query,
            fragment=urllib.parse.unquote(parts.fragment))
    u.force_query = text.split("#", 1)[0].endswith("?") and not parts.query
    rest = text[len(parts.scheme) + 1:] if parts.scheme else text
    if parts.scheme and not rest.startswith("/"):
        u.opaque = rest.split("?", 1)[0].split("#", 1)[0]
        return u
    if parts.netloc or rest.startswith("//"):
        userinfo, _, host = parts.netloc.rpartition("@")
        u.host = host
        if _:
            name, colon, password = userinfo.partition(":")
            u.user = Userinfo(urllib.parse.unquote(name),
                              urllib.parse.unquote(password) if colon else None)
    u.path = urllib.parse.unquote(parts.path)
    if urllib.parse.quote(u.path, safe=_PATH_SAFE) != parts.path:
        u.raw_path = parts.path
    return u


def time_to_text(t: GoTime) -> str:
    return t.to_rfc3339()


def time_from_text(text: str, path: str) -> GoTime:
    try:
        return GoTime.from_rfc3339(text)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


# ------------------------------------------------------------------ generic walk

def _optional_arg(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _from(tp: Any, value: Any, path: str) -> Any:
    inner = _optional_arg(tp)
    if inner is not None:
        return None if value is None else _from(inner, value, path)
    origin = typing.get_origin(tp)

    def want(kind: type | tuple[type, ...], what: str) -> None:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {what}, got {_type_name(value)}")

    if origin is list:
        want(list, "an array")
        (elem,) = typing.get_args(tp)
        return [_from(elem, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        want(dict, "an object")
        _, vt = typing.get_args(tp)
        return {k: _from(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is IPNet:
        want(str, "an address like 10.0.0.2/24")
        return ipnet_from_text(value, path) if value else IPNet()
    if tp is URL:
        want(str, "a URL like label://data")
        return url_from_text(value, path)
    if tp is GoTime:
        want(str, "an RFC 3339 time")
        return time_from_text(value, path)
    if tp is IP:
        want(str, "an IP address")
        return ip_from_text(value, path) if value else IP(b"")
    if isinstance(tp, type) and issubclass(tp, bytes):
        want(str, "base64 text")
        try:
            return tp(base64.b64decode(value.encode("ascii"), validate=True))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise ConfigError(f"{path}: not valid base64") from None
    if tp is bool:
        want(bool, "true or false")
        return value
    if tp is int:
        want(int, "an integer")
        return value
    if tp is float:
        want((int, float), "a number")
        return float(value)
    if tp is str:
        want(str, "a string")
        return value
    if dataclasses.is_dataclass(tp):
        want(dict, "an object")
        return _struct_from(tp, value, path)
    raise ConfigError(f"{path}: unsupported type {tp!r}")


def _struct_from(cls: type, obj: dict, path: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in obj if k not in hints]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown field (known: {', '.join(names)})")
    result = cls()
    for name, value in obj.items():
        setattr(result, name, _from(hints[name], value, f"{path}.{name}" if path else name))
    return result


def _is_zero(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, (str, bytes, list, dict)):
        return not value
    if isinstance(value, (IPNet, GoTime)):
        return value.is_zero()
    return False


def _to(tp: Any, value: Any) -> Any:
    inner = _optional_arg(tp)
    if inner is not None:
        return None if value is None else _to(inner, value)
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp)
        return [_to(elem, v) for v in value]
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _to(vt, v) for k, v in value.items()}
    if isinstance(value, IPNet):
        return str(value)
    if isinstance(value, URL):
        return url_to_text(value)
    if isinstance(value, GoTime):
        return time_to_text(value)
    if isinstance(value, IP) or tp is IP:
        return ip_to_text(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value):
        return _struct_to(value)
    return value


def _struct_to(obj: Any) -> dict:
    hints = _hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_zero(value):
            continue
        text = _to(hints[f.name], value)
        if text == {} and dataclasses.is_dataclass(value):
            continue
        out[f.name] = text
    return out


# ---------------------------------------------------------------------------- API

def config_from_json(obj: dict) -> ExecutorConfig:
    """An ExecutorConfig from its JSON form; ConfigError names the offending path."""
    if not isinstance(obj, dict):
        raise ConfigError(f"the config must be a JSON object, got {_type_name(obj)}")
    for section in ("sessions", "networks", "mounts", "annotations"):
        entries = obj.get(section)
        if isinstance(entries, dict):
            for name in entries:
                _check_name(section, name)
    obj = _trust_levels_from_text(obj)
    cfg = _struct_from(ExecutorConfig, obj, "")
    for sid, session in (cfg.sessions or {}).items():
        if session is not None and not session.common.id:
            session.common.id = sid
    for name, endpoint in (cfg.networks or {}).items():
        if endpoint is not None:
            if not endpoint.common.id:
                endpoint.common.id = name
            if not endpoint.network.common.name:
                endpoint.network.common.name = name
    return cfg


def _check_name(section: str, name: str) -> None:
    """IDs and names become parts of guestinfo keys; refuse those the format breaks on
    (tether.config.check_id; annotation keys may hold anything but '|')."""
    from tether.config import InvalidID, check_id
    if section == "annotations":
        if name == "" or "|" in name:
            raise ConfigError(f"annotations: key {name!r} is invalid: empty, or '|' "
                              "(which separates the names in the key list)")
        return
    try:
        check_id(name, "the name")
    except InvalidID as err:
        raise ConfigError(f"{section}.{name}: {err}" if name else f"{section}: {err}") from None


def config_to_json(cfg: ExecutorConfig) -> dict:
    """The minimal JSON form: zero values left out, IDs equal to their keys left out."""
    out = _struct_to(cfg)
    if cfg.scrub_secrets is False:
        out["scrub_secrets"] = False   # "never", unlike absent (the transport's default)
    _trust_levels_to_text(out)
    for sid, session in (out.get("sessions") or {}).items():
        _drop_default_id(session, sid)
        if session is not None and (cfg.sessions or {})[sid].capabilities == []:
            session["capabilities"] = []   # "keep none", unlike absent (the default set)
    for name, endpoint in (out.get("networks") or {}).items():
        _drop_default_id(endpoint, name)
        if endpoint is not None:
            net = endpoint.get("network", {})
            if net.get("common", {}).get("name") == name:
                del net["common"]["name"]
                if not net["common"]:
                    del net["common"]
                if not net:
                    del endpoint["network"]
    return out


def _trust_levels_from_text(obj: dict) -> dict:
    """`network.trust_level` is written as its name ("published", "peers", ...); the wire
    and the dataclass hold the reference's int. A copy is returned; the input is kept."""
    networks = obj.get("networks")
    if not isinstance(networks, dict):
        return obj
    from tether.network.ports import TrustLevel
    fixed = {}
    for name, endpoint in networks.items():
        network = endpoint.get("network") if isinstance(endpoint, dict) else None
        level = network.get("trust_level") if isinstance(network, dict) else None
        if isinstance(level, str):
            try:
                level = int(TrustLevel.parse(level))
            except ValueError as err:
                raise ConfigError(f"networks.{name}.network.trust_level: {err}") from None
            endpoint = {**endpoint, "network": {**network, "trust_level": level}}
        fixed[name] = endpoint
    return {**obj, "networks": fixed}


def _trust_levels_to_text(out: dict) -> None:
    from tether.network.ports import TrustLevel
    for endpoint in (out.get("networks") or {}).values():
        network = (endpoint or {}).get("network") or {}
        level = network.get("trust_level")
        if isinstance(level, int) and level in iter(TrustLevel):
            network["trust_level"] = TrustLevel(level).text


def _drop_default_id(entry: dict | None, key: str) -> None:
    if entry is None:
        return
    common = entry.get("common", {})
    if common.get("id") == key:
        del common["id"]
        if not common:
            del entry["common"]


def parse_json(text: str, where: str):
    """JSON text as Python values; ConfigError (naming `where`) for text that is not JSON
    or is nested too deeply to read (Python's parser recurses)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the JSON is nested too deeply to read") from None


def load_config(path: str) -> ExecutorConfig:
    """Read a JSON config file; errors name the file and the path inside it."""
    with open(path, encoding="utf-8") as f:
        obj = parse_json(f.read(), path)
    try:
        return config_from_json(obj)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


__all__ = ["ConfigError", "config_from_json", "config_to_json", "load_config", "parse_json",
           "ExecutorConfig", "SessionConfig", "NetworkEndpoint"]
