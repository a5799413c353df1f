"""`tether logs`: print a session output log (iolog framing) with times and session IDs."""
from __future__ import annotations

import argparse
import sys

from tether.iolog import PRIMARY_LABEL, FramingError, format_time, parse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tether logs", description="Print a session output log (iolog framing).")
    parser.add_argument("file", help="the output log (a file, or - for stdin)")
    parser.add_argument("--session", help=f"only this session ID ('{PRIMARY_LABEL}': "
                        "the untagged entries, i.e. the primary session)")
    parser.add_argument("--raw", action="store_true", help="payload only, no timestamps")
    args = parser.parse_args(argv)
    try:
        blob = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    except OSError as err:
        print(f"tether logs: cannot read {args.file}: {err.strerror}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    try:
        write_entries(blob, out, args.session, args.raw)
    except FramingError as err:
        out.flush()
        print(f"tether logs: {args.file}: {err}", file=sys.stderr)
        return 1
    out.flush()
    return 0


def write_entries(blob: bytes, out, session: str | None = None, raw: bool = False) -> None:
    """Write the entries of output log `blob` to binary stream `out` as `tether logs` shows
    them: `<time> <session> <stream> <line>`, or the payload alone with `raw`; only
    `session`'s when given. FramingError at a damaged or truncated entry, after writing
    those before it."""
    for entry in parse(blob):
        label = entry.session if entry.session is not None else PRIMARY_LABEL
        if session is not None and label != session:
            continue
        if raw:
            out.write(entry.data)
            continue
        stream = "stderr" if entry.stream else "stdout"
        out.write(f"{format_time(entry.when_ns)} {label} {stream} ".encode())
        out.write(entry.data if entry.data.endswith(b"\n") else entry.data + b"\n")
