"""TensorBoard scalars of a run (`train.tensorboard: true`), written off the training thread.

Every record the loop appends to metrics.jsonl is handed to `Board.add` too, which only puts it
on a queue. One thread of the board's own turns each record into scalars (`train/loss`,
`train/tokens_per_second`, `eval/bits_per_byte`, `eval/teacher/accuracy`, ...) and writes them
with a tensorboardX `SummaryWriter` into `<run_dir>/tensorboard/`; `close` writes what is left
and closes the event file. tensorboardX is imported only when the option is on.

A run resumed from checkpoint S logs steps S+1 onwards again. Each board starts its event file
with purge_step S+1 (a SessionLog START event at that step): TensorBoard then hides the scalars
an earlier attempt wrote from step S+1 on, so every step shows once.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from pathlib import Path
from typing import Any

from kd_jax.train.progress import log

_CLOSE = object()  # put on the queue by `close`: everything before it is written


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record, by tag: a training record's keys under
    `train/`, an evaluation's student metrics under `eval/` and the teacher's under
    `eval/teacher/`."""
    if "eval" in record:
        named = {(f"eval/{key}" if model == "student" else f"eval/{model}/{key}"): value
                 for model, metrics in record["eval"].items() for key, value in metrics.items()}
    else:
        named = {f"train/{key}": value for key, value in record.items() if key != "step"}
    return {tag: float(value) for tag, value in named.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class Board:
    """Scalars for TensorBoard: `add` enqueues a metrics record, a thread writes it."""

    def __init__(self, run_dir: Path, first_step: int):
        from tensorboardX import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        writer = SummaryWriter(
            str(self.log_dir), purge_step=first_step,
            # A new event file's name holds the time in whole seconds: the suffix keeps the
            # files of two attempts within one second apart, and in the order they were made.
            filename_suffix=f".{time.time_ns()}",
            flush_secs=10)  # a live TensorBoard sees new steps within seconds
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._write, args=(writer,),
                                        name="kd_jax-tensorboard", daemon=True)
        self._thread.start()

    def add(self, record: dict[str, Any]) -> None:
        self._records.put(record)

    def close(self) -> None:
        """Write every record added so far, then close the event file."""
        self._records.put(_CLOSE)
        self._thread.join()
        if self._failed:
            log(f"TensorBoard: {self._failed}")

    def _write(self, writer) -> None:
        """The thread: the only user of `writer`. A failure to write stops the scalars, never
        the run; `close` reports it."""
        try:
            while (record := self._records.get()) is not _CLOSE:
                if self._failed:
                    continue
                try:
                    for tag, value in scalars(record).items():
                        writer.add_scalar(tag, value, record["step"])
                except Exception as err:  # noqa: BLE001 - a full disk must not stop training
                    self._failed = (f"stopped writing at step {record.get('step')} "
                                    f"({type(err).__name__}: {err})")
        finally:
            writer.close()
