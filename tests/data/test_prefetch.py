"""kd_jax.data.prefetch: results in step order, a bounded queue, the worker's exception raised
where its result would have been, and a clean close."""

import itertools
import threading
import time

import pytest

from kd_jax.data.prefetch import Prefetcher


def test_prefetcher_yields_results_in_order_and_stays_bounded():
    calls = []

    def work(step):
        calls.append(step)
        return step * step

    prefetcher = Prefetcher(work, range(10), depth=2)
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(calls) == 3  # two results queued, a third computed and waiting for room
    assert prefetcher.next() == 0
    assert list(prefetcher) == [step * step for step in range(1, 10)]
    with pytest.raises(StopIteration):
        next(prefetcher)
    prefetcher.close()


def test_prefetcher_reraises_the_workers_exception():
    def work(step):
        if step == 3:
            raise KeyError(f"row for step {step}")
        return step

    with Prefetcher(work, range(10), depth=3) as prefetcher:
        assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError, match="row for step 3"):
            next(prefetcher)
        with pytest.raises(StopIteration):
            next(prefetcher)


def test_prefetcher_close_stops_an_endless_producer():
    before = threading.active_count()
    prefetcher = Prefetcher(lambda step: step, itertools.count(), depth=2)
    assert next(prefetcher) == 0
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(prefetcher)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda step: step, range(3), depth=0)
