"""`tether config`: JSON config <-> VMX guestinfo lines.

    tether config encode FILE.json     print `key = "value"` lines (VMX escapes, "" as <nil>)
    tether config decode FILE          print the JSON form ("-" reads stdin)

The lines are what vSphere keeps in a VM's .vmx: empty values are stored as `<nil>`
(an empty option value would delete the key), and read back as empty. `decode` also
reads a JSON object mapping keys to values, told apart from VMX lines by its content.
"""
from __future__ import annotations

import json
import sys

USAGE = """usage: tether config encode FILE.json   print the guestinfo keys as VMX lines
       tether config decode FILE        print the JSON form of VMX lines or of a JSON map
                                        of keys ('-': stdin)"""


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def encode_command(path: str) -> int:
    from extraconfig.transport import NIL, format_vmx

    from .extension import encode_config

    from .jsonform import ConfigError, config_from_json, parse_json

    obj = parse_json(_read(path), path)
    try:
        cfg = config_from_json(obj)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    # as vSphere stores them: an empty value would delete the key, so it is "<nil>"
    entries = {k: (v if v != "" else NIL) for k, v in encode_config(cfg).items()}
    sys.stdout.write(format_vmx(entries))
    return 0


def parse_keys(text: str) -> dict[str, str]:
    """Guestinfo entries from VMX lines or from a JSON object of keys to string values;
    a text whose first character (past blanks) is `{` is the JSON one."""
    from extraconfig.transport import parse_vmx
    if not text.lstrip().startswith("{"):
        return parse_vmx(text)
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(entries, dict):
        raise ValueError("expected VMX lines or a JSON map of keys to strings")
    for key, value in entries.items():
        if not isinstance(value, str):
            raise ValueError(f"a JSON map of keys to strings was expected: {key} is "
                             f"{type(value).__name__} {json.dumps(value)[:40]}")
    return entries


def decode_command(path: str) -> int:
    from extraconfig.transport import NIL

    from .extension import decode_config
    from .jsonform import config_to_json

    try:
        entries = parse_keys(_read(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # the host's reading of a VMX (vmomi.OptionValueMap): "<nil>" is the empty string
    cfg = decode_config({k: (v if v != NIL else "") for k, v in entries.items()})
    json.dump(config_to_json(cfg), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("encode", "decode"):
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, path = argv
    try:
        return encode_command(path) if command == "encode" else decode_command(path)
    except OSError as e:
        print(f"tether config: {e.filename or path}: {e.strerror}", file=sys.stderr)
    except ValueError as e:          # ConfigError, DecodeError, malformed VMX
        print(f"tether config {command}: {e}", file=sys.stderr)
    except RecursionError:
        print(f"tether config {command}: {path}: nested too deeply to read", file=sys.stderr)
    return 1
