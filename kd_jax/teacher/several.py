"""Several teachers in one step (`teachers:` in the config, `kd_jax.config.teachers`).

Each member is a teacher as the step knows one (online, online with another tokenizer, or a
cache), built as it would be alone. Their parameters enter the step as a tuple, one entry each
(None for a cache); what each reads beside the batch travels in the batch under `teachers`, one
mapping each, so two teachers of other tokenizers each have their own rows. The soft targets are
`kd_jax.losses.soft_targets.Weighted`: the distillation term is the sum of each teacher's
divergence times its weight's share.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kd_jax.losses.soft_targets import Weighted

MEMBERS_KEY = "teachers"  # the batch key each member's own fields travel under


@dataclasses.dataclass(frozen=True)
class SeveralTeachers:
    members: tuple  # OnlineTeacher | CrossTokenizerTeacher | CachedTeacher, one each
    weights: tuple[float, ...]  # shares of their sum

    @property
    def note(self) -> str:
        """The start-up lines of the members that have one."""
        return "\n".join(f"teachers[{i}]: {member.note}" for i, member in enumerate(self.members)
                         if getattr(member, "note", ""))

    def soft_targets(self, params: tuple, batch: dict[str, Any]) -> Weighted:
        shared = {key: value for key, value in batch.items() if key != MEMBERS_KEY}
        return Weighted(tuple(
            member.soft_targets(member_params, {**shared, **own})
            for member, member_params, own in zip(self.members, params, batch[MEMBERS_KEY])),
            self.weights)

    def host_fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, Any]:
        return {MEMBERS_KEY: tuple(member.host_fields(rows, batch) for member in self.members)}

    def close(self) -> None:
        for member in self.members:
            if hasattr(member, "close"):
                member.close()
