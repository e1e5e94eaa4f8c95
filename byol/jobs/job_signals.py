"""A job's own answer to the stop signals outside a Lightning fit (where :class:`~byol.lightning.callbacks.
CatchStopSignals` answers them): an exception the job's clean-up sees, as Ctrl+C's KeyboardInterrupt."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from byol.core.errors import Interrupted
from byol.jobs.sweep_signals import FORWARDED  # SIGTERM, SIGUSR1 (byol.lightning's list would load Lightning)


@contextmanager
def stop_signals_raise(message: str):
    """SIGTERM and SIGUSR1 raise :class:`~byol.core.errors.Interrupted` (``message`` after the signal's name)
    wherever the job stands, as Ctrl+C raises KeyboardInterrupt: an evaluation outside a fit (kNN, the cached
    probe, embed, loading) died of Python's default handler, with no stop line, no ``STOPPED`` for its sweep and
    an earlier result half set aside. A fit puts :class:`CatchStopSignals` in their place meanwhile. One signal
    raises; those that follow while the job cleans up are ignored. The handlers before are put back on leaving,
    so that :func:`~byol.jobs.cli.hand_on_signal` finds a launcher's (submitit requeues on SIGUSR1)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def on_signal(signum, frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(f"received {signal.Signals(signum).name}: {message}", signum)

    previous = {s: signal.signal(s, on_signal) for s in FORWARDED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
