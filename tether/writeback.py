"""Publishing the agent's read-write keys through the guestinfo sink.

Only read-write keys reach the transport (the GuestSink drops `/` keys). One session is
written as its own subtree, under the key prefix `calculate_keys` gives for
`Sessions.<id>` (the reference's EncodeWithPrefix).
`started` is what a host waits on, so it always goes out last. Field order alone would
not do it: the model keeps Go's field order (`vmware/vic
lib/config/executor/container_vm.go`), where `diagnostics` (resurrections, exit logs)
follows `started`, so the `started` keys are held back and written after everything else.
A failed write is logged, never fatal: the process goes on and the next write retries.

A config that does not decode is answered too (`config_error`): `started` of every
session the key list still names, and our executor-level key CONFIG_ERROR_KEY.
"""
from __future__ import annotations


from extraconfig.keys import ROOT
from tether.log import DEBUG, get_logger

log = get_logger("tether.writeback")

# Our own read-write key (the reference has none for this), under our prefix `tether`
# spliced after guestinfo.vice. as read-write keys are: why the config could not be used.
CONFIG_ERROR_KEY = ROOT + ".tether.configerror"
MAX_ANSWERED = 1024          # sessions answered at most on a config error
MESSAGE_LIMIT = 1024         # characters of the error text written back


STARTED_SUFFIX = ".started"


class _NoBatch:
    """For transports that write each key as it comes (contextlib.nullcontext's job, but
    contextlib is not loaded on the agent's way to its primary)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


_NO_BATCH = _NoBatch()


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

    def session(self, config, session_config, sid: str | None = None) -> None:
        """The subtree of one session (the map entry `sid`, its common.id by default):
        detail times, status, resurrections, exit logs, then `started`."""
        from extraconfig.codec import calculate_keys, encode_into
        from tether.extension import encode_session_into
        sid = session_config.common.id if sid is None else sid
        try:
            prefix = calculate_keys(config, ["Sessions", sid])[0]
            with self._batch():
                write, flush = started_last(self.sink)
                encode_into(write, session_config, prefix=prefix)
                encode_session_into(write, config, session_config)   # our exit records
                flush()
        except Exception as err:   # noqa: BLE001 - the agent must keep serving
            self.failures += 1
            log.error("could not publish session %s to guestinfo: %s", sid, err,
                      exc_info=log.isEnabledFor(DEBUG))

    def forget_session(self, session_config, sid: str) -> None:
        """Take the keys `session` (`sid` in the map) wrote out of guestinfo: deleted
        where the transport can delete (`info_delete`: the map and VMX-file transports),
        else emptied, which a reader takes as absent (the VMware backdoor and virtio
        guestinfo have no delete)."""
        from extraconfig.codec import calculate_keys, encode_into
        from extraconfig.transport import NIL
        from tether.config import ExecutorConfig
        from tether.extension import encode_session_into
        try:
            prefix = calculate_keys(ExecutorConfig, ["Sessions", sid])[0]
            keys: list[str] = []
            collect = lambda key, _value: keys.append(key)   # noqa: E731
            encode_into(collect, session_config, prefix=prefix)
            encode_session_into(collect, None, session_config)   # our exit records
            delete = getattr(self.transport, "info_delete", None)
            with self._batch():
                for key in keys:
                    if "/" in key:
                        continue          # read-only: the guest never wrote it
                    if delete is not None:
                        delete(key)
                    else:
                        self.transport.info_set(key, NIL)
        except Exception as err:   # noqa: BLE001
            self.failures += 1
            log.error("could not remove session %s from guestinfo: %s", sid, err)

    def runblock_released(self, sid: str) -> None:
        """An attach released RunBlock: its read-write key says false from now on, so a
        restart does not block again (vmware/vic 5ce6ef1f4 made the key read-write; a host
        of the older format never reads it)."""
        from tether.config import run_block_write_key
        try:
            self.sink(run_block_write_key(sid), "false")
        except Exception as err:   # noqa: BLE001 - the write-back must not cost the attach
            self.failures += 1
            log.error("could not publish RunBlock of session %s: %s", sid, err)

    def everything(self, config) -> None:
        """Every read-write key of the executor (network assignments, all sessions)."""
        from extraconfig.codec import encode_into
        from tether.extension import encode_into_sink
        try:
            with self._batch():
                write, flush = started_last(self.sink)
                encode_into(write, config)
                encode_into_sink(write, config)
                flush()
        except Exception as err:   # noqa: BLE001
            self.failures += 1
            log.error("could not publish the configuration to guestinfo: %s", err,
                      exc_info=log.isEnabledFor(DEBUG))

    def config_error(self, message: str, skip=()) -> list[str]:
        """The config could not be decoded: say so in CONFIG_ERROR_KEY, and in `started` of
        every session its key list names (but those in `skip`, at most MAX_ANSWERED),
        so a host waiting on a session learns why. The names answered are returned."""
        from extraconfig.codec import DecodeError, calculate_key, read_map_names
        from extraconfig.transport import GuestSource
        from tether.config import ExecutorConfig
        message = " ".join(message.split())[:MESSAGE_LIMIT]
        self.set_config_error(message)
        try:
            names = read_map_names(GuestSource(self.transport), ExecutorConfig, "Sessions")
        except DecodeError as err:
            log.error("the sessions cannot be named either (%s): only %s says why",
                      err, CONFIG_ERROR_KEY)
            return []
        answered = []
        for name in names:
            if name in skip:
                continue
            if len(answered) >= MAX_ANSWERED:
                log.warning("%d more sessions not answered (at most %d are)",
                            len(names) - len(answered), MAX_ANSWERED)
                break
            if "/" in name:   # a read-write key cannot hold it: the guest never writes it
                continue
            self._write(calculate_key(ExecutorConfig, ["Sessions", name, "Started"]), message)
            answered.append(name)
        return answered

    def set_config_error(self, message: str) -> None:
        """What is wrong with the config, in CONFIG_ERROR_KEY; "" withdraws an error an
        earlier boot or reload left (nothing is written when there is none)."""
        from extraconfig.transport import GuestSource
        message = " ".join(message.split())[:MESSAGE_LIMIT]
        if message or GuestSource(self.transport).get(CONFIG_ERROR_KEY):
            self._write(CONFIG_ERROR_KEY, message)

    def _batch(self):
        """The transport's batch where it has one (a VMX file: one rewrite for a whole
        subtree, which the host then sees at once, `started` with the rest), else none."""
        batch = getattr(self.transport, "batch", None)
        return batch() if batch is not None else _NO_BATCH

    def _write(self, key: str, value: str) -> None:
        try:
            self.sink(key, value)
        except Exception as err:   # noqa: BLE001
            self.failures += 1
            log.error("could not write %s to guestinfo: %s", key, err)
