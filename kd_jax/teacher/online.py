"""The online teacher: a frozen model run inside the step, giving its final hidden states and
output head (`Projected`), from which the loss computes its logits, whole or chunk by chunk.

Seen from the step, a teacher is one object with one method,

    soft_targets(teacher_params, batch) -> the loss's soft targets (`kd_jax.losses.soft_targets`)

called inside the jitted step, and, seen from the data feed, `host_fields(rows, batch)`: the
arrays it needs beside each batch of those rows (none here; a cached teacher's are its targets,
a teacher with another tokenizer's its own rows). The parameters enter
the step as an argument: the teacher has no optimizer state and is never checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from kd_jax.losses.soft_targets import Projected
from kd_jax.models.pure import ModelOutputs, PureModel
from kd_jax.parallel.mesh import activation_sharding


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
    model: PureModel
    # Pins the [batch, tokens, vocab] logits to a sharding (None: left to XLA's propagation).
    logits_sharding: Any = None

    def soft_targets(self, params: Any, batch: dict[str, jax.Array]) -> Projected:
        outputs = self.model.apply(params, batch,
                                   activation_sharding=activation_sharding(self.logits_sharding))
        outputs = jax.lax.stop_gradient(outputs)  # the teacher is frozen
        return Projected(outputs.hidden_btd, outputs.head_vd, self.logits_sharding)

    def soft_targets_and_outputs(self, params: Any, batch: dict[str, jax.Array],
                                 request: dict) -> tuple[Projected, ModelOutputs]:
        """`soft_targets` and, from the same forward pass, the teacher's outputs with what
        `request` asks `PureModel.apply` for (its layers, attention distributions): what the
        white-box losses compare the student with (`kd_jax.losses.whitebox`)."""
        outputs = self.model.apply(params, batch, **request,
                                   activation_sharding=activation_sharding(self.logits_sharding))
        outputs = jax.lax.stop_gradient(outputs)  # the teacher is frozen
        return Projected(outputs.hidden_btd, outputs.head_vd, self.logits_sharding), outputs

    def host_fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, Any]:
        return {}
