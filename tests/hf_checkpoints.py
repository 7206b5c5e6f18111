"""Tiny Hugging Face checkpoints of every supported family, made with transformers in the test.

`make_checkpoint(path, kind)` builds a random model with transformers (every weight perturbed, so
biases and norm scales are not their trivial initial values), saves it with `save_pretrained`
(the transformers 5 config.json layout) and, with `layout="v4"`, rewrites config.json in the
transformers 4 layout most published checkpoints carry (`rope_theta`, `rope_scaling`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# kind -> (transformers config class, extra config fields)
KINDS = {
    "llama2": ("LlamaConfig", {"rope_theta": 10000.0}),
    "llama3": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "llama_linear_bias": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                          "attention_bias": True}),
    "smollm": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "tinyllama": ("LlamaConfig", {"num_attention_heads": 8, "num_key_value_heads": 1,
                                  "head_dim": 4}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "vocab_size": 112}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": False}),
}
MODELS = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
          "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def hf_model(kind: str, seed: int = 0, perturb: bool = True, **overrides):
    """A random transformers model of `kind`, float32, in eval mode; with `perturb`, every
    weight redrawn (biases and norm scales too), else transformers' own initialization."""
    import torch
    import transformers

    config_name, extra = KINDS[kind]
    fields = {**COMMON, **extra, **overrides}
    rope = fields.pop("rope_scaling", None)
    theta = fields.pop("rope_theta", 10000.0)
    config = getattr(transformers, config_name)(**fields)
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta, **(rope or {})}
    torch.manual_seed(seed)
    model = getattr(transformers, MODELS[config_name])(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters() if perturb else ():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def to_v4_layout(path: Path) -> None:
    """Rewrite config.json as transformers 4 wrote it: rope_theta and rope_scaling at the top."""
    config = json.loads((path / "config.json").read_text())
    rope = dict(config.pop("rope_parameters", None) or {})
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(config, indent=2))


def make_checkpoint(path: Path, kind: str, layout: str = "v5", seed: int = 0,
                    **overrides) -> Path:
    model = hf_model(kind, seed, **overrides)
    model.save_pretrained(path)
    if layout == "v4":
        to_v4_layout(path)
    return path


def hf_logits(path: Path, tokens):
    """Logits of the checkpoint at `path` as transformers computes them, float32 numpy."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}


def with_tokenizer(path: Path, tokenizer: Path) -> Path:
    """Give the checkpoint at `path` the tokenizer.json `tokenizer` (and a tokenizer_config.json
    transformers' AutoTokenizer reads)."""
    shutil.copy(tokenizer, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return path


def hf_distill_config(path: Path, corpus: Path, teacher: Path, student: Path, run_dir: Path,
                      extra: str = "") -> Path:
    """A tiny distillation of `teacher` into `student` (both checkpoints) on `corpus`."""
    path.write_text(f"""
teacher: {{source: hf, path: {teacher}}}
model: {{init: hf, path: {student}}}
data: {{source: text, path: {corpus}, seq_len: 32, heldout_fraction: 0.1}}
loss: {{divergence: forward_kl, temperature: 2.0, ce_weight: 0.5}}
optimizer: {{lr: 3e-3, warmup_steps: 1}}
train: {{run_dir: {run_dir}, steps: 4, batch_size: 4, log_every: 1, checkpoint_every: 4,
        eval_sequences: 4, progress: false}}
{extra}""")
    return path
