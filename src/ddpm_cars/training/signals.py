"""Stopping politely: Ctrl-C or SIGTERM ends training after the step in progress, with a
checkpoint at that step."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint at the current step."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step in progress, so the
    checkpoint it then saves is consistent; a second signal of either kind acts at once
    (Ctrl-C raises KeyboardInterrupt, SIGTERM terminates; the last checkpoint stands)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self._restore()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step to save a checkpoint (signal again to stop at once)", flush=True)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()
