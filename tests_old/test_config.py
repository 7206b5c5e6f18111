"""Config files and overrides: typed values, unknown keys, cross-field checks."""

import subprocess
import sys
import textwrap

import pytest

from kd_jax import config as config_lib
from kd_jax.config import ConfigError


def test_scientific_notation_override_is_a_float():
    cfg = config_lib.load(None, ["optimizer.lr=1e-3", "train.steps=7", "model.tie_embeddings=true"])
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.model.tie_embeddings is True


def test_yaml_values_are_typed_by_field(tmp_path):
    path = tmp_path / "exp.yaml"
    # yaml.safe_load reads 1e-3 as the string "1e-3" and 2 as an int.
    path.write_text("optimizer:\n  lr: 1e-3\n  warmup_steps: 2\nloss:\n  temperature: 2\n")
    cfg = config_lib.load(path)
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert isinstance(cfg.loss.temperature, float) and cfg.loss.temperature == 2.0


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rate=0.1", "unknown config key 'optimizer.learning_rate'"),
    ("optimiser.lr=0.1", "unknown config section 'optimiser'"),
    ("train.steps=ten", "train.steps: expected int, got 'ten'"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("model.remat=maybe", "model.remat: expected bool"),
    ("loss.divergence=kl", "loss.divergence: 'kl' is not one of"),
    ("train.batch_size=10", "train.batch_size (10) is not divisible by train.microbatches (4)"),
    ("data.seq_len=1024", "data.seq_len (1024) exceeds model.max_seq_len (512)"),
    ("loss.temperature=0", "loss.temperature must be > 0"),
    ("loss.beta=1.5", "loss.beta must be in [0, 1]"),
    ("model.n_kv_heads=3", "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"),
    ("steps=3", "not of the form section.key=value"),
])
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, ["train.microbatches=4", override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer.weight_decay'"):
        config_lib.load(path)
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer'"):
        config_lib.load(None, ["optimiser.lr=0.1"])


def test_dump_and_reload_round_trip(tmp_path):
    cfg = config_lib.load(None, ["optimizer.lr=2e-4", "loss.divergence=jsd", "loss.beta=0.3"])
    config_lib.dump(cfg, tmp_path / "c.yaml")
    assert config_lib.load(tmp_path / "c.yaml") == cfg


def test_every_shipped_config_is_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert shipped, "configs/ holds the example experiments"
    for path in shipped:
        config_lib.load(path)


def test_config_validation_does_not_import_jax(tmp_path):
    code = textwrap.dedent("""
        import sys
        from kd_jax import cli
        code = cli.main(["train", "missing.yaml"])
        assert code == 2, code
        assert "jax" not in sys.modules, "config errors must come before jax is imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_stdlib_configs_are_the_demo_recipe(tmp_path):
    from pathlib import Path

    from kd_jax import demo

    recipe = demo.recipe(tmp_path)
    shipped = Path(__file__).parent.parent / "configs"
    for name, file in (("teacher", "stdlib_teacher"), ("distilled", "stdlib_distill"),
                       ("baseline", "stdlib_baseline")):
        cfg = config_lib.load(shipped / f"{file}.yaml")
        expected = recipe[name]
        for section in ("model", "data", "loss", "optimizer"):
            assert getattr(cfg, section) == getattr(expected, section), (file, section)
        assert cfg.teacher.source == expected.teacher.source, file
        for key in ("steps", "batch_size", "microbatches", "seed", "eval_sequences"):
            assert getattr(cfg.train, key) == getattr(expected.train, key), (file, key)
