"""Stopping a render from outside the process: SIGTERM and SIGHUP (a scheduler, `docker stop`, a closed terminal)
stop it the way Ctrl-C (SIGINT) does.

`stop_on_signals()` turns those signals into `Stopped`, a `KeyboardInterrupt`: the chunk in progress is dropped,
every finished chunk stays in the video (its file is closed on the way out), and the caller reports and exits with
the conventional code (128 + the signal number). A second signal while stopping is logged and ignored, so the file
is always closed. SIGKILL cannot be caught: the fragmented mp4 keeps what was written (see `video.py`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Ctrl-C is among them so that a second Ctrl-C while the file is being closed cannot cut that short.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(stop: BaseException) -> int:
    """The conventional exit status of a stop: 128 + the signal number (130 for Ctrl-C)."""
    return stop.exit_code if isinstance(stop, Stopped) else 128 + signal.SIGINT


def stop_name(stop: BaseException) -> str:
    return stop.name if isinstance(stop, Stopped) else "SIGINT"


@contextmanager
def stop_on_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, `signums` raise `Stopped` in the main thread (once); the old handlers come back after."""
    stopping = []

    def handler(signum: int, frame: object) -> None:
        if stopping:
            logger.warning("%s while stopping: already stopping, closing the files", signal.Signals(signum).name)
            return
        stopping.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
