"""Preemption: a SIGTERM (a preemptible slot ending) saves the current step and stops the run.

One process: the signal sets a flag the loop reads after each step. Several: JAX's preemption
service (started by `jax.distributed`) spreads the notice and names one step at which every
process saves, so all checkpoints are of the same step.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preempted(RuntimeError):
    """SIGTERM arrived: the current step was checkpointed; rerunning resumes after it."""


class Preemption:
    """`reached(step)`: whether to save after `step` and stop. `close()` restores the handler."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi_process = jax.process_count() > 1
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi_process:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested  # read once per step: the signal may land mid-step

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
