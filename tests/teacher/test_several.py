"""kd_jax.teacher.several and `teachers:`: several teachers in one step. The loss and gradients
of several teachers are the weighted sum of each alone (online, online with another tokenizer,
whole or chunked); a run with an online teacher and a cache takes the same first step as the
weighted sum of the first steps with each alone, and its report has each teacher's agreement;
the config's mistakes are one line each."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from kd_jax import cli
from kd_jax import config as config_lib
from kd_jax.config.teachers import members
from kd_jax.teacher.cross import CrossTokenizerTeacher
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.several import MEMBERS_KEY, SeveralTeachers
from kd_jax.train.step import make_loss_fn
from tests.helpers import (
    FAST_COMPILE,
    LOSS,
    VALID_VOCAB,
    assert_trees_close,
    fast_jit,
    losses_by_step,
    write_config,
)
from tests.teacher.test_cross import CHUNKED, cross_batch, loss_and_grads, partial_buckets

WEIGHTS = (0.5, 0.3, 0.2)


@pytest.mark.parametrize("loss_cfg", [LOSS, CHUNKED], ids=["whole", "chunked"])
def test_several_teachers_are_the_weighted_sum_of_each_alone(tiny_models, loss_cfg):
    student, student_params, teacher, teacher_params = tiny_models
    # A second teacher of the same architecture, other weights; a third of another tokenizer.
    other_params = jax.tree.map(lambda p: p * 1.3 + 0.01, teacher_params)
    cross_fields = cross_batch(3)
    batch = {key: cross_fields[key] for key in
             ("tokens", "labels", "positions", "segment_ids", "loss_mask")}
    own = {key: value for key, value in cross_fields.items() if key not in batch}
    alone = [(OnlineTeacher(teacher), teacher_params, batch),
             (OnlineTeacher(teacher), other_params, batch),
             (CrossTokenizerTeacher(teacher, partial_buckets(), teacher_valid=VALID_VOCAB),
              teacher_params, {**batch, **own})]
    several = SeveralTeachers(tuple(t for t, _, _ in alone), WEIGHTS)
    got = loss_and_grads(make_loss_fn(student, several, loss_cfg, VALID_VOCAB), student_params,
                         tuple(p for _, p, _ in alone),
                         {**batch, MEMBERS_KEY: ({}, {}, own)})
    each = [loss_and_grads(make_loss_fn(student, t, loss_cfg, VALID_VOCAB), student_params, p, b)
            for t, p, b in alone]
    want_loss = sum(w * loss for w, (loss, _, _) in zip(WEIGHTS, each))
    want_grads = jax.tree.map(lambda *g: sum(w * x for w, x in zip(WEIGHTS, g)),
                              *[grads for _, grads, _ in each])
    np.testing.assert_allclose(got[0], want_loss, rtol=1e-5)
    assert_trees_close(got[1], want_grads)
    # The members differ: the sum is not one of them.
    assert abs(each[0][0] - each[1][0]) > 1e-3 and abs(each[0][0] - each[2][0]) > 1e-3


def test_several_teachers_split_into_microbatches(tiny_models):
    """Each member's own fields are split with the batch (a tuple of mappings in the batch)."""
    from kd_jax.train.step import accumulate_gradients

    student, student_params, teacher, teacher_params = tiny_models
    cross_fields = cross_batch(4)
    batch = {key: cross_fields[key] for key in
             ("tokens", "labels", "positions", "segment_ids", "loss_mask")}
    own = {key: value for key, value in cross_fields.items() if key not in batch}
    several = SeveralTeachers(
        (OnlineTeacher(teacher),
         CrossTokenizerTeacher(teacher, partial_buckets(), teacher_valid=VALID_VOCAB)),
        (0.6, 0.4))
    loss_fn = make_loss_fn(student, several, LOSS, VALID_VOCAB)
    full = {**batch, MEMBERS_KEY: ({}, own)}
    one, four = (fast_jit(lambda params, teachers, batch, k=k: accumulate_gradients(
        loss_fn, params, teachers, batch, k))(student_params, (teacher_params, teacher_params),
                                              full) for k in (1, 4))
    assert_trees_close(four[0], one[0])
    np.testing.assert_allclose(float(four[1]["loss_sum"]), float(one[1]["loss_sum"]),
                               rtol=1e-5)


def test_the_teachers_list_is_read_and_checked(tmp_path):
    cfg = config_lib.load(None, [
        "teachers=[{source: checkpoint, path: /runs/a, weight: 3}, "
        "{source: cache, cache: /caches/b, path: /runs/b, weight: 1, layout: fsdp, "
        "dtype: bfloat16}]"])
    (share_a, a), (share_b, b) = members(cfg)
    assert (share_a, share_b) == (0.75, 0.25)
    assert (a.teacher.source, a.teacher.path, a.teachers) == ("checkpoint", "/runs/a", [])
    assert (b.teacher.source, b.cache.dir, b.mesh.teacher_layout, b.teacher.dtype) == (
        "cache", "/caches/b", "fsdp", "bfloat16")
    assert cfg.teacher.source == "none" and cfg.mesh.teacher_layout == "replicated"
    # Written and read back as a run directory's config.yaml is.
    config_lib.dump(cfg, tmp_path / "config.yaml")
    assert config_lib.load(tmp_path / "config.yaml").teachers == cfg.teachers


@pytest.mark.parametrize("overrides, message", [
    (["teachers=[{source: checkpoint, path: /a, weight: 1}]", "teacher.source=hf",
      "teacher.path=/b"], "not both"),
    (["teachers=[{source: checkpoint, weight: 1}]"], "teachers[0]: teacher.source is "
                                                     "'checkpoint' but teacher.path is empty"),
    (["teachers=[{source: hf, path: /a, weight: -1}]"], "teachers[0].weight must be"),
    (["teachers=[{source: hf, path: /a}]"], "must be a mapping with a source and a weight"),
    (["teachers=[{source: hf, path: /a, weight: 1, tokeniser: x}]"],
     "'tokeniser' is not a key of a teacher"),
    (["teachers=[{source: hf, path: /a, weight: 1, layout: diagonal}]"],
     "teachers[0].layout: 'diagonal' is not one of"),
    (["teachers=[{source: none, weight: 1}]"], "teachers[0].source must be checkpoint"),
    (["teachers=[{source: hf, path: /a, weight: 1}]", "loss.hidden_weight=1"],
     "loss.hidden_weight matches the student's layers to one teacher's"),
    (["teachers.weight=1"], "teachers is a list of teachers"),
    (["teachers=3"], "teachers: expected a list of mappings"),
])
def test_mistakes_in_the_teachers_list_are_one_line(overrides, message):
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


ONE_STEP = ["train.steps=1", "train.microbatches=1"]


def first_step_loss(config) -> float:
    """The loss of step 1 of `config`'s one-step distillation, as metrics.jsonl records it, from
    the run's own step on its first batch (nothing evaluated or written; compiled with
    FAST_COMPILE)."""
    from kd_jax.train import builder

    run = builder.build(config_lib.load(config, ONE_STEP), "distill")
    try:
        state, batch = run.fresh_state(), run.placement.place(run.host_batch(0))
        update = run.update_fn().lower(state, run.teacher_params, batch).compile(
            compiler_options=FAST_COMPILE)
        _, metrics = update(state, run.teacher_params, batch)
    finally:
        run.close()
    return float(metrics["loss_sum"]) / float(metrics["tokens"])


@pytest.fixture(scope="module")
def runs(sampled_cache, tmp_path_factory):
    """One step of the sampled cache's distillation from both teachers (weights 3 and 1)
    through the CLI, and the first-step losses of the online teacher alone and the cache
    alone: name -> the run directory ("both") or the loss."""
    _, corpus, _ = sampled_cache
    root = tmp_path_factory.mktemp("several")
    base_cfg = config_lib.load(sampled_cache[2])
    teacher = base_cfg.teacher.path
    cache = base_cfg.cache.dir
    extra = "loss:\n  ce_weight: 1.0\n"
    settings = {
        "online": f"teacher:\n  source: checkpoint\n  path: {teacher}\n",
        "cached": f"teacher:\n  source: cache\n  path: {teacher}\ncache:\n  dir: {cache}\n",
        "both": (f"teachers:\n  - {{source: checkpoint, path: {teacher}, weight: 3}}\n"
                 f"  - {{source: cache, path: {teacher}, cache: {cache}, weight: 1}}\n"),
    }
    configs = {name: write_config(root / f"{name}.yaml", corpus, root / name, text + extra)
               for name, text in settings.items()}
    assert cli.main(["distill", str(configs["both"]), *ONE_STEP]) == 0
    return {"both": root / "both", **{name: first_step_loss(configs[name])
                                      for name in ("online", "cached")}}


def test_a_run_with_two_teachers_takes_the_weighted_sum_step(runs):
    online, cached, both = runs["online"], runs["cached"], losses_by_step(runs["both"])[1]
    assert abs(online - cached) > 1e-4  # sampled targets differ from the exact ones
    np.testing.assert_allclose(both, 0.75 * online + 0.25 * cached, rtol=1e-5)


def test_the_report_has_each_teachers_agreement(runs):
    report = json.loads((runs["both"] / "report.json").read_text())
    assert sorted(report["teachers"]) == ["teachers[0]", "teachers[1]"]
    for name, entry in report["teachers"].items():
        assert 0 <= entry["student_agreement"] <= 1 and entry["student_kl"] >= 0
        assert entry["params"] > 0 and entry["bits_per_byte"] > 0
    # Both entries name the same teacher run: the same statistics, the student's own agreement.
    first, second = report["teachers"]["teachers[0]"], report["teachers"]["teachers[1]"]
    assert first["bits_per_byte"] == pytest.approx(second["bits_per_byte"])
    assert report["student"]["agreement"] == pytest.approx(first["student_agreement"])
    info = json.loads((runs["both"] / "run.json").read_text())
    assert [entry["path"] for entry in info["teachers"]] == [first["path"], second["path"]]


def test_precompute_and_plan_refuse_what_they_cannot_do(sampled_cache, tmp_path, capsys):
    _, corpus, config = sampled_cache
    cfg = config_lib.load(config)
    teachers = (f"teachers=[{{source: checkpoint, path: {cfg.teacher.path}, weight: 1}}, "
                f"{{source: cache, cache: {cfg.cache.dir}, weight: 1}}]")
    assert cli.main(["precompute", str(config), "teacher.source=none", teachers,
                     f"cache.dir={tmp_path / 'c'}"]) == 2
    assert "writes one teacher's cache" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_plan_counts_every_teacher(sampled_cache):
    """Two online teachers hold twice one's parameters in the planned step."""
    from kd_jax.train.plan import plan

    cfg = config_lib.load(sampled_cache[2])
    one = plan(dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, source="checkpoint")))
    path = cfg.teacher.path
    two = plan(config_lib.load(sampled_cache[2], [
        "teacher.source=none", "teacher.path=",
        f"teachers=[{{source: checkpoint, path: {path}, weight: 1}}, "
        f"{{source: checkpoint, path: {path}, weight: 2}}]"]))
    assert one["teacher_params"] > 0
    assert two["teacher_params"] == 2 * one["teacher_params"]
