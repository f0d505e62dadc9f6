"""Ctrl-C during training: finish the step in progress, write a checkpoint, stop.

A SIGINT that lands in the middle of a step would leave the weights, the optimizer and the schedule out of step with
each other, so the first one only asks: :class:`StopRequest` records it and the loop stops after the step it is in,
with a checkpoint that ``--resume`` goes on from. A second Ctrl-C stops at once, as Python does by default.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType

from .devices import Processes


class StopRequest:
    """A context manager that catches the first SIGINT while it is open (only in the main thread, and only when
    SIGINT still has Python's default handler: a program's own handler is left alone)."""

    def __init__(self) -> None:
        self._asked = False
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._ask)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False

    def _ask(self, signum: int, frame: FrameType | None) -> None:
        if self._asked:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._asked = True
        print("\nlorakit: stopping after this step, with a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def asked(self, procs: Processes) -> bool:
        """Whether any process was asked to stop (a collective: every process calls it after every step)."""
        return procs.all_sum(float(self._asked)) > 0
