"""Config files and overrides: typed values, unknown keys, cross-field checks, and the named
choices (`Literal` fields) shared with the modules that implement them."""

import dataclasses
import subprocess
import sys
import textwrap
import typing

import pytest
import yaml

from kd_jax import config as config_lib
from kd_jax.config import ConfigError


def _literal_fields():
    """(section, key, Literal type) of every field whose value is a name from a fixed list."""
    found = []
    for section in dataclasses.fields(config_lib.Config):
        if section.name not in config_lib.SECTIONS:  # the teachers list
            continue
        hints = typing.get_type_hints(section.default_factory)
        for field in dataclasses.fields(section.default_factory):
            kind = hints[field.name]
            if typing.get_origin(kind) is typing.Literal:
                found.append((section.name, field.name, kind))
    return found


LITERAL_FIELDS = _literal_fields()


def _misspelt(name):
    """`name` with its last letter doubled: nearer to `name` than to any other choice."""
    return name + name[-1]


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
    ("model.remat=maybe", "model.remat: 'maybe' is not one of none, full, dots"),
    ("loss.divergence=kl", "loss.divergence: 'kl' is not one of"),
    ("train.batch_size=10", "train.batch_size (10) is not divisible by train.microbatches (4)"),
    ("data.seq_len=1024", "data.seq_len (1024) exceeds model.max_seq_len (512)"),
    ("loss.temperature=0", "loss.temperature must be > 0"),
    ("loss.beta=1.5", "loss.beta must be in [0, 1]"),
    ("model.n_kv_heads=3", "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"),
    ("steps=3", "not of the form section.key=value"),
    ("loss.hidden_weight=-1", "loss.hidden_weight must be >= 0, got -1.0"),
    ("loss.hidden_layers=[[0]]", "expected a list of [student layer, teacher layer] pairs"),
    ("loss.attention_layers=[[0, -1]]", "loss.attention_layers: layer indices are >= 0"),
    ("loss.hidden_layers=[[0, 1]]", "loss.hidden_layers is set but loss.hidden_weight is 0"),
])
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, ["train.microbatches=4", override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.quantize_group=-8"], "model.quantize_group must be >= 0, got -8"),
    (["model.quantize=int8", "model.quantize_group=64", "model.d_ff=96"],
     "model.quantize_group (64) must divide the dimension the weights are grouped along, "
     "d_ff (96)"),
    (["model.quantize=int4", "model.quantize_group=32", "model.n_heads=6", "model.head_dim=8",
      "model.n_kv_heads=2"], "grouped along, n_heads x head_dim (48)"),
    (["model.quantize_embedding=int4", "model.quantize_group=48"], "d_model (128)"),
    (["model.quantize_activations=int8", "model.quantize_group=32"],
     "model.quantize_group is 32 but no weight is quantized"),
    (["model.tie_embeddings=true", "model.quantize_head=int4"],
     "model.quantize_embedding is none and model.quantize_head int4: set them alike"),
])
def test_quantization_settings_that_cannot_apply_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_quantization_formats_resolve_auto_and_group_only_what_is_quantized():
    layers = config_lib.load(None, ["model.quantize=int4", "model.quantize_group=32"]).model
    assert [layers.weight_format(part) for part in ("layers", "embedding", "head")] == [
        "int4", "int8", "int8"]
    assert config_lib.ModelConfig().weight_format("embedding") == "none"
    # Only the embedding is quantized: its rows' d_model (128) is the one dimension grouped.
    embedding = config_lib.load(None, ["model.quantize_embedding=int8", "model.quantize_group=64",
                                       "model.d_ff=96"]).model
    assert [embedding.weight_format(part) for part in ("layers", "embedding", "head")] == [
        "none", "int8", "none"]


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


def test_literal_fields_are_the_named_choices():
    assert {(section, key): kind for section, key, kind in LITERAL_FIELDS} == {
        ("model", "dtype"): config_lib.DType, ("model", "param_dtype"): config_lib.DType,
        ("model", "init"): config_lib.ModelInit, ("model", "family"): config_lib.ModelFamily,
        ("model", "rope_scaling"): config_lib.RopeScaling,
        ("model", "remat"): config_lib.RematPolicy, ("model", "layer_loop"): config_lib.LayerLoop,
        ("model", "attention"): config_lib.AttentionKind,
        ("teacher", "source"): config_lib.TeacherSource,
        ("teacher", "dtype"): config_lib.TeacherDType,
        ("data", "source"): config_lib.DataSource, ("loss", "divergence"): config_lib.Divergence,
        ("loss", "cross_vocab"): config_lib.CrossVocab,
        ("loss", "hidden_kind"): config_lib.HiddenKind,
        ("optimizer", "schedule"): config_lib.Schedule,
        ("mesh", "student_layout"): config_lib.MeshLayout,
        ("mesh", "teacher_layout"): config_lib.MeshLayout,
        ("cache", "mode"): config_lib.CacheMode, ("cache", "value_dtype"): config_lib.ValueDType,
        ("train", "on_nonfinite"): config_lib.NonFinitePolicy,
        ("model", "quantize"): config_lib.WeightFormat,
        ("model", "quantize_embedding"): config_lib.EdgeFormat,
        ("model", "quantize_head"): config_lib.EdgeFormat,
        ("model", "quantize_activations"): config_lib.ActivationFormat,
        ("generate", "model"): config_lib.GenerateModel}
    assert config_lib.choices(config_lib.MeshLayout) == ("replicated", "fsdp", "tensor",
                                                         "fsdp_tensor")


@pytest.mark.parametrize("section,key,kind", LITERAL_FIELDS,
                         ids=[f"{section}.{key}" for section, key, _ in LITERAL_FIELDS])
def test_a_wrong_name_in_yaml_is_refused_with_the_closest_choice(tmp_path, section, key, kind):
    names = config_lib.choices(kind)
    for name in names:
        path = tmp_path / "exp.yaml"
        path.write_text(f"{section}:\n  {key}: {_misspelt(name)}\n")
        with pytest.raises(ConfigError) as err:
            config_lib.load(path)
        assert str(err.value) == (f"{section}.{key}: '{_misspelt(name)}' is not one of "
                                  f"{', '.join(names)} (did you mean '{name}'?)")
        # The right name is taken (read without the cross-field checks: a teacher source of
        # 'checkpoint' alone, say, lacks its path).
        cfg = config_lib.from_dict(yaml.safe_load(f"{section}:\n  {key}: {name}\n"))
        assert getattr(getattr(cfg, section), key) == name


@pytest.mark.parametrize("section,key,kind", LITERAL_FIELDS,
                         ids=[f"{section}.{key}" for section, key, _ in LITERAL_FIELDS])
def test_a_wrong_name_in_a_config_built_in_code_is_refused(section, key, kind):
    names = config_lib.choices(kind)
    for name in names:
        values = dataclasses.replace(getattr(config_lib.Config(), section),
                                     **{key: _misspelt(name)})
        cfg = config_lib.Config(**{section: values})
        with pytest.raises(ConfigError) as err:
            config_lib.validate(cfg)
        assert str(err.value) == (f"{section}.{key}: '{_misspelt(name)}' is not one of "
                                  f"{', '.join(names)} (did you mean '{name}'?)")


def test_the_implementations_read_their_choices_from_the_config():
    from kd_jax.cache import manifest
    from kd_jax.losses import divergences, whitebox
    from kd_jax.models import quantize
    from kd_jax.parallel import mesh

    assert divergences.DIVERGENCES == config_lib.choices(config_lib.Divergence)
    assert whitebox.HIDDEN_KINDS == config_lib.choices(config_lib.HiddenKind)
    assert tuple(mesh.LAYOUTS) == config_lib.choices(config_lib.MeshLayout)
    assert manifest.MODES == config_lib.choices(config_lib.CacheMode)
    assert manifest.VALUE_DTYPES == config_lib.choices(config_lib.ValueDType)
    assert ("none", *quantize.FORMATS) == config_lib.choices(config_lib.WeightFormat)
    assert set(config_lib.choices(config_lib.EdgeFormat)) == {"auto", "none", *quantize.FORMATS}
    assert set(config_lib.choices(config_lib.ActivationFormat)) <= {"none", *quantize.QMAX}
