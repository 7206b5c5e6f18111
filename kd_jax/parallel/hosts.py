"""What each process of a run holds: joining a multi-host run, the rows of a global batch a
process feeds, and the few host-side collectives a run needs.

Every process runs the same program over one global mesh. A global batch of B rows is split over
the mesh's data x fsdp axes; a process loads only the rows its own devices hold
(`BatchPlacement.positions`) and `place` assembles the global arrays from them.

This module imports only jax, numpy and the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kd_jax.config import ConfigError, DistributedConfig
from kd_jax.parallel.mesh import batch_sharding


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Join a multi-host run (`jax.distributed.initialize`) if `cfg.enabled`; else nothing.

    Must run before anything else touches JAX. Unset fields are left to JAX's detection (TPU
    pod slices, SLURM, the JAX_COORDINATOR_ADDRESS variable).
    """
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator or None,
            num_processes=cfg.num_processes or None,
            process_id=cfg.process_id if cfg.process_id >= 0 else None,
            initialization_timeout=cfg.timeout_s)
    except ValueError as err:  # nothing given and nothing detected
        raise ConfigError(
            f"distributed.enabled is set, but {str(err).rstrip('.')}: set distributed.coordinator"
            "=HOST:PORT, distributed.num_processes and distributed.process_id, or launch where "
            "JAX detects them (TPU pod slice, SLURM)") from None


def is_main_process() -> bool:
    """Process 0: the one that writes files and prints."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class BatchPlacement:
    """A global batch of `rows` rows on a mesh: its sharding and this process's share of it."""

    sharding: NamedSharding
    rows: int
    positions: np.ndarray  # the places in the global batch this process's devices hold, sorted

    @classmethod
    def on(cls, mesh: Mesh, rows: int, what: str = "train.batch_size") -> BatchPlacement:
        """Rows split over data x fsdp; `what` names the setting when they do not divide."""
        sharding = batch_sharding(mesh, rows, what)
        return cls(sharding, rows, batch_positions(sharding, rows))

    def place(self, local: Any) -> Any:
        """Global arrays from this process's rows (a tree of numpy arrays [len(positions), ...])."""
        return jax.tree.map(lambda value: jax.make_array_from_process_local_data(
            self.sharding, value, (self.rows, *value.shape[1:])), local)

    def abstract(self, local: Any) -> Any:
        """Shape/dtype/sharding placeholders of what `place(local)` returns (for compiling)."""
        return jax.tree.map(lambda value: jax.ShapeDtypeStruct(
            (self.rows, *value.shape[1:]), value.dtype, sharding=self.sharding), local)

    def share(self, batch: Any) -> Any:
        """This process's rows of a whole global batch held on the host (a tree of arrays)."""
        return jax.tree.map(lambda value: value[self.positions], batch)


def batch_positions(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """Which rows of a [batch_size, ...] global array this process's devices hold, in order.

    A process loads exactly these rows of each global batch and hands them to
    `jax.make_array_from_process_local_data`, which lays them out in this same order.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.array(sorted(rows), dtype=np.int64)


def process_local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in `batch_positions` order."""
    by_start = {}
    for shard in x.addressable_shards:  # replicas (e.g. along tensor) hold the same rows
        by_start.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(by_start[start].data) for start in sorted(by_start)])


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"kd_jax {name}")


def max_over_processes(value: int) -> int:
    """The largest `value` any process holds."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))
