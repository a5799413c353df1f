"""Publishing the agent's read-write keys through the guestinfo sink.

Only read-write keys reach the transport (the GuestSink drops `/` keys). One session is
written as its own subtree, under the key prefix `calculate_keys` gives for
`Sessions.<id>` (the reference's EncodeWithPrefix).
`started` is what a host waits on, so it always goes out last. Field order alone would
not do it: the model keeps Go's field order (`vmware/vic
lib/config/executor/container_vm.go`), where `diagnostics` (resurrections, exit logs)
follows `started`, so the `started` keys are held back and written after everything else.
A failed write is logged, never fatal: the process goes on and the next write retries.
"""
from __future__ import annotations

import logging

log = logging.getLogger("tether.writeback")


STARTED_SUFFIX = ".started"


def started_last(sink):
    """A sink that passes pairs on at once, except `started` keys, released by `flush()`."""
    held: list[tuple[str, str]] = []

    def write(key: str, value: str) -> None:
        if key.endswith(STARTED_SUFFIX):
            held.append((key, value))
        else:
            sink(key, value)

    def flush() -> None:
        for key, value in held:
            sink(key, value)
        held.clear()

    return write, flush


class WriteBack:
    def __init__(self, transport):
        from extraconfig.transport import GuestSink
        self.transport = transport
        self.sink = GuestSink(transport)
        self.failures = 0

    def session(self, config, session_config) -> None:
        """The subtree of one session: detail times, status, resurrections, exit logs,
        then `started`."""
        from extraconfig.codec import calculate_keys, encode_into
        from tether.extension import encode_session_into
        sid = session_config.common.id
        try:
            prefix = calculate_keys(config, f"Sessions.{sid}")[0]
            write, flush = started_last(self.sink)
            encode_into(write, session_config, prefix=prefix)
            encode_session_into(write, config, session_config)   # our exit records
            flush()
        except Exception as err:   # noqa: BLE001 - the agent must keep serving
            self.failures += 1
            log.error("could not publish session %s to guestinfo: %s", sid, err,
                      exc_info=log.isEnabledFor(logging.DEBUG))

    def everything(self, config) -> None:
        """Every read-write key of the executor (network assignments, all sessions)."""
        from extraconfig.codec import encode_into
        from tether.extension import encode_into_sink
        try:
            write, flush = started_last(self.sink)
            encode_into(write, config)
            encode_into_sink(write, config)
            flush()
        except Exception as err:   # noqa: BLE001
            self.failures += 1
            log.error("could not publish the configuration to guestinfo: %s", err,
                      exc_info=log.isEnabledFor(logging.DEBUG))
