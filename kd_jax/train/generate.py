"""`kd-jax generate CONFIG`: responses to a set of prompts, written as JSONL.

The model is the student of `train.run_dir` (its latest checkpoint) or the teacher at
`teacher.path` (`generate.model`), placed on the mesh by its layout; the prompts come from
`generate.prompts` or the data section. Each prompt is encoded as training encodes it (the
tokenizer's beginning-of-sequence prefix with `data.add_bos`, then the text), the batch is
decoded by `kd_jax.models.generate`, and every line of the output is

    {"prompt": ..., "response": ..., "prompt_tokens": n, "response_tokens": m}

where the response stops before a stop token, and `prompt_tokens` counts the prefix. The file is
a prompt/response dataset as it is: `data.source: json`, `data.path: OUT`,
`data.prompt_column: prompt`, `data.response_column: response`.

Everything a user can get wrong is refused before the first prompt is decoded, and the output is
written under a temporary name and renamed once complete, so OUT is whole or absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kd_jax import checkpoint
from kd_jax.checks import not_a_directory
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.data.sources import iter_documents
from kd_jax.data.tokenizers import Tokenizer, load_tokenizer, stop_token_ids
from kd_jax.models import generate as sampler_lib
from kd_jax.models.pure import abstract_model, logical_axes
from kd_jax.parallel import mesh as mesh_lib
from kd_jax.run_dir import read_run
from kd_jax.teacher.loading import load_teacher


@dataclasses.dataclass
class Generator:
    """A model ready to decode: its architecture, placed parameters, tokenizer and where the
    cache and activations lie."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    mesh: Any
    rules: dict[str, str | None]  # the parameters' logical-axis table

    def sampler(self, max_new_tokens: int):
        vocab = self.tokenizer.vocab_size
        if self.mesh.size == 1:  # nothing to place: the program of a plain make_sampler
            return sampler_lib.make_sampler(self.config, max_new_tokens, vocab)
        return sampler_lib.make_sampler(
            self.config, max_new_tokens, vocab,
            cache_sharding=mesh_lib.kv_cache_sharding(self.mesh, self.rules,
                                                      self.config.n_kv_heads),
            activation_sharding=mesh_lib.batch_sharding(self.mesh))


def generate(cfg: Config, log=print) -> dict[str, Any]:
    """Write `generate.out`; returns a summary (rows, tokens, seconds, tokens_per_second)."""
    g = cfg.generate
    out = _check_out(g.out)
    if cfg.distributed.enabled:
        raise ConfigError("kd-jax generate runs in one process (distributed.enabled is true)")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh, g.batch_size, "generate.batch_size")
    prompts = read_prompts(cfg)
    generator = load_generator(cfg, mesh)
    tokenizer = generator.tokenizer
    encoded = encode_prompts(prompts, tokenizer, cfg.data.add_bos)
    width = max(len(ids) for ids in encoded)
    if width + g.max_new_tokens > generator.config.max_seq_len:
        longest = int(np.argmax([len(ids) for ids in encoded]))
        raise ConfigError(f"prompt {longest} has {width} tokens: with generate.max_new_tokens "
                          f"({g.max_new_tokens}) that exceeds the model's max_seq_len "
                          f"({generator.config.max_seq_len})")
    stop_ids = stop_token_ids(g.stop, tokenizer, "generate.stop")
    sampling = sampler_lib.Sampling(g.temperature, g.top_k, g.top_p)
    sample = generator.sampler(g.max_new_tokens)
    log(f"generating {len(prompts)} responses of up to {g.max_new_tokens} tokens with the "
        f"{g.model}, {g.batch_size} a batch ({_describe(g)})")

    start, new_tokens = time.perf_counter(), 0
    partial = out.parent / f".{out.name}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", encoding="utf-8") as file:
        for first in range(0, len(prompts), g.batch_size):
            rows = np.arange(first, min(first + g.batch_size, len(prompts)))
            # The last batch is filled with copies of its first prompt: one shape, one program.
            filled = np.concatenate([rows, np.full(g.batch_size - len(rows), rows[0])])
            tokens, lengths = sampler_lib.left_pad([encoded[row] for row in filled], width)
            placed = jax.device_put((tokens, lengths, sampler_lib.row_keys(g.seed, filled)),
                                    batch_sharding)
            result = sample(generator.params, *placed, sampling, stop_ids)
            new_bn, count_b = np.asarray(result.tokens_bn), np.asarray(result.lengths_b)
            for index, row in enumerate(rows):
                response = new_bn[index, :count_b[index]]
                new_tokens += int(count_b[index])
                file.write(json.dumps({
                    "prompt": prompts[row], "response": tokenizer.decode(response),
                    "prompt_tokens": len(encoded[row]),
                    "response_tokens": int(count_b[index])}, ensure_ascii=False) + "\n")
    os.replace(partial, out)
    seconds = time.perf_counter() - start
    return {"out": str(out), "rows": len(prompts), "tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0}


def _describe(g) -> str:
    if g.temperature == 0:
        return "greedy"
    limits = [f"top_k {g.top_k}"] * bool(g.top_k) + [f"top_p {g.top_p}"] * (g.top_p < 1)
    return ", ".join([f"temperature {g.temperature}", *limits, f"seed {g.seed}"])


def _check_out(out: str) -> Path:
    if not out:
        raise ConfigError("kd-jax generate needs generate.out, the JSONL file to write")
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"generate.out '{path}' is a directory, not a file to write")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"generate.out '{path}' cannot be written ({existing} is not a "
                          "writable directory)")
    return path


def load_generator(cfg: Config, mesh: Any) -> Generator:
    """The model `generate.model` names, its parameters placed by its layout on `mesh`."""
    if cfg.generate.model == "student":
        return _load_student(cfg, mesh)
    if cfg.teacher.source not in ("checkpoint", "hf"):
        raise ConfigError(f"generate.model is 'teacher' but teacher.source is "
                          f"'{cfg.teacher.source}': set it to checkpoint or hf, with "
                          "teacher.path")
    path = Path(cfg.teacher.path)
    if cfg.teacher.source == "hf":
        tokenizer = load_tokenizer(str(path / "tokenizer.json"))
    elif not path.is_dir():
        raise ConfigError(f"teacher.path '{path}' {not_a_directory(path)}")
    else:
        tokenizer = load_tokenizer(read_run(path)[0].data.tokenizer)
    # load_teacher checks that data.seq_len fits the teacher, which decoding does not read.
    loading_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=1))
    loaded = load_teacher(loading_cfg, tokenizer, mesh)
    rules = mesh_lib.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules,
                               "mesh.teacher_rules")
    return Generator(loaded.config, loaded.params, tokenizer, mesh, rules)


def _load_student(cfg: Config, mesh: Any) -> Generator:
    run_dir = Path(cfg.train.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"train.run_dir '{run_dir}' does not exist: generate.model is "
                          "'student', the student of a trained run")
    run_cfg, info = read_run(run_dir)
    step = checkpoint.latest_step(run_dir)
    if step is None:
        raise ConfigError(f"train.run_dir '{run_dir}' has no checkpoint to generate with")
    tokenizer = load_tokenizer(run_cfg.data.tokenizer)
    if tokenizer.fingerprint != info.get("tokenizer_fingerprint"):
        raise ConfigError(f"the tokenizer of {run_dir} ({run_cfg.data.tokenizer}) is not the "
                          "file the run was trained with")
    model_cfg = dataclasses.replace(run_cfg.model, remat="none")
    model, abstract = abstract_model(model_cfg)
    rules = mesh_lib.rules_for(cfg.mesh.student_layout, cfg.mesh.student_rules,
                               "mesh.student_rules")
    shardings = mesh_lib.param_shardings(logical_axes(model.template), rules, mesh, abstract)
    params = checkpoint.restore_params(run_dir, checkpoint.placed(abstract, shardings), step)
    return Generator(model_cfg, params, tokenizer, mesh, rules)


def read_prompts(cfg: Config) -> list[str]:
    """The prompt texts: `generate.prompts` (.jsonl or text), else the data section's."""
    source = cfg.generate.prompts
    if not source:
        if not cfg.data.prompt_column:
            raise ConfigError("kd-jax generate needs prompts: generate.prompts (a .jsonl or "
                              "text file), or data.prompt_column with data.source and "
                              "data.path")
        prompts = [doc.prompt for doc in iter_documents(cfg.data, cfg.data.split)
                   if doc.prompt is not None]
        where = f"data.prompt_column '{cfg.data.prompt_column}'"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"generate.prompts: no file at '{path}'")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"generate.prompts: '{path}' is not UTF-8 text") from None
        if path.suffix in (".jsonl", ".json"):
            prompts = [_json_prompt(line, number, path)
                       for number, line in enumerate(lines, 1) if line.strip()]
        else:
            prompts = [line for line in lines if line.strip()]
        where = f"generate.prompts '{path}'"
    if not prompts:
        raise ConfigError(f"{where} holds no prompt")
    return prompts


def _json_prompt(line: str, number: int, path: Path) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"generate.prompts: line {number} of '{path}' is not JSON "
                          f"({err.msg})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else row
    if not isinstance(prompt, str):
        raise ConfigError(f"generate.prompts: line {number} of '{path}' has no \"prompt\" "
                          "string")
    return prompt


def encode_prompts(prompts: list[str], tokenizer: Tokenizer, add_bos: bool
                   ) -> list[np.ndarray]:
    """Each prompt as training encodes a document's start: the prefix, then its text."""
    prefix = np.asarray(tokenizer.document_prefix if add_bos else (), dtype=np.int32)
    encoded = [np.concatenate([prefix, ids]) for ids in tokenizer.encode_batch(prompts)]
    for row, ids in enumerate(encoded):
        if not len(ids):
            raise ConfigError(f"prompt {row} is empty: no token to continue from")
    return encoded
