"""kd_jax.eval.evaluate with a teacher of another tokenizer: scored on its own next tokens within
each piece (against numpy over its logits), and compared with the student where positions
align; with one tokenizer through that path, the comparison is the usual agreement and KL."""

import numpy as np

from kd_jax.eval.evaluate import OTHER_ROWS, OtherTokenizer, make_eval_fn
from kd_jax.losses.cross_vocab import Buckets
from tests.helpers import STUDENT, VALID_VOCAB, make_batch
from tests.teacher.test_cross import cross_batch, partial_buckets


def log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def rows_of(batch):
    return {key: batch[key] for key in ("teacher_tokens", "teacher_positions",
                                        "teacher_segment_ids", "teacher_index")}


def test_one_tokenizer_through_the_other_path_is_the_usual_comparison(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = make_batch(0)
    seq = batch["tokens"].shape[1]
    rows = {"teacher_tokens": batch["tokens"], "teacher_positions": batch["positions"],
            "teacher_segment_ids": batch["segment_ids"],
            "teacher_index": np.broadcast_to(np.arange(seq, dtype=np.int32),
                                             batch["tokens"].shape).copy()}
    other = OtherTokenizer(teacher, Buckets.identity(VALID_VOCAB, STUDENT.vocab_size),
                           np.ones(VALID_VOCAB, np.int64), VALID_VOCAB)
    got = make_eval_fn(student, {"t": other}, VALID_VOCAB)(
        student_params, {"t": teacher_params}, {**batch, OTHER_ROWS: {"t": rows}})
    want = make_eval_fn(student, teacher, VALID_VOCAB)(student_params, teacher_params, batch)
    versus, usual = got["student~t"], want["student"]
    assert float(versus["tokens"]) == float(usual["tokens"]) > 0
    assert float(versus["agree_sum"]) == float(usual["agree_sum"])
    np.testing.assert_allclose(float(versus["kl_sum"]), float(usual["kl_sum"]), rtol=1e-5)


def test_a_teacher_of_another_tokenizer_is_scored_on_its_own_tokens(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = cross_batch(5)
    # Two pieces in each teacher row, the second shorter; a few positions past them.
    segments = np.ones_like(batch["teacher_segment_ids"])
    segments[:, 12:] = 2
    segments[:, 18:] = 0
    batch["teacher_segment_ids"] = segments
    byte_lengths = np.random.default_rng(0).integers(1, 5, VALID_VOCAB)
    other = OtherTokenizer(teacher, partial_buckets(), byte_lengths, VALID_VOCAB)
    got = make_eval_fn(student, {"t": other}, VALID_VOCAB)(
        student_params, {"t": teacher_params}, {**batch, OTHER_ROWS: {"t": rows_of(batch)}})

    logits = teacher.logits(teacher_params, {"tokens": batch["teacher_tokens"],
                                             "positions": batch["teacher_positions"],
                                             "segment_ids": segments})
    log_p = log_softmax(np.asarray(logits)[..., :VALID_VOCAB])
    tokens = batch["teacher_tokens"]
    nll, count, spelled = 0.0, 0, 0
    for row in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if segments[row, t] > 0 and segments[row, t + 1] == segments[row, t]:
                nll -= log_p[row, t, tokens[row, t + 1]]
                count += 1
                spelled += byte_lengths[tokens[row, t + 1]]
    own = got["t"]
    assert float(own["tokens"]) == count
    np.testing.assert_allclose(float(own["nll_sum"]), nll, rtol=1e-5)
    assert float(own["byte_sum"]) == spelled
    # The student is compared only where it aligns and is trained on.
    aligned = (batch["teacher_index"] >= 0) & (batch["loss_mask"] > 0)
    versus = got["student~t"]
    assert float(versus["tokens"]) == aligned.sum()
    assert 0 <= float(versus["agree_sum"]) <= aligned.sum() and float(versus["kl_sum"]) >= 0
