"""Checkpoints with orbax: the student's state and the data position, never the teacher.

A run directory holds `checkpoints/<step>/` with three items:
- `params`: the student's parameters (restorable alone: a finished run serves as a teacher);
- `opt_state`: the optimizer state;
- `meta`: JSON with the step, the global data position (sequences consumed), the RNG key and the
  tokenizer's fingerprint;
- `aux`, only with white-box losses: their projections (`kd_jax.losses.whitebox`), trained with
  the student and restored with it, never read as the student's parameters.
A LoRA student's `params` hold its adapters only (`ADAPTERS`): its frozen base is written once,
when the run starts, into `<run_dir>/base/` (with its digests, as a checkpoint's), and every
restore of the student's parameters joins the two.
Saving is asynchronous; orbax finalizes a step directory only once all of it is written, so an
interrupted save never looks like a valid checkpoint.

orbax's data blocks carry no checksum: a flipped byte can decode to other weights. So a
checkpoint is checked twice over. `meta` holds a digest of every array saved (`digests`),
computed on the devices from the state being saved, and every restore recomputes it from what was
read. And once a save is committed, `files.sha256.json` in its directory records the SHA-256 of
every file, checked before a restore reads any (this also catches damage to bytes a restore
would not read, and is all there is for a save killed before it was recorded). Those digests
are taken on a thread of their own, while training goes on. A damaged
checkpoint is named, never used (`DamagedCheckpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import re
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.multihost_utils import sync_global_devices

from kd_jax.config import ConfigError


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose arrays do not match their digests, or cannot be read at all."""


FILE_DIGESTS = "files.sha256.json"
# A LoRA student's parameters hold its adapters under this key (kd_jax.models.lora.ADAPTERS):
# they are saved with every checkpoint, the rest (the frozen base) once, in <run_dir>/base.
ADAPTERS = "lora"


def _hash_files(step_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        name = path.relative_to(step_dir).as_posix()
        if name != FILE_DIGESTS and not name.endswith(".partial"):
            with open(path, "rb") as file:
                out[name] = hashlib.file_digest(file, "sha256").hexdigest()
    return out


def record_file_digests(step_dir: Path) -> None:
    """Write the SHA-256 of every file of a committed checkpoint beside them (atomically)."""
    temporary = step_dir / (FILE_DIGESTS + ".partial")
    temporary.write_text(json.dumps(_hash_files(step_dir), indent=1, sort_keys=True))
    os.replace(temporary, step_dir / FILE_DIGESTS)


def check_file_digests(step_dir: Path, what: str, skip: str | None = None) -> None:
    """Raise DamagedCheckpoint naming the first file that differs from its recorded digest
    (files of the item `skip`, one not read, aside)."""
    recorded_path = step_dir / FILE_DIGESTS
    if not recorded_path.is_file():  # a save killed before it was recorded: arrays checked only
        return
    try:
        recorded = json.loads(recorded_path.read_text())
    except (OSError, ValueError):
        raise DamagedCheckpoint(f"{what} is damaged: {FILE_DIGESTS} cannot be read") from None
    actual = _hash_files(step_dir)
    for name in sorted(set(recorded) | set(actual)):
        if skip is not None and name.startswith(skip + "/"):
            continue
        if recorded.get(name) != actual.get(name):
            state = ("is missing" if name not in actual else "was not saved with it"
                     if name not in recorded else "does not match its recorded digest")
            raise DamagedCheckpoint(f"{what} is damaged: file {name} {state}")


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32, one word per element."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of the array's words, modulo 2^32: uint32 [2].

    Each word is multiplied by an odd number, so flipping any one bit changes each sum. The
    position comes from iotas, not a reshape, so a sharded array stays where it is and the sum
    is one all-reduce; modular sums do not depend on the order, so neither on the mesh.
    """
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
            stride % (1 << 32))
        stride *= x.shape[axis]
    words = _words(x)
    first = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
    second = jnp.sum((words ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B),
                     dtype=jnp.uint32)
    return jnp.stack([first, second])


@jax.jit
def _digests(leaves: tuple) -> tuple:
    return tuple(_digest(leaf) for leaf in leaves)


def digests(tree: Any) -> dict[str, list[int]]:
    """{leaf path: its digest} of every array in `tree` (on any mesh, across processes)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = _digests(tuple(leaf for _, leaf in flat))
    return {jax.tree_util.keystr(path): np.asarray(value.addressable_data(0)).tolist()
            for (path, _), value in zip(flat, values)}


def check_digests(recorded: dict[str, list[int]] | None, tree: Any, what: str) -> None:
    """Raise DamagedCheckpoint naming the first array of `tree` whose digest differs."""
    if recorded is None:  # written before digests were recorded: nothing to compare
        return
    for name, digest in digests(tree).items():
        if name in recorded and recorded[name] != digest:
            raise DamagedCheckpoint(f"{what} is damaged: array {name} does not match the "
                                    "digest recorded when it was saved")


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: the core runs without orbax

    return ocp


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def base_dir(run_dir: str | Path) -> Path:
    """Where a LoRA student's frozen base lies, written once (an orbax step 0)."""
    return Path(run_dir).absolute() / "base"


def saved_per_step(params: Any) -> Any:
    """What a checkpoint's `params` item holds: a LoRA student's adapters, or all parameters."""
    return {ADAPTERS: params[ADAPTERS]} if ADAPTERS in params else params


def _frozen_base(params: Any) -> Any:
    return {key: value for key, value in params.items() if key != ADAPTERS}


def save_base(run_dir: str | Path, params: Any) -> None:
    """Write a LoRA student's frozen base (all its parameters but the adapters) into
    `base_dir`, replacing one an earlier start wrote; returns once it is committed."""
    ocp, directory = _ocp(), base_dir(run_dir)
    base = _frozen_base(params)
    if jax.process_index() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    sync_global_devices("lora base cleared")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                               item_names=("params", "meta")) as manager:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(base),
            meta=ocp.args.JsonSave({"digests": {"params": digests(base)}})))
        manager.wait_until_finished()
    if jax.process_index() == 0:
        record_file_digests(directory / "0")


def _with_base(run_dir: str | Path, adapters: Any, abstract_params: Any) -> Any:
    """A LoRA student's parameters: `adapters` (restored from a step) joined with the frozen
    base read from `base_dir`, onto `abstract_params`'s shapes (and shardings)."""
    ocp, directory = _ocp(), base_dir(run_dir)
    what = f"the frozen base of the LoRA student in {directory}"
    if not (directory / "0").is_dir():
        raise DamagedCheckpoint(f"{what} is missing: a LoRA run's checkpoints hold its adapters "
                                "only")
    check_file_digests(directory / "0", what)
    try:
        with ocp.CheckpointManager(directory, item_names=("params", "meta")) as manager:
            restored = manager.restore(0, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_frozen_base(abstract_params)),
                meta=ocp.args.JsonRestore()))
    except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside orbax
        raise DamagedCheckpoint(f"{what} cannot be read ({_first_line(err)})") from None
    check_digests(restored["meta"]["digests"]["params"], restored["params"], what)
    return {**restored["params"], **adapters}


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
        self._directory = checkpoint_dir(run_dir)
        # Records the files' digests of the save under way once it commits, off the training
        # thread: hashing a large checkpoint takes as long as reading it.
        self._recorder: threading.Thread | None = None
        self._recorder_error: BaseException | None = None
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True),
            item_names=("params", "opt_state", "meta", "aux"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        args = self._ocp.args
        items = {"params": saved_per_step(state.params), "opt_state": state.opt_state}
        if state.aux:  # without white-box losses, the items are as they always were
            items["aux"] = state.aux
        meta = {**meta, "digests": {name: digests(tree) for name, tree in items.items()}}
        self.wait()  # the previous save committed and its files recorded
        self._manager.save(step, args=args.Composite(
            **{name: args.StandardSave(tree) for name, tree in items.items()},
            meta=args.JsonSave(meta)))
        self._recorder = threading.Thread(target=self._record, args=(step,),
                                          name="checkpoint-digests", daemon=True)
        self._recorder.start()

    def _record(self, step: int) -> None:
        """Wait for the save of `step` to commit, then record its files' digests."""
        try:
            self._manager.wait_until_finished()
            step_dir = self._directory / str(step)
            # orbax commits on process 0 once every process wrote; max_to_keep may have deleted
            # the step already.
            if jax.process_index() == 0 and step_dir.is_dir():
                record_file_digests(step_dir)
        except BaseException as err:  # noqa: BLE001 - raised on the training thread by wait()
            self._recorder_error = err

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def set_aside(self, step: int) -> Path:
        """Move a damaged checkpoint out of the way (kept for inspection, never read again), so
        the step can be saved anew; call on one process."""
        source = self._directory / str(step)
        target = self._directory.parent / "damaged_checkpoints" / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(source), str(target))
        return target

    def reload(self) -> None:
        self._manager.reload()

    def restore(self, step: int, abstract_state: Any,
                shardings: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shapes and dtypes of `abstract_state`, placed as `shardings` says.

        Arrays are read straight into their shardings, whatever mesh wrote them.
        """
        if shardings is not None:
            abstract_state = placed(abstract_state, shardings)
        args = self._ocp.args
        what = f"checkpoint {step} in {self._directory}"
        check_file_digests(self._directory / str(step), what)
        items = {"params": saved_per_step(abstract_state.params),
                 "opt_state": abstract_state.opt_state}
        if abstract_state.aux:
            items["aux"] = abstract_state.aux
        try:
            restored = self._manager.restore(step, args=args.Composite(
                **{name: args.StandardRestore(tree) for name, tree in items.items()},
                meta=args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside orbax
            raise DamagedCheckpoint(f"{what} cannot be read ({_first_line(err)})") from None
        meta = restored["meta"]
        recorded = meta.get("digests") or {}
        for name in items:
            check_digests(recorded.get(name), restored[name], what)
        params = restored["params"]
        if ADAPTERS in params:
            params = _with_base(self._directory.parent, params, abstract_state.params)
        state = abstract_state.replace(
            step=np.asarray(meta["step"], np.int32),
            params=params,
            opt_state=restored["opt_state"],
            aux=restored["aux"] if "aux" in items else {},
            rng=np.asarray(meta["rng"], np.uint32),
            nonfinite_step=np.asarray(-1, np.int32), nonfinite_term=np.asarray(-1, np.int32))
        return jax.device_put(state, shardings), meta

    def wait(self) -> None:
        """Wait for the save under way to commit and its files' digests to be recorded."""
        if self._recorder is not None:
            self._recorder.join()
            self._recorder = None
        self._manager.wait_until_finished()
        if self._recorder_error is not None:
            error, self._recorder_error = self._recorder_error, None
            raise error

    def close(self) -> None:
        self.wait()
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
    what = f"checkpoint {step} in {checkpoint_dir(run_dir)}"
    check_file_digests(checkpoint_dir(run_dir) / str(step), what, skip="opt_state")
    try:
        with ocp.CheckpointManager(checkpoint_dir(run_dir),
                                   item_names=("params", "meta")) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(saved_per_step(abstract_params)),
                meta=ocp.args.JsonRestore()))
    except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside orbax
        raise DamagedCheckpoint(f"{what} cannot be read ({_first_line(err)})") from None
    check_digests((restored["meta"].get("digests") or {}).get("params"), restored["params"],
                  what)
    if ADAPTERS in abstract_params:
        return _with_base(run_dir, restored["params"], abstract_params)
    return restored["params"]


def _first_line(err: BaseException) -> str:
    """Why a read failed, in one line: the innermost cause (orbax wraps TensorStore's error,
    which names the array and what is wrong with its file, in one of its own that prints the
    whole array spec), without TensorStore's bracketed details ([source locations='...'])."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"\s*\[[a-z_ ]+='[^']*'\]", "", text)
