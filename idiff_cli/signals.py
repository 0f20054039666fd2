"""SIGTERM and SIGINT as requests to stop at the next step boundary (preemption, a scheduler, Ctrl-C).

    with graceful_stop() as stop:          # in the main thread
        for batch in work:
            if stop.requested: break       # a step boundary: save, then `raise stop.interrupted()`
            ...
        stop.armed = True                  # from here a signal is a request; before, it ends the process

Until `armed` is set (nothing new to save: before the first step of a run, i.e. while it compiles), a
signal takes its default action and the process ends at once — a Python handler could not run before
a long XLA call returns. Once armed, the first signal sets `requested` and the work stops at its next
step boundary; a second signal ends the process at once, without touching the last good checkpoint
(files are only ever replaced by atomic renames). `Interrupted` carries the exit status 128 + signal
number (143 for SIGTERM, 130 for SIGINT), which the CLI exits with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal; `code` is the exit status, the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class Stop:
    """The stop state of one piece of work (see the module docstring)."""

    def __init__(self, installs: bool = True):
        self.signum: int | None = None
        self._armed = False
        self._installs = installs  # False off the main thread, where handlers cannot be set

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def armed(self) -> bool:
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        if value == self._armed and value:
            return
        self._armed = value
        for sig in SIGNALS if self._installs else ():
            signal.signal(sig, self._handle if value else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: end now, as the default action would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(self.signum or signal.SIGTERM, message)


_active: Stop | None = None


def requested() -> bool:
    """Whether the work running in this process was asked to stop (False outside `graceful_stop`)."""
    return _active is not None and _active.requested


def arm() -> None:
    """Arms the innermost `graceful_stop` (there is something to save from now on); none: nothing."""
    if _active is not None:
        _active.armed = True


@contextlib.contextmanager
def graceful_stop() -> Iterator[Stop]:
    """Installs the handlers for the block (main thread only; elsewhere signals keep their handlers and
    `requested` stays False); restores the previous ones after it."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield Stop(installs=False)
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    stop, outer = Stop(), _active
    stop.armed = False
    _active = stop
    try:
        yield stop
    finally:
        _active = outer
        for sig, handler in previous.items():
            signal.signal(sig, handler)
