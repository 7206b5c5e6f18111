"""Prefetch: host work for the next steps, done on a thread while the device runs this one.

Standard library only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Self

_RESULT, _ERROR, _END = "result", "error", "end"


class Prefetcher:
    """`fn(step)` for each of `steps`, computed up to `depth` steps ahead on one thread.

    Iterating yields the results in step order, so host work (reading a batch's cached teacher
    rows) overlaps the device's current step. An exception in `fn` is raised by the `next()`
    that would have returned that step's result, and ends the iteration. `close()` (or leaving
    a `with` block) stops the thread; it waits for a call of `fn` already under way.
    """

    def __init__(self, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._work, args=(fn, iter(steps)),
                                        name="kd_jax-prefetch", daemon=True)
        self._thread.start()

    def _work(self, fn: Callable[[int], Any], steps: Iterable[int]) -> None:
        try:
            for step in steps:
                if self._stop.is_set():
                    return
                self._queue.put((_RESULT, fn(step)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put((_ERROR, err))
            return
        self._queue.put((_END, None))
        # After close() drains the queue each put above has room, so the thread never blocks
        # for good; it returns at the next stop check.

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _RESULT:
            return value
        self._finished = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def next(self) -> Any:
        return next(self)

    def close(self) -> None:
        self._stop.set()
        self._finished = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.01)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
