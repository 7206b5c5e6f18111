"""Several teachers: the `teachers:` list of a config, each entry made a whole config.

Each entry names one teacher as `teacher:` would, with its own cache and sharding:

    teachers:
      - {source: hf, path: /ckpt/llama-8b, weight: 2, dtype: bfloat16, layout: fsdp}
      - {source: cache, cache: /caches/qwen-7b-topk, weight: 1}

`members(cfg)` turns entry i into the config of a run with that one teacher (its `teacher:`
section, `cache.dir` and `mesh.teacher_layout`), so each is loaded, checked and sized exactly as a
lone teacher is; the step then sums their distillation terms, each scaled by its weight's share
of the weights' sum (`kd_jax.teacher.several`).
"""

from __future__ import annotations

import copy

from kd_jax.config import Config, ConfigError, MeshLayout, TeacherConfig, coerce, section_types
from kd_jax.config.coercion import weighted_entry

# An entry's keys: those of `teacher:`, and the three a lone teacher takes from other sections.
TEACHER_KEYS = ("source", "path", "dtype", "license", "source_url")
ENTRY_KEYS = ("weight", *TEACHER_KEYS, "cache", "layout")


def members(cfg: Config) -> list[tuple[float, Config]]:
    """(weight share, the config of a run with that teacher alone) for each of `cfg.teachers`."""
    types = section_types(TeacherConfig)
    out = []
    for i, entry in enumerate(cfg.teachers):
        where = f"teachers[{i}]"
        weight = weighted_entry(entry, where, ENTRY_KEYS, ("weight", "source"),
                                f"a source and a weight (keys: {', '.join(ENTRY_KEYS)})",
                                "a key of a teacher")
        member = copy.deepcopy(cfg)
        member.teachers = []
        member.teacher = TeacherConfig(**{
            key: coerce(entry[key], types[key], f"{where}.{key}")
            for key in TEACHER_KEYS if key in entry})
        if member.teacher.source == "none":
            raise ConfigError(f"{where}.source must be checkpoint, hf or cache, not none")
        if "cache" in entry:
            member.cache.dir = coerce(entry["cache"], str, f"{where}.cache")
        if "layout" in entry:
            member.mesh.teacher_layout = coerce(entry["layout"], MeshLayout, f"{where}.layout")
        out.append((weight, member))
    total = sum(weight for weight, _ in out)
    return [(weight / total, member) for weight, member in out]

