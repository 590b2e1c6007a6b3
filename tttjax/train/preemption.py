"""Preemption: SIGTERM (and Ctrl-C, SIGINT) asks the run to save a checkpoint and exit cleanly.

One process: a SIGTERM / SIGINT handler sets a flag; the loop finishes the step in flight,
saves it, waits for the write and returns (`python -m tttjax.train` then exits 0 after
SIGTERM, 130 after Ctrl-C). A second Ctrl-C is not caught: it interrupts at once. Several processes: the hosts must agree on the step to save
at, so the loop asks JAX's preemption sync point every step (the JAX coordination service
catches SIGTERM on any host and picks the first step all hosts can still reach).
"""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionWatch:
    """`requested(step)` is True once a preemption notice should stop the run at `step`."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = {}
        self.signal: int | None = None       # the signal that asked to stop, if any
        self.multi_process = jax.process_count() > 1
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        del frame
        if self.signal is None:
            self.signal = signum
        self._flag.set()
        if signum == signal.SIGINT and signum in self._previous:
            signal.signal(signum, self._previous[signum])   # a second Ctrl-C aborts at once

    @property
    def interrupted(self) -> bool:
        """True when Ctrl-C (SIGINT) asked to stop."""
        return self.signal == signal.SIGINT

    def requested(self, step: int) -> bool:
        if self.multi_process:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self._flag.is_set()

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
