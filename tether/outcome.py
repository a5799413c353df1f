"""A run's outcome as the host side reads it from the final guestinfo map: the primary
session's exit code, as `docker run` reports one, and why there is none when there is
none. `tether vm` and `tether vsphere run` both end with it."""
from __future__ import annotations

import re
import signal
from typing import NamedTuple

EXIT_TIMEOUT = 124        # the launcher gave up waiting (timeout(1)'s status)
EXIT_NOT_STARTED = 127    # the primary did not start (a shell's "could not run it")
SIGNAL_LIMIT = 65         # Linux's signals are 1..64


class Outcome(NamedTuple):
    config: object | None    # the final map decoded (an ExecutorConfig), None if it is not
    exit_code: int           # the primary's status; 128+N when signal N killed it
    reason: str              # what went wrong, for the user; "" when nothing did


def primary_outcome(final: dict[str, str]) -> Outcome:
    """The outcome of the primary session (the one with the executor's ID) in `final`."""
    from tether.extension import decode_config
    try:
        decoded = decode_config(final)
    except Exception as err:   # noqa: BLE001 - report, don't crash the launcher
        return Outcome(None, 1, f"the final guestinfo does not decode: {err}")
    primary = (decoded.sessions or {}).get(decoded.id)
    if primary is None:
        return Outcome(decoded, 1, "the config has no primary session (one with the ID "
                                   f"{decoded.id!r})")
    if primary.started != "true":
        return Outcome(decoded, EXIT_NOT_STARTED,
                       f"the primary did not start: {primary.started}" if primary.started
                       else "the primary never started")
    if primary.exit_status == -1:
        return Outcome(decoded, 128 + signal_of(primary), "")
    return Outcome(decoded, primary.exit_status & 0xFF, "")


def signal_of(session) -> int:
    """The signal that killed a session whose status is -1: the last exit log naming one
    (`signal 15`, `SIGTERM`), else SIGKILL (the kernel's, which leaves no message)."""
    for entry in reversed(session.diagnostics.exit_logs or []):
        # the guest writes these: a number no signal has is not taken (nor parsed whole)
        match = re.search(r"signal (\d{1,3})\b|SIG([A-Z]+)", getattr(entry, "message", "") or "")
        if match and match.group(1):
            number = int(match.group(1))
            if 0 < number < SIGNAL_LIMIT:
                return number
            continue
        if match:
            try:
                return int(signal.Signals["SIG" + match.group(2)])
            except KeyError:
                pass
    return int(signal.SIGKILL)
