"""The agent's loggers: `get_logger(name)` with the methods of a `logging.Logger` the
agent uses, writing the console's line format without the logging package, which costs
PID 1's startup more than any other import (it pulls re, traceback, string, weakref).

    2026-05-04T10:11:12.345Z INFO tether.agent: serving 1 session(s)

Lines go to the console (tether/console.py) once `configure` has been called: by
`tether agent` and the sandbox, i.e. in the agent's own process. Until then, a process
that merely imports tether modules (the tests, the host-side commands) gets each record
through the logging package, under the same logger name, as it always did: caplog,
handlers and levels set there see them.

One level holds for every `tether.*` logger (`set_level`), as the one `tether` logger's
did.
"""
from __future__ import annotations

import sys
import time

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR",
               CRITICAL: "CRITICAL"}
# The format is logging's "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
# with asctime "%Y-%m-%dT%H:%M:%S" in UTC; tests/test_log.py holds the two to the same bytes.
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


class _Output:
    """Where lines go once configured: `write(bytes)` (the console writer), or a text
    stream; `level` for every tether logger."""
    configured = False
    write = None
    stream = None
    level = INFO
    dropped = 0


_out = _Output()


def configure(level: int = INFO, stream=None, writer=None) -> None:
    """From now on write lines to `writer(bytes)` (or the text `stream`), at `level`."""
    _out.configured = True
    _out.level = level
    _out.stream = stream
    _out.write = writer


def set_level(level: int) -> None:
    if _out.configured:
        _out.level = level
    else:
        import logging
        logging.getLogger("tether").setLevel(level)


def format_line(name: str, level: int, message: str, when: float,
                exc_info=None) -> str:
    """One record as the console shows it (without the newline)."""
    line = (f"{time.strftime(DATE_FORMAT, time.gmtime(when))}."
            f"{int((when - int(when)) * 1000):03d}Z {LEVEL_NAMES.get(level, f'Level {level}')} "
            f"{name}: {message}")
    if exc_info:
        import traceback
        text = "".join(traceback.format_exception(*exc_info)).removesuffix("\n")
        line = f"{line}\n{text}" if line[-1:] != "\n" else line + text
    return line


def _message(msg, args) -> str:
    text = str(msg)
    if args:
        if len(args) == 1 and isinstance(args[0], dict) and args[0]:
            args = args[0]      # logging's rule: one mapping argument is the mapping
        text = text % args
    return text


class Logger:
    """The part of `logging.Logger` the agent uses."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def isEnabledFor(self, level: int) -> bool:   # noqa: N802 - logging's name
        if _out.configured:
            return level >= _out.level
        import logging
        return logging.getLogger(self.name).isEnabledFor(level)

    def _emit(self, level: int, msg, args, exc_info) -> None:
        if not _out.configured:
            import logging
            logging.getLogger(self.name).log(level, msg, *args, exc_info=exc_info,
                                             stacklevel=3)   # the caller of our method
            return
        if level < _out.level:
            return
        if exc_info:   # as logging takes it: True, an exception, or a sys.exc_info() tuple
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            elif not isinstance(exc_info, tuple):
                exc_info = sys.exc_info()
        try:
            line = format_line(self.name, level, _message(msg, args), time.time(), exc_info)
            if _out.write is not None:
                _out.write((line + "\n").encode("utf-8", "backslashreplace"))
            elif _out.stream is not None:
                _out.stream.write(line + "\n")
                _out.stream.flush()
        except Exception:   # noqa: BLE001 - a bad format or a full console: count, go on
            _out.dropped += 1

    def log(self, level: int, msg, *args, exc_info=None) -> None:
        self._emit(level, msg, args, exc_info)

    def debug(self, msg, *args, exc_info=None) -> None:
        self._emit(DEBUG, msg, args, exc_info)

    def info(self, msg, *args, exc_info=None) -> None:
        self._emit(INFO, msg, args, exc_info)

    def warning(self, msg, *args, exc_info=None) -> None:
        self._emit(WARNING, msg, args, exc_info)

    def error(self, msg, *args, exc_info=None) -> None:
        self._emit(ERROR, msg, args, exc_info)

    def critical(self, msg, *args, exc_info=None) -> None:
        self._emit(CRITICAL, msg, args, exc_info)

    def exception(self, msg, *args, exc_info=True) -> None:
        self._emit(ERROR, msg, args, exc_info)


_loggers: dict[str, Logger] = {}


def get_logger(name: str) -> Logger:
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger
