"""SIGTERM/SIGINT handling shared by the CLI and training (stdlib only: imported before
torch so that a signal during startup is handled too).

Outside training a SIGTERM raises :class:`tsdb.errors.Interrupted` where the process is
(like Ctrl-C raises KeyboardInterrupt): whatever tsdb writes is written atomically, so a
stopped ``tsdb bench`` or ``tsdb forecast`` leaves finished parts and no half files. During
training (:func:`graceful_signals`) both signals are only recorded; training stops at the
next step boundary after saving a checkpoint (``tsdb.training.resume.StopOnSignal``).
"""

from __future__ import annotations

import contextlib
import signal
import threading

from tsdb.errors import Interrupted


class SignalState:
    """The signal received while training runs (None: none yet)."""

    def __init__(self):
        self.signum: int | None = None

    def record(self, signum, frame) -> None:
        self.signum = signum


_current: SignalState | None = None


def received() -> int | None:
    """The signal recorded by the innermost :func:`graceful_signals` block, if any."""
    return None if _current is None else _current.signum


@contextlib.contextmanager
def graceful_signals():
    """Within the block, SIGTERM and SIGINT are recorded instead of killing or raising.
    Lightning registers its own SIGTERM handler on top of this one during ``fit`` and calls
    this one too."""
    global _current
    if _current is not None:        # nested: one state for the whole training run
        yield _current
        return
    if threading.current_thread() is not threading.main_thread():
        yield SignalState()
        return
    state, outer = SignalState(), _current
    old = {s: signal.signal(s, state.record) for s in (signal.SIGTERM, signal.SIGINT)}
    _current = state
    try:
        yield state
    finally:
        _current = outer
        for s, handler in old.items():
            signal.signal(s, handler)


def stop_if_received(where: str) -> None:
    """Raise :class:`Interrupted` if a signal was recorded (between two units of work)."""
    signum = received()
    if signum is not None:
        raise Interrupted(signum, f"{signal.Signals(signum).name} {where}")


def _raise_on_sigterm(signum, frame) -> None:
    raise Interrupted(signum, "SIGTERM")


def install_sigterm() -> None:
    """Make SIGTERM raise :class:`Interrupted` (the CLI turns it into exit code 143)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
