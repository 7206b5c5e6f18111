"""What a run tells its user while it trains: log lines, throughput, the progress bar.

Throughput counts training time only: the time between host sync points, without evaluation
and checkpoint saves. In a multi-host run only process 0 prints.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import numpy as np
from tqdm import tqdm


def log(message: str) -> None:
    """Print a line above the progress bar; in a multi-host run, on process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(message)


def describe_compiled(compiled) -> str:
    """FLOPs a step, as far as the backend says (memory: `kd_jax.train.plan.memory_figures`)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            return f"{cost['flops'] / 1e9:.2f} GFLOP/step"
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        pass
    return "FLOPs unknown"


class StepClock:
    """Training time between host sync points, excluding evaluation and checkpoint saves."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.seconds, self.steps = 0.0, 0
        self._since_log = (0.0, 0)
        self._started = time.perf_counter()

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, steps: int) -> None:
        elapsed = time.perf_counter() - self._started
        self.seconds += elapsed
        self.steps += steps
        seconds, count = self._since_log
        self._since_log = (seconds + elapsed, count + steps)

    def tokens_per_second_since_log(self) -> float:
        seconds, count = self._since_log
        self._since_log = (0.0, 0)
        return self.tokens_per_step * count / seconds if seconds else float("nan")

    def overall_tokens_per_second(self) -> float | None:
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else None


def log_record(step: int, fetched: list[dict], tokens_per_second: float) -> dict[str, float]:
    """Average the metric sums fetched since the last log over their valid tokens."""
    totals = {k: float(np.sum([m[k] for m in fetched])) for k in fetched[0]}
    tokens = max(totals["tokens"], 1.0)
    record = {"step": step, "loss": totals["loss_sum"] / tokens}
    for key in ("kd", "ce", "hidden", "attention"):
        if f"{key}_sum" in totals:
            record[key] = totals[f"{key}_sum"] / tokens
    if "answers" in totals:  # on-policy: the student's answers' mean length, in tokens
        record["answer_tokens"] = totals["answer_tokens"] / max(totals["answers"], 1.0)
    if "skipped" in totals:  # steps not applied: a non-finite loss or gradient
        record["skipped"] = int(totals["skipped"])
    record["grad_norm"] = float(fetched[-1]["grad_norm"])
    record["lr"] = float(fetched[-1]["lr"])
    record["tokens_per_second"] = tokens_per_second
    return record


def progress_bar(total: int, initial: int, enabled: bool, **options) -> tqdm | PlainProgress:
    """A progress bar that keeps out of the way of log lines (`log`); where stderr is not a
    terminal (a log file, a scheduler's capture), a plain line every `PLAIN_EVERY_S` instead."""
    enabled = enabled and jax.process_index() == 0
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, initial, options.get("unit", "it"))
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                leave=False, **options)


PLAIN_EVERY_S = 30.0


class PlainProgress:
    """Progress as plain lines on stderr: done/total, rate, ETA and the latest figures."""

    def __init__(self, total: int, initial: int, unit: str, every_s: float = PLAIN_EVERY_S):
        self.total, self.done, self.unit, self.every_s = total, initial, unit, every_s
        self._started_at, self._started_done = time.monotonic(), initial
        self._last_line = self._started_at
        self._postfix: dict[str, str] = {}

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            print(self.line(now), file=sys.stderr, flush=True)

    def set_postfix(self, values: dict[str, str]) -> None:
        self._postfix = dict(values)

    def line(self, now: float) -> str:
        rate = (self.done - self._started_done) / max(now - self._started_at, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
        figures = "".join(f", {key} {value}" for key, value in self._postfix.items())
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.unit} {self.done:,}/{self.total:,}{share}, {rate:,.3g} {self.unit}/s, "
                f"ETA {eta}{figures}")

    def close(self) -> None:
        pass
