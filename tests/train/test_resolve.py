"""kd_jax.train.resolve: the tokenizer a file, the student's architecture spelled out; and runs
whose student starts from a checkpoint or from the teacher's layers, and a cache built from a
Hugging Face teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from kd_jax import cli
from kd_jax import config as config_lib
from kd_jax.config import ConfigError
from kd_jax.run_dir import read_run
from kd_jax.teacher.loading import teacher_dtype_choice
from kd_jax.train.resolve import resolve, resolve_model, tokenizer_spec


def test_tokenizer_auto_is_the_checkpoints_or_bytes(hf_pair, tmp_path):
    _, _, teacher, student = hf_pair
    assert resolve(config_lib.Config()).data.tokenizer == "byte"
    cfg = config_lib.load(None, ["teacher.source=hf", f"teacher.path={teacher}"])
    assert resolve(cfg).data.tokenizer == str(teacher / "tokenizer.json")
    cfg = config_lib.load(None, ["model.init=hf", f"model.path={student}", "data.seq_len=64",
                                 "teacher.source=hf", f"teacher.path={teacher}"])
    assert resolve(cfg).data.tokenizer == str(student / "tokenizer.json")
    cfg = config_lib.load(None, [f"data.tokenizer={student}"])  # a directory holding one
    assert resolve(cfg).data.tokenizer == str(student / "tokenizer.json")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((student / "config.json").read_text())
    cfg = config_lib.load(None, ["model.init=hf", f"model.path={bare}", "data.seq_len=64"])
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        resolve(cfg)


def test_teacher_dtype_auto_follows_the_platform_s_matrix_units(hf_pair, teacher_run,
                                                                 monkeypatch):
    from kd_jax.teacher import loading

    _, _, teacher, _ = hf_pair
    hf = config_lib.load(None, ["teacher.source=hf", f"teacher.path={teacher}"])
    assert teacher_dtype_choice(hf, "gpu")[0] == teacher_dtype_choice(hf, "tpu")[0] == "bfloat16"
    monkeypatch.setattr(loading, "bfloat16_matmul_units", lambda: None)
    dtype, why = teacher_dtype_choice(hf, "cpu")
    assert dtype == "float32" and "without bfloat16 matrix instructions" in why
    # Unsaid, the platform is told without starting JAX: this suite runs on the CPU alone.
    assert resolve(hf).teacher.dtype == "float32"
    assert resolve_model(hf, platform="gpu").teacher.dtype == "bfloat16"
    monkeypatch.setattr(loading, "bfloat16_matmul_units", lambda: "avx512_bf16")
    dtype, why = teacher_dtype_choice(hf, "cpu")
    assert dtype == "bfloat16" and "(avx512_bf16)" in why
    run = config_lib.load(None, ["teacher.source=checkpoint",
                                 f"teacher.path={teacher_run[0] / 'teacher'}"])
    assert teacher_dtype_choice(run, "gpu")[0] == "float32"
    chosen = config_lib.load(None, ["teacher.source=hf", f"teacher.path={teacher}",
                                    "teacher.dtype=float32"])
    assert teacher_dtype_choice(chosen, "cpu") == ("float32", "teacher.dtype")


def test_a_pretrained_student_takes_the_checkpoints_architecture(hf_pair):
    _, _, _, student = hf_pair
    cfg = config_lib.load(None, ["model.init=hf", f"model.path={student}", "model.remat=true",
                                 "model.d_model=999", "data.seq_len=64"])
    model = resolve(cfg).model
    hf = json.loads((student / "config.json").read_text())
    assert (model.family, model.d_model, model.n_layers, model.vocab_size, model.qkv_bias) == (
        "qwen2", hf["hidden_size"], hf["num_hidden_layers"], 208, True)
    assert model.remat == "full" and model.init == "hf"  # the student's own choices stay
    assert cfg.model.d_model == 999  # the input config is not changed
    too_long = config_lib.load(None, ["model.init=hf", f"model.path={student}",
                                      "data.seq_len=128"])
    with pytest.raises(ConfigError, match=r"data.seq_len \(128\) exceeds the student's "
                                          r"max_seq_len \(64\)"):
        resolve(too_long)


def test_distill_into_a_student_made_of_the_teachers_layers(hf_pair, tmp_path):
    """model.init: teacher, two of its layers in reverse order, MLP and heads pruned by
    importance; the run resumes against the same resolved config, and exports."""
    from tests.hf_checkpoints import hf_distill_config

    root, corpus, teacher, student = hf_pair
    run_dir = tmp_path / "run"
    cfg = hf_distill_config(tmp_path / "d.yaml", corpus, teacher, student, run_dir)
    surgery = ["model.init=teacher", "model.init_layers=[1, 0]", "model.prune_d_ff=32",
               "model.prune_kv_heads=1", "model.prune_batches=2"]
    assert cli.main(["distill", str(cfg), *surgery, "train.stop_at=2"]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert (saved["n_layers"], saved["d_ff"], saved["n_kv_heads"], saved["n_heads"]) == (
        2, 32, 1, 2)
    assert saved["family"] == "qwen2" and saved["vocab_size"] == 224
    assert cli.main(["distill", str(cfg), *surgery]) == 0  # resumes: same resolved config
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    assert "the teacher's layers [1, 0], MLP pruned to 32" in (out / "README.md").read_text()
    hf = json.loads((out / "config.json").read_text())
    assert (hf["num_hidden_layers"], hf["intermediate_size"], hf["num_key_value_heads"]) == (
        2, 32, 1)
    from kd_jax.models import load_pretrained
    from tests.hf_checkpoints import hf_logits

    ids = np.random.default_rng(0).integers(0, 200, (2, 16))
    np.testing.assert_allclose(np.asarray(load_pretrained(out)(ids)), hf_logits(out, ids),
                               rtol=0, atol=1e-4)


def test_a_student_from_unpruned_teacher_layers_starts_as_the_teacher(hf_pair, tmp_path):
    """With every layer kept and nothing pruned, step 0's student is the teacher: their KL is 0."""
    from kd_jax.train import builder

    _, corpus, teacher, student = hf_pair
    cfg = config_lib.load(None, [
        "teacher.source=hf", f"teacher.path={teacher}", "model.init=teacher",
        "data.source=text", f"data.path={corpus}", "data.seq_len=32",
        f"train.run_dir={tmp_path / 'run'}", "train.batch_size=4"])
    run = builder.build(cfg, "distill")
    state = run.fresh_state()
    for name, value in run.loaded_teacher.params["layers"].items():
        np.testing.assert_array_equal(np.asarray(state.params["layers"][name]),
                                      np.asarray(value), err_msg=name)
    assert not (tmp_path / "run").exists()  # building writes nothing


def test_precompute_from_a_hf_teacher_then_distill_from_the_cache(hf_pair, tmp_path, capsys):
    from tests.hf_checkpoints import hf_distill_config

    root, corpus, teacher, student = hf_pair
    cache = tmp_path / "cache"
    cfg = hf_distill_config(tmp_path / "d.yaml", corpus, teacher, student, tmp_path / "run",
                            f"cache: {{dir: {cache}, mode: topk, k: 8, rows_per_shard: 8, "
                            "temperature: 2.0}\n")
    assert cli.main(["precompute", str(cfg)]) == 0
    assert cli.main(["distill", str(cfg), "teacher.source=cache"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "teacher" in report  # teacher.path, a checkpoint directory, is evaluated beside
    # The cache records which teacher made it: another checkpoint is refused.
    capsys.readouterr()
    assert cli.main(["distill", str(cfg), "teacher.source=cache", f"teacher.path={student}",
                     f"train.run_dir={tmp_path / 'other'}"]) == 2
    assert "teacher" in capsys.readouterr().err
    assert not Path(tmp_path / "other").exists()


def test_tokenizer_auto_reads_the_tokenizer_a_cache_was_made_with(hf_pair, tmp_path, capsys):
    """The recipe of docs/offline.md: the distill config is the precompute config with
    teacher.source=cache. A student from scratch has no checkpoint to name the tokenizer, so
    auto resolves to the tokenizer the cache's rows were made with (its copy in the cache, or
    teacher.path's where that matches), not to bytes."""
    _, corpus, teacher, _ = hf_pair
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    config = tmp_path / "d.yaml"
    config.write_text(f"""
teacher: {{source: hf, path: {teacher}}}
model: {{vocab_size: 208, d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 64,
        max_seq_len: 64}}
data: {{source: text, path: {corpus}, seq_len: 32, heldout_fraction: 0.1}}
loss: {{temperature: 2.0, ce_weight: 0.5}}
cache: {{dir: {cache}, mode: topk, k: 8, rows_per_shard: 8, temperature: 2.0}}
train: {{run_dir: {run_dir}, steps: 2, batch_size: 4, log_every: 1, checkpoint_every: 2,
        eval_sequences: 4, progress: false}}
""")
    assert cli.main(["precompute", str(config)]) == 0
    copied = cache / "tokenizer" / "tokenizer.json"
    assert copied.read_bytes() == (teacher / "tokenizer.json").read_bytes()

    cached = config_lib.load(config, ["teacher.source=cache"])
    assert tokenizer_spec(cached) == str(copied)
    assert cli.main(["distill", str(config), "teacher.source=cache"]) == 0
    assert read_run(run_dir)[0].data.tokenizer == str(copied)

    # A cache without the copy (written before it was made) finds teacher.path's instead.
    shutil.rmtree(cache / "tokenizer")
    assert tokenizer_spec(cached) == str(teacher / "tokenizer.json")
    # Neither: one line saying what to set, before anything is written.
    capsys.readouterr()
    assert cli.main(["distill", str(config), "teacher.source=cache", "teacher.path=",
                     f"train.run_dir={tmp_path / 'other'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.tokenizer is auto" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other").exists()
    # A cache of the byte tokenizer resolves to bytes.
    byte_cache = config_lib.load(None, ["teacher.source=cache", f"cache.dir={tmp_path / 'b'}"])
    (tmp_path / "b").mkdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["fingerprints"]["tokenizer"] = "byte-v1"
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    assert tokenizer_spec(byte_cache) == "byte"
