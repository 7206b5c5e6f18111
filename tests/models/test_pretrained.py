"""kd_jax.models.pretrained and families: Hugging Face checkpoints of every supported family
give transformers' logits; export is lossless and loads back in transformers; bad checkpoints
are one-line errors.

Each checkpoint is a tiny random model made and saved by transformers in the test
(`tests/hf_checkpoints.py`), in both config.json layouts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kd_jax.config import ConfigError  # noqa: E402
from kd_jax.models import load_pretrained  # noqa: E402
from kd_jax.models.pretrained import (  # noqa: E402
    load_params,
    open_checkpoint,
    save_params,
)
from kd_jax.models.pure import abstract_model  # noqa: E402
from kd_jax.models.safetensors_files import read_block, read_header  # noqa: E402
from tests.hf_checkpoints import KINDS, hf_logits, make_checkpoint  # noqa: E402

ATOL = 1e-4  # float32, max absolute difference of logits


def tokens(seed: int = 0, batch: int = 2, seq: int = 14):
    # 14 tokens: past the mistral window of 5 tokens, so the window changes the result.
    return np.random.default_rng(seed).integers(0, 96, (batch, seq))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> {layout: path}, made once for the module."""
    made = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        made[kind] = {layout: make_checkpoint(root / layout, kind, layout)
                      for layout in ("v5", "v4")}
    return made


@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers(checkpoints, kind, layout):
    path = checkpoints[kind][layout]
    ids = tokens()
    expected = hf_logits(path, ids)
    actual = np.asarray(load_pretrained(path)(ids))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)


# The family feature each kind exercises, and the ModelConfig change that removes it: the
# parity above must depend on it (a loader ignoring the feature would fail).
FEATURES = [
    ("llama3", {"rope_scaling": "none"}),
    ("llama_linear_bias", {"rope_scaling": "none"}),
    ("llama_linear_bias", {"qkv_bias": False, "o_bias": False}),
    ("mistral", {"sliding_window": 0}),
    ("qwen2", {"qkv_bias": False}),
    ("qwen3", {"qk_norm": False}),
]


@pytest.mark.parametrize("kind, change", FEATURES, ids=lambda x: str(x))
def test_the_parity_depends_on_the_family_feature(checkpoints, kind, change):
    path = checkpoints[kind]["v4"]
    ckpt = open_checkpoint(path)
    cfg = dataclasses.replace(ckpt.model_config(), **change)
    model, abstract = abstract_model(cfg)
    params = load_params(ckpt, cfg, abstract)
    ids = tokens()
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    wrong = np.asarray(model.logits(params, {"tokens": ids, "positions": positions,
                                              "segment_ids": np.ones_like(ids)}))
    assert np.abs(wrong - hf_logits(path, ids)).max() > 100 * ATOL


def test_biases_and_norms_are_loaded(checkpoints):
    """qwen2 has q/k/v biases, qwen3 q/k norms, llama_linear_bias an o bias: each is read."""
    for kind, names in (("qwen2", ("bq", "bk", "bv")), ("qwen3", ("q_norm", "k_norm")),
                        ("llama_linear_bias", ("bq", "bo"))):
        params = load_pretrained(checkpoints[kind]["v5"]).params
        for name in names:
            value = np.asarray(params["layers"][name])
            assert np.abs(value - np.round(value)).max() > 0, (kind, name)  # not 0s or 1s


# One kind per tensor map: Llama's (untied, and with attention biases), tied, Qwen2's, Qwen3's.
@pytest.mark.parametrize("kind", ["llama3", "llama_linear_bias", "smollm", "qwen2", "qwen3"])
def test_import_export_is_lossless_and_loads_in_transformers(checkpoints, kind, tmp_path):
    path = checkpoints[kind]["v5"]
    loaded = load_pretrained(path)
    base = json.loads((path / "config.json").read_text())
    save_params(loaded.params, loaded.config, tmp_path, "float32", base)
    original, exported = _tensors(path), _tensors(tmp_path)
    assert set(exported) == set(original) - {"lm_head.weight"} if loaded.config.tie_embeddings \
        else set(exported) == set(original)
    for name, value in exported.items():
        assert value.dtype == original[name].dtype, name
        assert value.tobytes() == original[name].tobytes(), name
    ids = tokens(1)
    np.testing.assert_allclose(hf_logits(tmp_path, ids), hf_logits(path, ids), rtol=0, atol=1e-6)


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        header, start = read_header(file)
        for name, entry in header.items():
            out[name] = read_block(file, entry, start, tuple(slice(None) for _ in entry["shape"]))
    return out


def test_bfloat16_checkpoint_converts_and_exports_back_exactly(tmp_path):
    import torch

    from tests.hf_checkpoints import hf_model

    source = tmp_path / "bf16"
    hf_model("qwen2").to(torch.bfloat16).save_pretrained(source)
    loaded = load_pretrained(source)  # float32
    assert np.asarray(loaded.params["embedding"]).dtype == np.float32
    out = tmp_path / "out"
    out.mkdir()
    save_params(loaded.params, loaded.config, out, "bfloat16",
                json.loads((source / "config.json").read_text()))
    original, exported = _tensors(source), _tensors(out)
    for name, value in exported.items():
        assert value.tobytes() == original[name].tobytes(), name
    as_bf16 = load_pretrained(source, dtype="bfloat16")
    assert str(np.asarray(as_bf16.params["embedding"]).dtype) == "bfloat16"


def test_sharded_checkpoint_with_index(checkpoints, tmp_path):
    from tests.hf_checkpoints import hf_model

    hf_model("llama3").save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = tokens()
    np.testing.assert_allclose(np.asarray(load_pretrained(tmp_path)(ids)),
                               hf_logits(tmp_path, ids), rtol=0, atol=ATOL)


def _copy(path, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_unsupported_architecture_lists_the_supported_ones(checkpoints, tmp_path):
    path = _copy(checkpoints["llama2"]["v5"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        open_checkpoint(path)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from kd_jax.models.safetensors_files import write_file

    path = _copy(checkpoints["llama2"]["v5"], tmp_path)
    tensors = _tensors(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_file(path / "model.safetensors", tensors)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_pretrained(path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(checkpoints, tmp_path):
    path = _copy(checkpoints["llama2"]["v5"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has "
                                          r"shape \[(48, 32|32, 48)\], config\.json implies "
                                          r"\[(40, 32|32, 40)\]"):
        load_pretrained(path)


def test_pickle_weights_are_refused_unread(tmp_path, checkpoints):
    path = _copy(checkpoints["llama2"]["v5"], tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not read: unpickling would run code")
    with pytest.raises(ConfigError, match="pickle weights.*pytorch_model.bin.*safetensors"):
        open_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"num_attention_heads": None}, "num_attention_heads"),
])
def test_unsupported_or_broken_config_is_one_line(checkpoints, tmp_path, change, message):
    path = _copy(checkpoints["llama2"]["v4"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as err:
        load_pretrained(path)
    assert "\n" not in str(err.value)


def test_truncated_weights_are_one_line(checkpoints, tmp_path):
    path = _copy(checkpoints["llama2"]["v5"], tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated"):
        open_checkpoint(path)


def test_a_damaged_download_in_the_hub_cache_is_named(tmp_path):
    """The hub names a weights blob by its SHA-256: a flipped byte is found before loading."""
    import hashlib
    import shutil

    from kd_jax.config import ConfigError
    from kd_jax.models.pretrained import open_checkpoint, weight_digests

    source = make_checkpoint(tmp_path / "plain", "llama2")
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in source.iterdir():
        if file.suffix == ".safetensors":
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blobs / digest)
            (snapshot / file.name).symlink_to(blobs / digest)
        else:
            shutil.copyfile(file, snapshot / file.name)
    weight_digests(open_checkpoint(snapshot))  # sound
    blob = next(blobs.iterdir())
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="do not match the SHA-256 the Hugging Face cache"):
        weight_digests(open_checkpoint(snapshot))
