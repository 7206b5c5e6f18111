"""Preemption: a SIGTERM (a preemptible slot ending) or a Ctrl-C saves the current step and
stops the run.

The handlers are installed when the run starts, before anything is built or compiled, so a
signal that lands during start-up is not lost: the run stops before its first step. One process:
the signal sets a flag the loop reads after each step (a second Ctrl-C interrupts at once).
Several: JAX's preemption service (started by `jax.distributed`, whose handler replaces this
one's for SIGTERM) spreads the notice and names one step at which every process saves, so all
checkpoints are of the same step.
"""

from __future__ import annotations

import signal
import threading


class Preempted(RuntimeError):
    """A signal arrived: the current step was checkpointed; rerunning resumes after it."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)  # what schedulers expect of a job they stopped


class Preemption:
    """`reached(step)`: whether to save after `step` and stop. `close()` restores the handlers.

    Create it first thing, before JAX is even imported (the command line does): it does not
    touch JAX until `reached`.
    """

    def __init__(self):
        self.signum: int | None = None  # the signal that asked to stop, if any
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = signum

    def reached(self, step: int) -> bool:
        import jax  # not at the top: the handlers go in before JAX is imported

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested  # read once per step: the signal may land mid-step

    def stopped(self, message: str) -> Preempted:
        return Preempted(message, self.signum or signal.SIGTERM)

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
