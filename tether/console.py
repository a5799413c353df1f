"""The agent's console: the log's format and level, where the log goes, and session output
echoed onto it. The console is stderr: a VM's serial console, the sandbox's terminal, or
the log port the log was redirected to."""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("tether.agent")

LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"


def configure_logging(stream=None, level: int = logging.INFO) -> logging.Handler:
    formatter = logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler


DEBUG_ENV = "TETHER_DEBUG"
SECRETS_DEBUG_LEVEL = 3      # below it no secret (args, env, key) reaches the log


def env_debug_level() -> int:
    """The kernel argument tether.debug=N, which stage 0 exports as TETHER_DEBUG: a floor
    under diagnostics.debug, and the level before the config is read."""
    try:
        return int(os.environ.get(DEBUG_ENV, "0") or 0)
    except ValueError:
        return 0


def write_console(data: bytes) -> None:
    """Session output echoed onto the agent log (stderr)."""
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def redirect_log(path: str) -> None:
    """Point stdout and stderr (the agent log) at the log port, as the reference did
    with ttyS1. A port that cannot be opened leaves the log where it was."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_APPEND
                     | (0 if path.startswith("/dev/") else os.O_CREAT), 0o644)
    except OSError as err:
        log.error("cannot open the log port %s: %s; logging to stderr", path, err.strerror)
        return
    if os.isatty(fd):
        from tether import system
        try:
            system.set_raw_tty(fd)
        except OSError as err:
            log.warning("log port %s: %s; leaving the line as it is", path, err.strerror)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    log.info("agent log on %s", path)
