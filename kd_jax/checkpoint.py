"""Checkpoints with orbax: the student's state and the data position, never the teacher.

A run directory holds `checkpoints/<step>/` with three items:
- `params`: the student's parameters (restorable alone: a finished run serves as a teacher);
- `opt_state`: the optimizer state;
- `meta`: JSON with the step, the global data position (sequences consumed), the RNG key and the
  tokenizer's fingerprint.
Saving is asynchronous; orbax finalizes a step directory only once all of it is written, so an
interrupted save never looks like a valid checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: the core runs without orbax

    return ocp


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def latest_step(run_dir: str | Path) -> int | None:
    """The newest finalized checkpoint step in a run directory, or None (read-only)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    steps = _ocp().utils.checkpoint_steps(directory)  # finalized steps only
    return max(steps) if steps else None


def placed(abstract: Any, shardings: Any) -> Any:
    """Shape/dtype placeholders of `abstract` carrying `shardings`: what to restore into."""
    return jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        abstract, shardings)


class Checkpointer:
    """Keeps the last `keep` checkpoints of one run directory; saves asynchronously."""

    def __init__(self, run_dir: str | Path, keep: int):
        ocp = _ocp()
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(run_dir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True),
            item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        args = self._ocp.args
        self._manager.save(step, args=args.Composite(
            params=args.StandardSave(state.params),
            opt_state=args.StandardSave(state.opt_state),
            meta=args.JsonSave(meta)))

    def restore(self, step: int, abstract_state: Any,
                shardings: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shapes and dtypes of `abstract_state`, placed as `shardings` says.

        Arrays are read straight into their shardings, whatever mesh wrote them.
        """
        if shardings is not None:
            abstract_state = placed(abstract_state, shardings)
        args = self._ocp.args
        restored = self._manager.restore(step, args=args.Composite(
            params=args.StandardRestore(abstract_state.params),
            opt_state=args.StandardRestore(abstract_state.opt_state),
            meta=args.JsonRestore()))
        meta = restored["meta"]
        state = abstract_state.replace(
            step=np.asarray(meta["step"], np.int32),
            params=restored["params"],
            opt_state=restored["opt_state"],
            rng=np.asarray(meta["rng"], np.uint32),
            nonfinite_step=np.asarray(-1, np.int32))
        return jax.device_put(state, shardings), meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_params(run_dir: str | Path, abstract_params: Any, step: int | None = None) -> Any:
    """Read only the parameters of a run's latest (or given) checkpoint, e.g. to load a teacher.

    Leaves of `abstract_params` that carry a sharding are read into it; the others onto the
    default device, whatever mesh wrote the checkpoint.
    """
    ocp = _ocp()
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                          sharding=getattr(leaf, "sharding", None) or default),
        abstract_params)
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    with ocp.CheckpointManager(checkpoint_dir(run_dir), item_names=("params",)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"]
