"""`kd-jax export RUN_DIR OUT_DIR`: a run's student as a Hugging Face checkpoint directory.

OUT_DIR gets config.json (the family's own layout), safetensors weights, the tokenizer files the
run used, and a model card (README.md) recording the teacher, the data, the recipe, the
evaluation, and the teacher's licence and provenance as the config declared them
(`teacher.license`, `teacher.source_url`), or that none was declared, and `SHA256SUMS`, the
digest of every file (checked whenever kd_jax loads the directory; `sha256sum -c` reads it
too). A LoRA student is exported merged: each adapted projection W + (alpha / r) A B, the
base as its forward pass saw it (`kd_jax.models.lora.merged`: with `model.quantize`, the
dequantized int8/int4 weights the adapters were trained against), a plain checkpoint of the
family. Everything is written into a hidden sibling directory first and renamed into place once
complete, so an interrupted export never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from kd_jax import checkpoint
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.eval.report import eval_table
from kd_jax.models import lora
from kd_jax.models.families import hf_config
from kd_jax.models.pretrained import save_params, write_sums
from kd_jax.models.pure import abstract_model, count_params
from kd_jax.run_dir import read_report, read_run

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Files a checkpoint's tokenizer comes with, copied beside tokenizer.json when present.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def checked_export(run_dir: str | Path, out_dir: str | Path, dtype: str | None
                   ) -> tuple[Config, dict[str, Any], int, str]:
    """(the run's config, its run.json, its latest checkpoint step, the dtype to write) for an
    export of `run_dir` into `out_dir`, each checked before anything is written."""
    cfg, info = read_run(run_dir)
    step = checkpoint.latest_step(run_dir)
    if step is None:
        raise ConfigError(f"{run_dir} has no checkpoint to export")
    dtype = dtype or cfg.model.param_dtype
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not empty: export into a new directory")
    return cfg, info, step, dtype


def merged_student(params: dict, model_cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """A LoRA student as a plain one of its family: each adapted projection W + (alpha / r) A B
    (`lora.merged`), its layers float, the config without adapters. Others unchanged."""
    if not model_cfg.lora_rank:
        return params, model_cfg
    plain = ModelConfig()
    return lora.merged(params, model_cfg), dataclasses.replace(
        model_cfg, lora_rank=0, lora_alpha=plain.lora_alpha, lora_dropout=plain.lora_dropout,
        lora_targets=plain.lora_targets, quantize="none", quantize_group=0)


def export(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Write the latest checkpoint of `run_dir` to `out_dir`; returns what was written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, info, step, dtype = checked_export(run_dir, out_dir, dtype)
    source = _source_dir(cfg)
    base = _source_config(source)
    hf_config(dataclasses.replace(cfg.model, param_dtype="float32"), base)  # refuse early
    tokenizer = _tokenizer_file(cfg)
    model_cfg = dataclasses.replace(cfg.model, remat="none")
    _, abstract = abstract_model(model_cfg)
    params, model_cfg = merged_student(checkpoint.restore_params(run_dir, abstract, step),
                                       model_cfg)

    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = save_params(params, model_cfg, partial, dtype, base)
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, partial)
    if source is not None and (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", partial / "generation_config.json")
    report = read_report(run_dir)
    (partial / "README.md").write_text(model_card(
        cfg, info, report, step, dtype, str(tokenizer) if tokenizer else None,
        count_params(params)))
    write_sums(partial)  # the digests a later load checks (weight_digests)
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return {"out_dir": str(out_dir), "step": step, "dtype": dtype,
            "files": [path.name for path in written],
            "tokenizer": str(tokenizer) if tokenizer else None}


def _source_dir(cfg: Config) -> Path | None:
    """The Hugging Face checkpoint the student came from, if any."""
    if cfg.model.init == "hf":
        return Path(cfg.model.path)
    if cfg.model.init == "teacher" and cfg.teacher.source == "hf":
        return Path(cfg.teacher.path)
    return None


def _source_config(source: Path | None) -> dict | None:
    if source is None or not (source / "config.json").is_file():
        return None
    return json.loads((source / "config.json").read_text())


def _tokenizer_file(cfg: Config) -> Path | None:
    """The run's tokenizer.json, checked before anything is written; None for bytes."""
    if cfg.data.tokenizer in ("byte", "auto"):
        return None
    path = Path(cfg.data.tokenizer)
    if not path.is_file():
        raise ConfigError(f"the run's tokenizer {path} is gone: it cannot be exported with "
                          "the model")
    return path


def _copy_tokenizer(path: Path, out_dir: Path) -> None:
    """The tokenizer.json and its companions beside it."""
    shutil.copy2(path, out_dir / "tokenizer.json")
    for name in TOKENIZER_FILES:
        if (path.parent / name).is_file():
            shutil.copy2(path.parent / name, out_dir / name)


def model_card(cfg: Config, info: dict, report: dict | None, step: int, dtype: str,
               tokenizer: str | None, n_params: int) -> str:
    """README.md of an exported model: what it is, where it came from, how it scored."""
    teacher, loss, opt, data, train = cfg.teacher, cfg.loss, cfg.optimizer, cfg.data, cfg.train
    licence = teacher.license.strip()
    front = ["---", "library_name: transformers", "tags: [distillation, kd_jax]"]
    if licence:
        front.append(f"license: {json.dumps(licence)}")
    if cfg.model.init == "hf":
        front.append(f"base_model: {json.dumps(cfg.model.path)}")
    front.append("---")
    teacher_line = {
        "none": "none: trained on hard labels only",
        "checkpoint": f"the kd-jax run `{teacher.path}`",
        "hf": f"the Hugging Face checkpoint `{teacher.path}`",
        "cache": f"the teacher-logit cache `{cfg.cache.dir}` ({cfg.cache.mode})"
                 + (f", built from `{teacher.path}`" if teacher.path else ""),
    }[teacher.source]
    init = {"scratch": f"random (seed {cfg.model.seed})",
            "hf": f"the pretrained checkpoint `{cfg.model.path}`",
            "teacher": f"the teacher's layers {cfg.model.init_layers or 'all'}"
                       + (f", MLP pruned to {cfg.model.prune_d_ff}" if cfg.model.prune_d_ff
                          else "")
                       + (f", {cfg.model.prune_kv_heads} key/value heads kept"
                          if cfg.model.prune_kv_heads else "")}[cfg.model.init]
    m = cfg.model
    lines = [
        *front, "",
        f"# A {m.family} student distilled with kd_jax", "",
        f"{n_params:,} parameters: {m.n_layers} layers, hidden size {m.d_model}, "
        f"{m.n_heads} attention heads ({m.n_kv_heads} key/value), MLP {m.d_ff}, vocabulary "
        f"{m.vocab_size}; weights in {dtype}, from step {step} of the run.", "",
        "## Teacher", "",
        f"- Teacher: {teacher_line}"
        + (f", {info['teacher_params']:,} parameters." if info.get("teacher_params") else "."),
        f"- Source: {teacher.source_url or 'not declared (teacher.source_url)'}.",
        f"- Licence: {licence or 'not declared (teacher.license)'}.", "",
    ]
    if not licence and teacher.source != "none":
        lines += ["**No teacher licence was declared.** Before using or publishing this model, "
                  "check that the teacher's terms allow training another model on its outputs, "
                  "and record them in the config (`teacher.license`, `teacher.source_url`).", ""]
    lines += [
        "## Data", "",
        f"- Source: {data.source} {data.path or ''} {data.name or ''}".rstrip() + ".",
        f"- Tokenizer: {tokenizer or 'the byte tokenizer (token i is byte i; no file)'}.",
        f"- Sequences of {data.seq_len} tokens (packed documents).", "",
        "## Recipe", "",
        f"- Student initialization: {init}."
        + (f" LoRA: adapters of rank {m.lora_rank} (alpha {m.lora_alpha}) on "
           f"{', '.join(m.lora_targets)} trained on the frozen base, merged into it here."
           if m.lora_rank else ""),
        f"- Loss: {loss.kd_weight} x {loss.divergence} at temperature {loss.temperature}"
        f" + {loss.ce_weight} x cross-entropy on the labels.",
        f"- Optimizer: AdamW, learning rate {opt.lr} ({opt.schedule}, {opt.warmup_steps} "
        f"warm-up steps), weight decay {opt.weight_decay}, clipping {opt.clip_norm}.",
        f"- {train.steps} steps of {train.batch_size} sequences "
        f"({train.steps * train.batch_size * data.seq_len:,} tokens).", "",
        "## Evaluation", "",
    ]
    if report:
        lines += ["Held-out data of the run (`kd-jax eval`):", "", "```",
                  eval_table(report), "```", ""]
    else:
        lines += ["The run has no report.json: evaluate it with `kd-jax eval`.", ""]
    lines += ["## Use", "", "```python",
              "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\")",
              "```", ""]
    return "\n".join(lines)

