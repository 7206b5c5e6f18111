"""The GGUF export round trip (`kd-jax export RUN OUT --format gguf`): tiny runs trained through
the CLI with llama.cpp's q4_0 and q8_0 (and one in float) are exported, read back by gguf-py's
reader (the raw blocks) and by transformers' GGUF loader (which dequantizes with gguf-py and
undoes llama.cpp's query/key row order), and compared with kd_jax: the served weights are the
weights kd_jax's forward pass saw, bit for bit; the blocks are the ones gguf-py's own quantizer
(ggml's reference, in numpy) makes of the float master weights; the logits are kd_jax's
quantized forward pass's within float32 accumulation error.
"""

from __future__ import annotations

import hashlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kd_jax import checkpoint, cli  # noqa: E402
from kd_jax.export_gguf import GGUF_FILE, rotary_rows  # noqa: E402
from kd_jax.models import quantize  # noqa: E402
from kd_jax.models.pure import abstract_model  # noqa: E402
from kd_jax.run_dir import read_run  # noqa: E402
from tests.helpers import write_config  # noqa: E402

# transformers and kd_jax sum the same float32 products in other orders: the existing
# safetensors round trip's tolerance (tests/test_export.py).
LOGITS_ATOL = 1e-4

VOCAB_ROWS = 320  # the tokenizer's 300 tokens and 20 padding rows


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory, teacher_run):
    """A byte-level BPE tokenizer.json (GPT-2's split) of 300 tokens learnt from the corpus, with
    an end-of-text token that tokenizer_config.json names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _, corpus = teacher_run
    root = tmp_path_factory.mktemp("bpe")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return root / "tokenizer.json"


def train(tmp_path, corpus, tokenizer, overrides):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", corpus, run_dir)
    # Two steps: the weights need not be good, only trained through the quantized forward pass.
    assert cli.main(["train", str(config), f"data.tokenizer={tokenizer}",
                     f"model.vocab_size={VOCAB_ROWS}", "train.steps=2",
                     "train.checkpoint_every=2", "train.microbatches=1",
                     "train.eval_sequences=4", *overrides]) == 0
    return run_dir


CASES = {
    "llama q4_0": ["model.quantize=q4_0"],  # the embedding and head: q8_0 (auto)
    "qwen2 q8_0, tied q4_0 embedding": [
        "model.family=qwen2", "model.qkv_bias=true", "model.tie_embeddings=true",
        "model.quantize=q8_0", "model.quantize_embedding=q4_0", "model.quantize_head=q4_0"],
}


def served_weights(run_dir):
    """(config, float master params, Hugging Face name -> the weight as kd_jax's forward pass
    sees it, in torch's [out, in] layout)."""
    cfg, _ = read_run(run_dir)
    m = cfg.model
    _, abstract = abstract_model(m)
    params = checkpoint.restore_params(run_dir, abstract)
    seen = {"model.embed_tokens.weight": quantize.rows(params["embedding"], m, "embedding"),
            "model.norm.weight": params["final_norm"],
            "lm_head.weight": quantize.rows(params["embedding" if m.tie_embeddings else "head"],
                                            m, "head")}
    for index in range(m.n_layers):
        layer = quantize.layer_weights({key: value[index] for key, value in
                                        params["layers"].items()}, m)
        prefix = f"model.layers.{index}."
        seen[prefix + "input_layernorm.weight"] = layer["attn_norm"]
        seen[prefix + "post_attention_layernorm.weight"] = layer["mlp_norm"]
        for name, key in (("q", "wq"), ("k", "wk"), ("v", "wv")):
            seen[prefix + f"self_attn.{name}_proj.weight"] = layer[key].reshape(m.d_model, -1).T
            if m.qkv_bias:
                seen[prefix + f"self_attn.{name}_proj.bias"] = layer[f"b{name}"].reshape(-1)
        seen[prefix + "self_attn.o_proj.weight"] = layer["wo"].reshape(-1, m.d_model).T
        for name, key in (("gate", "w_gate"), ("up", "w_up"), ("down", "w_down")):
            seen[prefix + f"mlp.{name}_proj.weight"] = layer[key].T
    return cfg, params, {name: np.asarray(value, np.float32) for name, value in seen.items()}


def kd_jax_logits(cfg, params, tokens_bt, quantized=True):
    model_cfg = cfg.model if quantized else quantize.unquantized(cfg.model)
    model, _ = abstract_model(model_cfg)
    tokens_bt = jnp.asarray(tokens_bt)
    batch = {"tokens": tokens_bt, "segment_ids": jnp.ones_like(tokens_bt),
             "positions": jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)}
    return np.asarray(model.logits(params, batch))


def load_back(out):
    """transformers' model of the file, built as `from_pretrained(out, gguf_file=...)` builds it
    (its config and its dequantized, reordered tensors from transformers' GGUF reader), without
    the accelerate package that `from_pretrained` asks for only to place the tensors."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(out, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(out / GGUF_FILE), return_tensors=True,
                                   model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied head is the embedding itself: the file holds no output.weight.
    assert unexpected == [] and missing == (["lm_head.weight"] if config.tie_word_embeddings
                                            else [])
    model.tie_weights()
    return model, {name: value.numpy() for name, value in model.state_dict().items()}


def check_round_trip(run_dir, out, corpus, tokenizer_path):
    """The served weights and the logits of `out` (an export of `run_dir`) are kd_jax's, and
    its tokenizer the run's."""
    from tokenizers import Tokenizer

    cfg, params, seen = served_weights(run_dir)
    model, state = load_back(out)
    assert set(state) == set(seen)
    for name, value in seen.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    text = corpus.read_text()
    run_tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokens_bt = np.array([run_tokenizer.encode(text[start:start + 400]).ids[:48]
                          for start in (0, 500, 1500)])
    ours = kd_jax_logits(cfg, params, tokens_bt)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens_bt)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=LOGITS_ATOL)
    # The tokenizer as llama.cpp's metadata describes it splits text as the run's did.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE)
    sample = text[2000:2600] + " caf\u00e9 \u00e9t\u00e9 <|endoftext|>"
    ids = run_tokenizer.encode(sample).ids
    assert tokenizer(sample, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.decode(ids) == sample
    assert tokenizer.eos_token == "<|endoftext|>"
    return cfg, params, ours, np.abs(theirs - ours).max()


@pytest.mark.parametrize("case", CASES)
def test_quantized_export_serves_the_weights_the_loss_saw(case, teacher_run, bpe_tokenizer,
                                                          tmp_path, capsys):
    _, corpus = teacher_run
    out = tmp_path / "out"
    run_dir = train(tmp_path, corpus, bpe_tokenizer, CASES[case])
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), str(out), "--format", "gguf"]) == 0
    cfg, params, ours, moved = check_round_trip(run_dir, out, corpus, bpe_tokenizer)
    m = cfg.model
    line = capsys.readouterr().out
    assert f"layers {m.quantize.upper()}, embedding {m.weight_format('embedding').upper()}" in line
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "SHA256SUMS", GGUF_FILE]
    assert "llama-cli -m model.gguf" in (out / "README.md").read_text()

    # The raw blocks: ggml's types, and the very bytes gguf-py's quantizer (ggml's reference
    # implementation) makes of the float master weights.
    reader = gguf.GGUFReader(out / GGUF_FILE)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    architecture = "qwen2" if m.family == "qwen2" else "llama"
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == architecture
    kinds = {name: tensor.tensor_type.name for name, tensor in tensors.items()}
    assert ("output.weight" in kinds) == (not m.tie_embeddings)
    expected_kinds = {"token_embd.weight": m.weight_format("embedding").upper(),
                      "output.weight": m.weight_format("head").upper(),
                      "blk.1.ffn_down.weight": m.quantize.upper(),
                      "blk.0.attn_q.weight": m.quantize.upper(),
                      "blk.0.attn_norm.weight": "F32", "output_norm.weight": "F32"}
    assert {name: kinds[name] for name in expected_kinds if name in kinds} == {
        name: kind for name, kind in expected_kinds.items() if name in kinds}
    if m.qkv_bias:
        assert kinds["blk.0.attn_q.bias"] == "F32"
    layer = {key: np.asarray(value[0], np.float32) for key, value in params["layers"].items()}
    masters = {"token_embd.weight": (np.asarray(params["embedding"]), "embedding"),
               "blk.0.attn_q.weight": (layer["wq"].reshape(m.d_model, -1).T, "layers"),
               "blk.0.attn_k.weight": (layer["wk"].reshape(m.d_model, -1).T, "layers"),
               "blk.0.attn_output.weight": (layer["wo"].reshape(-1, m.d_model).T, "layers"),
               "blk.0.ffn_down.weight": (layer["w_down"].T, "layers")}
    for name, (master, part) in masters.items():
        kind = getattr(gguf.GGMLQuantizationType, m.weight_format(part).upper())
        blocks = gguf.quants.quantize(np.ascontiguousarray(master, np.float32), kind)
        if architecture == "llama" and name[-13:-7] in ("attn_q", "attn_k"):
            blocks = rotary_rows(blocks, m.n_heads if "attn_q" in name else m.n_kv_heads)
        np.testing.assert_array_equal(np.asarray(tensors[name].data), blocks, err_msg=name)
    # The check tells the quantized model from the float one.
    assert np.abs(kd_jax_logits(cfg, params, np.arange(48)[None] + 40, quantized=False)
                  - kd_jax_logits(cfg, params, np.arange(48)[None] + 40)).max() > 100 * moved


def test_float_export_round_trip(teacher_run, bpe_tokenizer, tmp_path):
    """A run trained in float: F32 weights, the norms and all, and the same logits."""
    _, corpus = teacher_run
    out = tmp_path / "out"
    run_dir = train(tmp_path, corpus, bpe_tokenizer, [])
    assert cli.main(["export", str(run_dir), str(out), "--format", "gguf"]) == 0
    check_round_trip(run_dir, out, corpus, bpe_tokenizer)
    reader = gguf.GGUFReader(out / GGUF_FILE)
    assert {tensor.tensor_type.name for tensor in reader.tensors} == {"F32"}
    fields = {name: field.parts[-1] for name, field in reader.fields.items()}
    assert int(fields["llama.block_count"][0]) == 2
    assert int(fields["llama.attention.head_count_kv"][0]) == 2
    assert int(fields["llama.vocab_size"][0]) == VOCAB_ROWS
    assert bytes(fields["tokenizer.ggml.model"]).decode() == "gpt2"
    assert bytes(fields["tokenizer.ggml.pre"]).decode() == "gpt-2"
    sums = dict(reversed(line.split("  "))
                for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sums == {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                    for name in (GGUF_FILE, "README.md")}


def test_a_lora_student_is_written_merged(teacher_run, bpe_tokenizer, tmp_path, capsys):
    """LoRA on a float base: the file holds W + (alpha / r) A B, and transformers computes the
    adapted student's logits from it. On a base quantized to a llama.cpp format the merged
    weights lie off its grid: refused in one line."""
    _, corpus = teacher_run
    (tmp_path / "base").mkdir()
    base = train(tmp_path / "base", corpus, bpe_tokenizer, [])
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    config = write_config(lora_dir / "run.yaml", corpus, lora_dir / "run")
    assert cli.main(["distill", str(config), f"data.tokenizer={bpe_tokenizer}",
                     f"model.vocab_size={VOCAB_ROWS}", "teacher.source=checkpoint",
                     f"teacher.path={base}", "model.init=teacher", "model.lora_rank=4",
                     "model.lora_alpha=8", "optimizer.lr=3e-2"]) == 0
    out = tmp_path / "out"
    assert cli.main(["export", str(lora_dir / "run"), str(out), "--format", "gguf"]) == 0
    cfg, _ = read_run(lora_dir / "run")
    _, abstract = abstract_model(cfg.model)
    params = checkpoint.restore_params(lora_dir / "run", abstract)
    assert np.any(np.asarray(params["lora"]["b_wq"]))  # the adapters trained
    model, _ = load_back(out)
    tokens_bt = np.arange(48)[None] + 40
    adapted = kd_jax_logits(cfg, params, tokens_bt)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens_bt)).logits.numpy()
    np.testing.assert_allclose(theirs, adapted, rtol=0, atol=LOGITS_ATOL)
    base_cfg, _ = read_run(base)
    base_params = checkpoint.restore_params(base, abstract_model(base_cfg.model)[1])
    assert np.abs(kd_jax_logits(base_cfg, base_params, tokens_bt) - adapted).max() > 1e-3

    quantized = yaml.safe_load((lora_dir / "run" / "config.yaml").read_text())
    quantized["model"]["quantize"] = "q4_0"
    (lora_dir / "run" / "config.yaml").write_text(yaml.safe_dump(quantized))
    capsys.readouterr()
    assert cli.main(["export", str(lora_dir / "run"), str(tmp_path / "q"), "--format",
                     "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lie off the grid the base was quantized to" in err[0]
    assert not (tmp_path / "q").exists()
