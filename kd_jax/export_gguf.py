"""`kd-jax export RUN_DIR OUT_DIR --format gguf`: a run's student as one GGUF file for llama.cpp.

OUT_DIR gets `model.gguf`, the model card (README.md) and `SHA256SUMS`, written into a hidden
sibling directory first and renamed into place once complete, as `kd_jax.export` does.

The file holds the weights in the formats the run trained with: a student trained with
`model.quantize` q8_0 or q4_0 (llama.cpp's formats, `kd_jax.models.quantize`) gets its codes and
float16 scales, computed by the same function its forward pass used, so llama.cpp serves the
weights the loss saw; weights left in float are written in `--dtype` (F32, F16 or BF16); the
norms and biases always in F32. The metadata is llama.cpp's: its `llama` architecture (the
llama and mistral families) or `qwen2`, and a byte-level BPE tokenizer (`tokenizer.ggml.model`
gpt2) from the run's tokenizer.json. For the llama
architecture the query and key rows are reordered as llama.cpp's converter does (its rotary
embedding pairs adjacent dimensions, Hugging Face's the two halves of a head); a reader that
loads the file back into a Hugging Face model (transformers) undoes it.

What the file cannot say is refused before anything is written: int8/int4 weights (no GGUF type
holds their grid and float32 scales), per-token activation quantization, biases or norms the
architecture has no place for, a sliding window, rotary scaling, and a tokenizer that is not
byte-level BPE with merges and a pre-tokenizer llama.cpp names (the byte tokenizer has no
merges, and llama.cpp reads no BPE vocabulary without them).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from kd_jax import checkpoint
from kd_jax.config import LLAMA_CPP_FORMATS, Config, ConfigError, ModelConfig
from kd_jax.export import _tokenizer_file, checked_export, merged_student, model_card
from kd_jax.models import quantize
from kd_jax.models.pretrained import write_sums
from kd_jax.models.pure import abstract_model, count_params
from kd_jax.run_dir import read_report

GGUF_FILE = "model.gguf"
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# tokenizer.json pre-tokenizers llama.cpp knows by name (`tokenizer.ggml.pre`): GPT-2's
# byte-level split alone, and SmolLM's, the same with each digit split off first.
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types


def export_gguf(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None
                ) -> dict[str, Any]:
    """Write the latest checkpoint of `run_dir` as OUT_DIR/model.gguf; returns what was
    written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, info, step, dtype = checked_export(run_dir, out_dir, dtype)
    try:
        import gguf
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install "
                          "'kd_jax[gguf]'") from None
    if cfg.model.lora_rank and cfg.model.weight_format("layers") != "none":
        raise ConfigError("--format gguf: a LoRA student's merged projections, its quantized "
                          "base plus the adapters' product, lie off the grid the base was "
                          "quantized to; export it with --format safetensors")
    architecture = check_expressible(cfg.model)
    tokenizer = _tokenizer_file(cfg)
    vocabulary = tokenizer_metadata(tokenizer, cfg.model.vocab_size)
    _, abstract = abstract_model(cfg.model)
    # A LoRA student merged, as the safetensors export merges it (its base is float here).
    params, served_model = merged_student(checkpoint.restore_params(run_dir, abstract, step),
                                          cfg.model)
    served = dataclasses.replace(cfg, model=served_model)

    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    types = write_gguf(partial / GGUF_FILE, params, served, architecture, vocabulary, dtype,
                       run_dir.name, gguf)
    weights = ", ".join(f"{part} {kind}" for part, kind in types.items())
    card = model_card(cfg, info, read_report(run_dir), step, f"GGUF ({weights})",
                      str(tokenizer) if tokenizer else None, count_params(abstract))
    (partial / "README.md").write_text(card.split("\n## Use\n")[0] + _use_section())
    write_sums(partial)
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return {"out_dir": str(out_dir), "step": step, "dtype": weights, "files": [GGUF_FILE],
            "tokenizer": str(tokenizer) if tokenizer else None}


def check_expressible(m: ModelConfig) -> str:
    """The GGUF architecture of the model `m`, or a ConfigError naming what it cannot hold."""
    architecture = ARCHITECTURES.get(m.family)
    if architecture is None:
        raise ConfigError(f"--format gguf writes the llama, mistral and qwen2 families; "
                          f"model.family is {m.family}")
    formats = {part: m.weight_format(part) for part in ("layers", "embedding", "head")}
    other = {part: fmt for part, fmt in formats.items()
             if fmt not in ("none", *LLAMA_CPP_FORMATS)}
    if other:
        part, fmt = next(iter(other.items()))
        raise ConfigError(f"--format gguf stores llama.cpp's q8_0 and q4_0 exactly but no other "
                          f"grid: the {part} were trained as {fmt}; train with q8_0 or q4_0")
    if m.quantize_activations != "none":
        raise ConfigError("--format gguf cannot hold model.quantize_activations "
                          f"{m.quantize_activations}: llama.cpp serves float activations")
    biases = (m.qkv_bias, m.o_bias) != ((True, False) if architecture == "qwen2" else
                                        (False, False))
    if biases or m.qk_norm or m.sliding_window:
        raise ConfigError(f"--format gguf: llama.cpp's {architecture} architecture, as "
                          "transformers reads it back, has "
                          + ("q, k and v biases" if architecture == "qwen2" else "no biases")
                          + ", no q/k norms and no sliding window; this model differs")
    if m.rope_scaling != "none":
        raise ConfigError(f"--format gguf writes unscaled rotary embeddings; model.rope_scaling "
                          f"is {m.rope_scaling}")
    if architecture == "qwen2" and m.resolved_head_dim * m.n_heads != m.d_model:
        raise ConfigError("--format gguf: a qwen2 GGUF has heads of d_model / n_heads; "
                          f"model.head_dim is {m.resolved_head_dim}")
    return architecture


def tokenizer_metadata(path: Path | None, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's tokenizer metadata for the run's tokenizer.json (None: the byte tokenizer,
    refused), padded to the model's `vocab_size` rows with unused tokens."""
    if path is None:
        # llama.cpp reads a BPE vocabulary only with its merges, and gguf-py writes no empty list
        raise ConfigError("--format gguf needs a byte-level BPE tokenizer.json; the byte "
                          "tokenizer has no merges for llama.cpp's gpt2 vocabulary")
    tokens, types, merges, pre, special = _read_tokenizer(path)
    if len(tokens) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokens)} tokens, more than the model's "
                          f"{vocab_size} rows")
    padding = range(len(tokens), vocab_size)
    return {"tokens": tokens + [f"[PAD{i}]" for i in padding], "pre": pre, "merges": merges,
            "types": types + [UNUSED] * len(padding), "special": special}


def _read_tokenizer(path: Path) -> tuple[list[str], list[int], list[str], str, dict[str, int]]:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = tuple((step.get("type"), bool(step.get("use_regex", step.get("individual_digits"))))
                  for step in steps)
    if model.get("type") != "BPE" or shape not in PRE_TOKENIZERS:
        raise ConfigError(f"--format gguf writes byte-level BPE tokenizers split as GPT-2 or "
                          f"SmolLM split; {path} is {model.get('type')} with pre-tokenizer "
                          f"{' + '.join(kind for kind, _ in shape) or 'none'}")
    by_id = {index: token for token, index in model["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(by_id) + 1
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(size)]
    token_types = [types.get(index, NORMAL if index in by_id else UNUSED) for index in range(size)]
    merges = [merge if isinstance(merge, str) else " ".join(merge)
              for merge in model.get("merges") or []]
    special = {}
    config = path.parent / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    for key in ("bos_token", "eos_token"):
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in tokens:
            special[key] = tokens.index(token)
    return tokens, token_types, merges, PRE_TOKENIZERS[shape], special


def write_gguf(path: Path, params: dict, cfg: Config, architecture: str,
               vocabulary: dict[str, Any], dtype: str, name: str, gguf: Any) -> dict[str, str]:
    """Write the GGUF file; returns the GGUF type of each part (layers, embedding, head)."""
    m = cfg.model
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"{name} (kd_jax student)")
    writer.add_context_length(m.max_seq_len)
    writer.add_embedding_length(m.d_model)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(m.d_ff)
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.n_kv_heads)
    writer.add_key_length(m.resolved_head_dim)
    writer.add_value_length(m.resolved_head_dim)
    writer.add_rope_dimension_count(m.resolved_head_dim)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_layer_norm_rms_eps(m.norm_eps)
    writer.add_vocab_size(m.vocab_size)
    layers_format = m.weight_format("layers")
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "none": {"float32": gguf.LlamaFileType.ALL_F32,
                          "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]}[layers_format]
    writer.add_file_type(file_type)
    if layers_format != "none":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    writer.add_token_merges(vocabulary["merges"])
    if "bos_token" in vocabulary["special"]:
        writer.add_bos_token_id(vocabulary["special"]["bos_token"])
    if "eos_token" in vocabulary["special"]:
        writer.add_eos_token_id(vocabulary["special"]["eos_token"])
    writer.add_add_bos_token(False)  # kd_jax trains on the text's tokens alone

    types = {}

    def add(tensor_name: str, value: Any, fmt: str | None, permute_heads: int = 0) -> str:
        """A weight in Hugging Face's [out, in] layout (fmt None: a norm or bias, F32)."""
        value = np.asarray(value, np.float32)
        if fmt in LLAMA_CPP_FORMATS:
            data, kind = ggml_blocks(value, fmt), getattr(gguf.GGMLQuantizationType, fmt.upper())
        elif fmt is None or dtype == "float32":
            data, kind = value, gguf.GGMLQuantizationType.F32
        elif dtype == "float16":
            data, kind = value.astype(np.float16), gguf.GGMLQuantizationType.F16
        else:
            data, kind = bfloat16_bits(value), gguf.GGMLQuantizationType.BF16
        if permute_heads and architecture == "llama":
            data = rotary_rows(data, permute_heads)
        writer.add_tensor(tensor_name, np.ascontiguousarray(data),
                          raw_dtype=None if kind.name in ("F32", "F16") else kind)
        return kind.name

    types["embedding"] = add("token_embd.weight", params["embedding"],
                             m.weight_format("embedding"))
    add("output_norm.weight", params["final_norm"], None)
    if not m.tie_embeddings:  # without output.weight llama.cpp uses token_embd as the head
        types["head"] = add("output.weight", params["head"], m.weight_format("head"))
    layers = params["layers"]
    for index in range(m.n_layers):
        layer = {key: np.asarray(value[index], np.float32) for key, value in layers.items()}
        block = f"blk.{index}."
        d = m.d_model
        add(block + "attn_norm.weight", layer["attn_norm"], None)
        add(block + "ffn_norm.weight", layer["mlp_norm"], None)
        types["layers"] = add(block + "attn_q.weight", layer["wq"].reshape(d, -1).T,
                              layers_format, m.n_heads)
        add(block + "attn_k.weight", layer["wk"].reshape(d, -1).T, layers_format, m.n_kv_heads)
        add(block + "attn_v.weight", layer["wv"].reshape(d, -1).T, layers_format)
        add(block + "attn_output.weight", layer["wo"].reshape(-1, d).T, layers_format)
        add(block + "ffn_gate.weight", layer["w_gate"].T, layers_format)
        add(block + "ffn_up.weight", layer["w_up"].T, layers_format)
        add(block + "ffn_down.weight", layer["w_down"].T, layers_format)
        if m.qkv_bias:
            add(block + "attn_q.bias", layer["bq"].reshape(-1), None)
            add(block + "attn_k.bias", layer["bk"].reshape(-1), None)
            add(block + "attn_v.bias", layer["bv"].reshape(-1), None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {part: types[part] for part in ("layers", "embedding", "head") if part in types}


def ggml_blocks(w_oi: np.ndarray, fmt: str) -> np.ndarray:
    """The bytes of ggml's q8_0 or q4_0 blocks of `w_oi` [out, in] (blocks along in), uint8
    [out, in / 32 * block bytes], from the codes and scales of `kd_jax.models.quantize`, the
    function the forward pass fake-quantizes with. A block is its float16 scale, then its codes:
    q8_0 32 int8; q4_0 16 bytes, byte j holding code j + 8 in its low and code j + 16 + 8 in
    its high four bits."""
    codes, scales = quantize.quantize(jnp.asarray(w_oi), fmt, 0, -1)
    codes = np.asarray(codes)  # [out, blocks, 32]
    scale_bytes = np.asarray(scales).astype("<f2").view(np.uint8)  # [out, blocks, 2]
    if fmt == "q8_0":
        payload = codes.view(np.uint8)
    else:
        nibbles = (codes + 8).astype(np.uint8)
        payload = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    blocks = np.concatenate([scale_bytes, payload], axis=-1)
    return blocks.reshape(w_oi.shape[0], -1)


def bfloat16_bits(value: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits, round to nearest even (what jax and torch convert with)."""
    return np.asarray(jnp.asarray(value).astype(jnp.bfloat16)).view(np.uint16)


def rotary_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """A query or key projection's rows [heads * head_dim, ...] reordered for llama.cpp's rotary
    embedding: within each head, the rows of dimension i and i + head_dim / 2 (the pair Hugging
    Face rotates together) become adjacent (rows 2i and 2i + 1)."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _use_section() -> str:
    return "\n".join([
        "\n## Use", "",
        f"With llama.cpp: `llama-cli -m {GGUF_FILE}` (or `llama-server -m {GGUF_FILE}`).", "",
        "With transformers (weights dequantized to float):", "", "```python",
        "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\", "
        f"gguf_file=\"{GGUF_FILE}\")", "```", ""])
