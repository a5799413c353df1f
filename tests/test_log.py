"""The agent's own loggers (tether/log.py) write the lines the logging package wrote with
the agent's former format, byte for byte; before `configure` they hand records to the
logging package."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO

# What tether/console.py configured the logging package with before tether/log.py.
LOGGING_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
LOGGING_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def logging_line(name: str, level: int, msg: str, args: tuple, when: float,
                 exc_info=None) -> str:
    formatter = logging.Formatter(LOGGING_FORMAT, LOGGING_DATE_FORMAT)
    formatter.converter = time.gmtime
    record = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    record.created = when
    record.msecs = int((when - int(when)) * 1000) + 0.0
    return formatter.format(record)


def failure():
    try:
        {}["missing"]
    except KeyError:
        return sys.exc_info()


@pytest.mark.parametrize("level", [10, 20, 30, 40, 50, 25])
@pytest.mark.parametrize("when", [0.0, 1700000000.999, 1780000000.0005, 1712345678.5])
def test_a_line_is_the_bytes_logging_wrote(level, when):
    from tether.log import _message, format_line
    for msg, args in [("plain", ()), ("session %s started: pid %d", ("abc", 42)),
                      ("a map %(x)s", ({"x": "y"},)), ("percent %% kept", ()),
                      ("non-ascii \u00e9 \u2603 %r", (b"\xff",))]:
        ours = format_line("tether.agent", level, _message(msg, args), when)
        assert ours == logging_line("tether.agent", level, msg, args, when)


def test_a_traceback_follows_the_line_as_logging_wrote_it():
    from tether.log import _message, format_line
    exc_info = failure()
    ours = format_line("tether.sessions", 40, _message("step %s failed", ("x",)),
                       1712345678.25, exc_info)
    assert ours == logging_line("tether.sessions", 40, "step %s failed", ("x",),
                                1712345678.25, exc_info)
    assert "KeyError: 'missing'" in ours


def test_configured_loggers_write_lines_at_the_level_set():
    from tether import log
    saved = (log._out.configured, log._out.level, log._out.stream, log._out.write)
    stream = io.StringIO()
    try:
        log.configure(log.INFO, stream=stream)
        logger = log.get_logger("tether.test")
        logger.debug("not shown")
        logger.info("shown %d", 1)
        log.set_level(log.DEBUG)
        logger.debug("now shown")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logger.info("bad format %d", "x")      # counted, not raised
    finally:
        (log._out.configured, log._out.level, log._out.stream, log._out.write) = saved
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("Z INFO tether.test: shown 1")
    assert lines[1].endswith("Z DEBUG tether.test: now shown")
    assert lines[2].endswith("Z ERROR tether.test: failed")
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
    assert not any("not shown" in line or "bad format" in line for line in lines)


def test_before_configure_records_go_to_the_logging_package(caplog):
    from tether.log import get_logger
    with caplog.at_level(logging.INFO, logger="tether.test"):
        get_logger("tether.test").warning("handed over %s", "here")
    records = [r for r in caplog.records if r.name == "tether.test"]
    assert [r.getMessage() for r in records] == ["handed over here"]
    assert records[0].levelno == logging.WARNING
    assert records[0].pathname == __file__      # the caller, not tether/log.py


AGENT_LOG = textwrap.dedent("""
    import sys
    from tether.console import configure_logging, console
    configure_logging()
    from tether.log import get_logger
    get_logger("tether.agent").info("serving %d session(s)", 1)
    console().drain(5)
    print("logging" in sys.modules)
""")


def test_the_agents_console_log_does_not_import_logging():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-S", "-c", AGENT_LOG], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert done.stderr.endswith("Z INFO tether.agent: serving 1 session(s)\n"), done.stderr
