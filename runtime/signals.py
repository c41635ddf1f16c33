"""SIGTERM and SIGHUP handled like Ctrl-C.

`timeout`, CI cancellation and `docker stop` send SIGTERM; a closed terminal sends SIGHUP. Python's
default for both is to die on the spot, which skips every cleanup (a compile's staging folder, a
checkpoint's temporary file). Raised as a KeyboardInterrupt subclass, they take the paths that
Ctrl-C already takes: cleanup runs, the last good output stays, and the entry point prints one line
and exits with 128 + the signal number (143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

# The signals a run is stopped by; blocked together where a rename pair must not be split.
STOP_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A stop signal other than SIGINT, raised where the interpreter was when it arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process that a signal stopped."""
    return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)


def signal_name(interrupt: KeyboardInterrupt) -> str:
    return signal.Signals(interrupt.signum).name if isinstance(interrupt, Terminated) else "SIGINT"


def stop_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into `Terminated` (main thread only: Python runs handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS - {signal.SIGINT}:
        signal.signal(signum, _raise_terminated)


def _raise_terminated(signum: int, _frame) -> None:
    raise Terminated(signum)


def quiet_teardown() -> None:
    """Drop `__del__` complaints while a stopped run exits.

    A stop signal can land inside a library constructor (ORT's onnxblock blocks), and the half-built
    object then fails in its `__del__` as it is collected, which Python prints as a traceback after
    the entry point's one line. The run is over by then; nothing of it is worth reporting.
    """
    sys.unraisablehook = lambda _unraisable: None


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold the stop signals back (delivered when the block ends), where signal masks exist, in the main thread."""
    can_block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not can_block:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
