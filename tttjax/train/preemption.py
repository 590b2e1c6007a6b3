"""Preemption: SIGTERM asks the run to save a checkpoint and exit cleanly.

One process: a SIGTERM handler sets a flag; the loop finishes the step in flight, saves it,
waits for the write and returns. Several processes: the hosts must agree on the step to save
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
        self._previous = None
        self.multi_process = jax.process_count() > 1
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._flag.set()

    def requested(self, step: int) -> bool:
        if self.multi_process:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
