"""The signal calls and numbers the agent uses, straight from `_signal`.

The `signal` module builds its IntEnums on import, which pulls in enum, functools and
collections: PID 1 would pay for them on every boot before its primary runs. These are
the same C functions; they take and return plain ints (`pthread_sigmask` and
`valid_signals` give sets of ints, `signal` the previous handler as an int or callable).
"""
from __future__ import annotations

import _signal
from _signal import (NSIG, SIG_BLOCK, SIG_DFL, SIG_IGN, SIG_SETMASK, SIGCHLD,  # noqa: F401
                     SIGHUP, SIGINT, SIGKILL, SIGPIPE, SIGPWR, SIGQUIT, SIGTERM, SIGUSR1,
                     SIGUSR2, SIGXFSZ, pause, pthread_sigmask, set_wakeup_fd, siginterrupt,
                     signal, valid_signals)


def _numbers() -> dict[str, int]:
    """Every signal name `_signal` knows (aliases too), as the `signal` module's
    `Signals` members: upper-case SIG... names, SIG_DFL and the like excluded."""
    return {name: number for name, number in vars(_signal).items()
            if name.startswith("SIG") and not name.startswith("SIG_") and name.isupper()
            and isinstance(number, int)}


NUMBERS = _numbers()
# A number's name is its alphabetically first alias, as `signal.Signals(n).name` gives it
# (SIGABRT, not SIGIOT; SIGCHLD, not SIGCLD; SIGIO, not SIGPOLL).
NAMES = {number: name for name, number in sorted(NUMBERS.items(), reverse=True)}


def name(signum: int) -> str:
    """'SIGTERM' for 15; a number without a name (a real-time signal past SIGRTMIN, say)
    as 'signal N'."""
    return NAMES.get(signum, f"signal {signum}")
