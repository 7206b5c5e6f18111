"""kd_jax.train.onpolicy: which rows the student answers and with which prompt; the answers are
the sampler's; lambda = 0 is the off-policy step exactly; an on-policy step is the off-policy
step on the answered batch, and its loss on the student's samples is the generalized JSD
computed in float64 from logits obtained separately."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.config import LossConfig, OnPolicyConfig
from kd_jax.models.generate import Sampling, left_pad, make_sampler
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.train.onpolicy import (
    OnPolicy,
    answered_rows,
    left_padded,
    prompt_lengths,
)
from kd_jax.train.step import init_state, make_update
from tests.helpers import STUDENT, VALID_VOCAB, make_batch
from tests.references import ATOL, RTOL, np_log_softmax

SEQ = 16
JSD = LossConfig(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=1.0, ce_weight=0.0)


def onpolicy(fraction, batch=8, **options):
    cfg = OnPolicyConfig(fraction=fraction, prompt_tokens=options.pop("prompt_tokens", 4),
                         max_new_tokens=options.pop("max_new_tokens", 6), **options)
    return OnPolicy.of(cfg, STUDENT, batch, SEQ, VALID_VOCAB, np.array([-1]))


@pytest.mark.parametrize("batch,fraction", [(8, 0.5), (8, 0.25), (16, 0.3), (6, 1.0), (5, 0.1)])
def test_answered_rows_are_the_fraction_spread_evenly(batch, fraction):
    rows = answered_rows(batch, fraction)
    n = round(fraction * batch)
    assert len(rows) == n and len(set(rows.tolist())) == n and rows.max(initial=0) < batch
    if n:  # every contiguous block of batch / n rows (a device's share) answers one
        gaps = np.diff(np.concatenate([[-1], rows]))
        assert gaps.max() - gaps.min() <= 1
    assert answered_rows(8, 0.5).tolist() == [1, 3, 5, 7]


def reference_prompt(tokens, segment_ids, loss_mask, prompt_tokens, width):
    """A row's prompt, by walking it: the untrained prefix up to the token predicting the first
    trained label, or prompt_tokens; within the first segment and the width."""
    segment = 0
    while segment < len(tokens) and segment_ids[segment] == segment_ids[0]:
        segment += 1
    trained = [i for i, m in enumerate(loss_mask) if m]
    length = trained[0] + 1 if trained and trained[0] > 0 else (
        prompt_tokens if trained else len(tokens) + 1)
    return list(tokens[:max(1, min(length, segment, width))])


def test_a_row_s_prompt_is_its_untrained_prefix_or_its_first_tokens():
    t, prompt_tokens, width = 12, 4, 8
    tokens = np.arange(1, 5 * t + 1, dtype=np.int32).reshape(5, t)
    segment_ids = np.ones((5, t), np.int32)
    loss_mask = np.ones((5, t), np.int32)
    loss_mask[1, :5] = 0  # a prompt/response row: prompt of 6 tokens (labels 0..4 untrained)
    segment_ids[2, 3:] = 2  # first document of 3 tokens
    loss_mask[3, :10] = 0  # a prompt longer than the width: cut to it
    loss_mask[4, :] = 0  # nothing trained: the first segment, cut to the width
    lengths = prompt_lengths(jnp.asarray(segment_ids), jnp.asarray(loss_mask), prompt_tokens,
                             width)
    padded = np.asarray(left_padded(jnp.asarray(tokens), lengths, width))
    expected = [reference_prompt(*row, prompt_tokens, width)
                for row in zip(tokens, segment_ids, loss_mask)]
    assert [len(p) for p in expected] == [4, 6, 3, 8, 8]
    np.testing.assert_array_equal(np.asarray(lengths), [len(p) for p in expected])
    np.testing.assert_array_equal(padded, left_pad(expected, width)[0])


def reference_rows(prompt, answer, t):
    """An answered row, written out: prompt, answer, padding; labels the next tokens of the
    answer's positions."""
    row = list(prompt) + list(answer)
    n = len(row)
    tokens = np.array(row + [0] * (t - n), np.int32)
    mask = np.array([len(prompt) - 1 <= i < n - 1 for i in range(t)], np.int32)
    labels = np.where(mask, np.concatenate([tokens[1:], [0]]), 0)
    in_row = np.arange(t) < n
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "segment_ids": in_row.astype(np.int32), "positions": np.where(in_row, np.arange(t), 0)}


def test_greedy_answers_are_the_sampler_s_and_the_loss_covers_them(tiny_models):
    _, student_params, _, _ = tiny_models
    batch = make_batch(3, seq=SEQ)
    batch["loss_mask"][2, :5] = 0  # one answered row with a prompt of 6 tokens
    rng = jax.random.key_data(jax.random.key(7))
    plain = onpolicy(0.5, temperature=0.0)
    _, plain_metrics = plain.answer(student_params, batch, rng)
    rows = answered_rows(8, 0.5)
    prompts = [reference_prompt(batch["tokens"][r], batch["segment_ids"][r],
                                batch["loss_mask"][r], 4, SEQ - 6) for r in rows]
    sampler = make_sampler(STUDENT, 6, VALID_VOCAB)
    greedy = np.asarray(sampler(student_params, *left_pad(prompts), np.zeros((4, 2), np.uint32),
                                Sampling(), [-1]).tokens_bn)
    assert float(plain_metrics["answer_tokens"]) == 4 * 6
    # A stop token the greedy answers draw: the answers end with it, and it is trained on.
    stop = int(greedy[1, 2])
    stopping = dataclasses.replace(plain, stop_ids=np.array([stop], np.int32))
    answered, metrics = jax.jit(stopping.answer)(student_params, batch, rng)
    expected_tokens = 0
    for row in range(8):
        if row not in rows:
            for key in batch:
                np.testing.assert_array_equal(np.asarray(answered[key][row]), batch[key][row])
            continue
        i = rows.tolist().index(row)
        answer = list(greedy[i])
        if stop in answer:
            answer = answer[:answer.index(stop) + 1]
        expected_tokens += len(answer)
        for key, value in reference_rows(prompts[i], answer, SEQ).items():
            np.testing.assert_array_equal(np.asarray(answered[key][row]), value, err_msg=key)
    assert len(greedy[1]) > 3 and float(metrics["answer_tokens"]) == expected_tokens
    assert float(metrics["answers"]) == 4


def make_step(models, loss, policy):
    student, _, teacher, _ = models
    return jax.jit(make_update(student, OnlineTeacher(teacher), optax.adamw(1e-2),
                               optax.constant_schedule(1e-2), loss, 1, VALID_VOCAB,
                               onpolicy=policy))


def test_lambda_zero_is_the_off_policy_step_exactly(tiny_models):
    """No row answered builds no on-policy part: the step's program is the off-policy one's,
    operation for operation (so its results are the same, bit for bit)."""
    _, student_params, _, teacher_params = tiny_models
    assert onpolicy(0.0) is None and onpolicy(0.05) is None  # no row of 8 answered
    batch = make_batch(4, seq=SEQ)
    state = init_state(student_params, optax.adamw(1e-2), seed=0)
    programs = [str(jax.make_jaxpr(make_step(tiny_models, JSD, policy))(
        state, teacher_params, batch)) for policy in (None, onpolicy(0.0), onpolicy(0.5))]
    assert programs[0] == programs[1] != programs[2]


def test_the_loss_on_student_samples_is_the_reference_generalized_jsd(tiny_models):
    """The step with every row answered: the off-policy step on the answered batch, whose
    loss is the generalized JSD of logits obtained separately."""
    student, student_params, teacher, teacher_params = tiny_models
    batch = make_batch(6, seq=SEQ)
    policy = onpolicy(1.0, temperature=1.0, top_k=20)
    state = init_state(student_params, optax.adamw(1e-2), seed=11)
    on_state, metrics = make_step(tiny_models, JSD, policy)(state, teacher_params, batch)
    answered, answers = policy.answer(state.params, batch, state.rng)
    off_state, off_metrics = make_step(tiny_models, JSD, None)(state, teacher_params, answered)
    for on, off in zip(jax.tree.leaves(on_state), jax.tree.leaves(off_state), strict=True):
        np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-5, atol=1e-7)
    for key, value in off_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5)
    assert float(metrics["answer_tokens"]) == float(answers["answer_tokens"])
    # The answers were sampled: the next step's key draws others.
    again, _ = policy.answer(state.params, batch, on_state.rng)
    assert not np.array_equal(np.asarray(again["tokens"]), np.asarray(answered["tokens"]))
    # Logits obtained separately, the divergence in float64 over the tokenizer's vocabulary.
    t = JSD.temperature
    student_logits = np.asarray(jax.jit(student.logits)(student_params, answered), np.float64)
    teacher_logits = np.asarray(jax.jit(teacher.logits)(teacher_params, answered), np.float64)
    log_q = np_log_softmax(student_logits[..., :VALID_VOCAB], t)
    log_p = np_log_softmax(teacher_logits[..., :VALID_VOCAB], t)
    p, q, beta = np.exp(log_p), np.exp(log_q), JSD.beta
    log_m = np.log(beta * p + (1 - beta) * q)
    jsd = t * t * (beta * (p * (log_p - log_m)).sum(-1)
                   + (1 - beta) * (q * (log_q - log_m)).sum(-1))
    mask = np.asarray(answered["loss_mask"]).astype(bool)
    assert mask.sum() == float(metrics["tokens"]) == float(metrics["answer_tokens"])
    # The float32 tolerances of the loss tests, per token: summed over the answers' tokens.
    np.testing.assert_allclose(float(metrics["kd_sum"]), jsd[mask].sum(), rtol=RTOL,
                               atol=ATOL * mask.sum())
    np.testing.assert_allclose(float(metrics["kd_sum"]) / mask.sum(),
                               float(metrics["loss_sum"]) / float(metrics["tokens"]), rtol=1e-6)


def test_an_on_policy_run_answers_resumes_as_if_uninterrupted(teacher_run, tmp_path):
    """`kd-jax distill` with half of each batch answered by the student (microbatches of 4
    rows): the answers' lengths are logged, and a run stopped and resumed draws the same answers
    and takes the same steps as one that was not."""
    from kd_jax import cli
    from tests.helpers import distill_config, losses_by_step

    root, corpus = teacher_run
    options = ["onpolicy.fraction=0.5", "onpolicy.max_new_tokens=12", "onpolicy.prompt_tokens=8",
               "loss.divergence=jsd", "train.steps=4", "train.checkpoint_every=2",
               "train.eval_sequences=0"]
    runs = {}
    for name, stops in (("whole", [0]), ("resumed", [2, 0])):
        config = distill_config(tmp_path / f"{name}.yaml", corpus, root / "teacher",
                                tmp_path / name)
        for stop_at in stops:
            assert cli.main(["distill", str(config), *options, f"train.stop_at={stop_at}"]) == 0
        runs[name] = [json.loads(line) for line in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
    assert [r["step"] for r in runs["whole"]] == [1, 2, 3, 4]
    assert all(1 <= r["answer_tokens"] <= 12 and np.isfinite(r["kd"]) for r in runs["whole"])
    for whole, resumed in zip(runs["whole"], runs["resumed"], strict=True):
        for key in ("loss", "kd", "answer_tokens"):
            np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-6, err_msg=key)
    assert losses_by_step(tmp_path / "whole") == losses_by_step(tmp_path / "resumed")
