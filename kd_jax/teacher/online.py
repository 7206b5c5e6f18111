"""The online teacher: a frozen model run inside the step, giving dense logits.

Seen from the step, a teacher is one object with one method,

    soft_targets(teacher_params, batch) -> the loss's soft targets (`kd_jax.losses.soft_targets`)

called inside the jitted step, and, seen from the data feed, `host_fields(rows)`: the arrays it
needs beside each batch (none here; a cached teacher's are its targets). The parameters enter
the step as an argument: the teacher has no optimizer state and is never checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from kd_jax.losses.soft_targets import Dense
from kd_jax.models.pure import PureModel


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
    model: PureModel
    # Pins the [batch, tokens, vocab] logits to a sharding (None: left to XLA's propagation).
    logits_sharding: Any = None

    def soft_targets(self, params: Any, batch: dict[str, jax.Array]) -> Dense:
        logits_btv = self.model.logits(params, batch)
        if self.logits_sharding is not None:
            logits_btv = jax.lax.with_sharding_constraint(logits_btv, self.logits_sharding)
        return Dense(jax.lax.stop_gradient(logits_btv))  # the teacher is frozen

    def host_fields(self, rows: np.ndarray) -> dict[str, Any]:
        return {}
