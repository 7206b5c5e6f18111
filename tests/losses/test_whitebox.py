"""kd_jax.losses.whitebox: the hidden-state distance (MSE, cosine) and the attention KL against
float64 numpy references, with padding and two packed segments; masked positions that reach
neither the value nor a gradient; gradients reaching the projection and the student, never the
teacher; the layer mapping and its refusals."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.config import ConfigError
from kd_jax.losses.whitebox import WhiteBox, uniform_pairs
from kd_jax.models import attention
from kd_jax.models.pure import ModelOutputs
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.train.step import make_loss_fn, trainable
from tests.helpers import LOSS, STUDENT, TEACHER, VALID_VOCAB, make_batch
from tests.references import COMPUTE_DTYPE, assert_close, np_kl

B, T = 3, 8
STUDENT_WIDTH, TEACHER_WIDTH, LAYERS = 6, 10, 3
HIDDEN_PAIRS = ((0, 1), (2, 2))
ATTENTION_PAIRS = ((1, 0), (2, 2))


def masks():
    """Segment ids [B, T] (two packed documents a row, then padding) and the loss mask."""
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[:, T // 2:] = 2
    segment_ids[1, -2:] = 0
    segment_ids[2, -3:] = 0
    loss_mask = (segment_ids > 0).astype(np.int32)
    loss_mask[0, 0] = 0  # a prompt token: attended to, not a target
    return segment_ids, loss_mask


def np_allowed(segment_ids):
    """[b, t, s]: a query sees the keys not after it in its own segment (never padding)."""
    causal = np.tril(np.ones((T, T), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same & (segment_ids[:, None, :] > 0)


def whitebox(kind="mse", hidden_weight=0.7, attention_weight=0.3):
    return WhiteBox(hidden_weight, kind, HIDDEN_PAIRS if hidden_weight else (), attention_weight,
                    ATTENTION_PAIRS if attention_weight else (), STUDENT_WIDTH, TEACHER_WIDTH)


def random(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(COMPUTE_DTYPE)


def np_hidden_bt(student_lbtd, teacher_lbte, projection_pde, kind):
    """Per token, float64: the distance of each pair, averaged over the pairs."""
    per_pair = []
    for p, (s, t) in enumerate(HIDDEN_PAIRS):
        projected = student_lbtd[s].astype(np.float64) @ projection_pde[p].astype(np.float64)
        target = teacher_lbte[t].astype(np.float64)
        if kind == "mse":
            per_pair.append(((projected - target) ** 2).mean(-1))
        else:
            cosine = (projected * target).sum(-1) / (
                np.linalg.norm(projected, axis=-1) * np.linalg.norm(target, axis=-1))
            per_pair.append(1.0 - cosine)
    return np.mean(per_pair, axis=0)


def np_attention_probs(q_btnh, k_btkh, allowed_bts):
    """softmax(q k^T / sqrt(h)) per head [b, n, t, s], float64, 0 where masked; query head i
    uses key head i // (n / kv)."""
    n, kv = q_btnh.shape[2], k_btkh.shape[2]
    k_btnh = np.repeat(k_btkh.astype(np.float64), n // kv, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q_btnh.astype(np.float64), k_btnh)
    scores = scores / math.sqrt(q_btnh.shape[-1])
    probs = np.zeros_like(scores)
    for b, i in np.ndindex(allowed_bts.shape[:2]):
        keys = allowed_bts[b, i]
        if keys.any():
            row = np.exp(scores[b, :, i, keys] - scores[b, :, i, keys].max(0))
            probs[b, :, i, keys] = row / row.sum(0)
    return probs


def np_attention_bt(student_probs, teacher_probs):
    """Per query token, float64: KL(teacher || student) of the head groups' mean distributions,
    averaged over the groups and the pairs (lists of [b, n, t, s], one per pair)."""
    per_pair = []
    for student, teacher in zip(student_probs, teacher_probs):
        groups = math.gcd(student.shape[1], teacher.shape[1])
        b, _, t, s = student.shape
        q = student.reshape(b, groups, -1, t, s).mean(2)
        p = teacher.reshape(b, groups, -1, t, s).mean(2)
        per_pair.append(np_kl(p, np.where(p > 0, q, 1.0)).mean(1))
    return np.mean(per_pair, axis=0)


def masked_mean(values_bt, loss_mask):
    return (values_bt * loss_mask).sum() / loss_mask.sum()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_the_hidden_term_is_the_float64_reference(kind):
    segment_ids, loss_mask = masks()
    student = random(0, (LAYERS, B, T, STUDENT_WIDTH), 2.0)
    teacher = random(1, (LAYERS, B, T, TEACHER_WIDTH), 2.0)
    projection = random(2, (len(HIDDEN_PAIRS), STUDENT_WIDTH, TEACHER_WIDTH), 0.5)
    terms = whitebox(kind, attention_weight=0.0)
    loss, metrics = jax.jit(terms.loss)({"projection": projection},
                                        ModelOutputs(None, None, student),
                                        ModelOutputs(None, None, teacher), loss_mask,
                                        loss_mask.sum())
    reference = np_hidden_bt(student, teacher, projection, kind)
    assert_close(metrics["hidden_sum"] / loss_mask.sum(), masked_mean(reference, loss_mask))
    assert_close(loss, 0.7 * masked_mean(reference, loss_mask))
    # Whatever the masked tokens hold, they change nothing, and the gradient stays finite.
    keep = loss_mask.astype(bool)[None, :, :, None]

    @jax.jit
    def loss_and_grads(projection, student_lbtd, teacher_lbte):
        return jax.value_and_grad(lambda projection, student_lbtd: terms.loss(
            {"projection": projection}, ModelOutputs(None, None, student_lbtd),
            ModelOutputs(None, None, teacher_lbte), loss_mask, loss_mask.sum())[0],
            argnums=(0, 1))(projection, student_lbtd)

    clean, _ = loss_and_grads(projection, student, teacher)
    value, grads = loss_and_grads(projection, np.where(keep, student, np.nan),
                                  np.where(keep, teacher, np.inf))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(clean))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[1])[~np.broadcast_to(keep, student.shape)],
                                  0.0)


@pytest.mark.parametrize("student_heads,teacher_heads", [(4, 4), (2, 4), (4, 2), (2, 3)])
def test_the_attention_term_is_the_float64_reference(student_heads, teacher_heads):
    segment_ids, loss_mask = masks()
    allowed = np_allowed(segment_ids)
    head_dim = 4

    def log_probs_and_reference(seed, heads):
        """Each pair's log-probabilities as the model computes them, and float64 probs."""
        computed, reference = [], []
        for pair in range(len(ATTENTION_PAIRS)):
            q = random(10 * seed + pair, (B, T, heads, head_dim), 1.5)
            k = random(10 * seed + pair + 5, (B, T, 1, head_dim), 1.5)
            computed.append(jax.jit(attention.log_probs)(q, k, allowed))
            reference.append(np_attention_probs(q, k, allowed))
        return jnp.stack(computed), reference

    student, student_probs = log_probs_and_reference(1, student_heads)
    teacher, teacher_probs = log_probs_and_reference(2, teacher_heads)
    assert_close(jnp.exp(student[0]), student_probs[0])
    np.testing.assert_array_equal(np.isneginf(np.asarray(student[0])),
                                  ~np.broadcast_to(allowed[:, None], student[0].shape))
    terms = whitebox(hidden_weight=0.0)

    def loss_of(student_lbnts):
        return terms.loss({}, ModelOutputs(None, None, attention_kbnts=student_lbnts),
                          ModelOutputs(None, None, attention_kbnts=teacher), loss_mask,
                          loss_mask.sum())

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(student)
    reference = np_attention_bt(student_probs, teacher_probs)
    assert_close(metrics["attention_sum"] / loss_mask.sum(), masked_mean(reference, loss_mask))
    assert_close(loss, 0.3 * masked_mean(reference, loss_mask))
    # A masked key (-inf) and a padding query contribute exactly 0, to the value and gradient.
    grads = np.asarray(grads)
    assert np.isfinite(grads).all()
    assert (grads[np.broadcast_to(~allowed[None, :, None], grads.shape)] == 0).all()


def test_equal_distributions_and_states_cost_nothing():
    segment_ids, loss_mask = masks()
    q, k = random(3, (B, T, 4, 4)), random(4, (B, T, 2, 4))
    log_probs = jax.jit(attention.log_probs)(q, k, np_allowed(segment_ids))[None]
    states = random(5, (LAYERS, B, T, STUDENT_WIDTH))
    terms = dataclasses.replace(whitebox("cosine"), teacher_width=STUDENT_WIDTH,
                                hidden_pairs=((1, 1), (2, 2)), attention_pairs=((0, 0),))
    outputs = ModelOutputs(None, None, states, log_probs)
    _, metrics = jax.jit(terms.loss)(terms.init_aux(), outputs, outputs, loss_mask,
                                     loss_mask.sum())
    np.testing.assert_allclose([metrics["hidden_sum"], metrics["attention_sum"]], 0.0, atol=1e-5)


def test_gradients_reach_the_projection_and_the_student_never_the_teacher(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    # The white-box terms alone (the logits' terms off): what moves the student is theirs.
    loss_cfg = dataclasses.replace(LOSS, kd_weight=0.0, ce_weight=0.0, hidden_weight=1.0,
                                   attention_weight=1.0)
    terms = WhiteBox.of(loss_cfg, STUDENT, TEACHER, seed=0)
    loss_fn = make_loss_fn(student, OnlineTeacher(teacher), loss_cfg, VALID_VOCAB,
                           whitebox=terms)
    batch = make_batch(0)
    num_valid = np.float32(batch["loss_mask"].sum())
    ((student_grads, aux_grads), teacher_grads), metrics = jax.jit(
        jax.grad(loss_fn, argnums=(0, 1), has_aux=True))(
        trainable(student_params, terms.init_aux()), teacher_params, batch, num_valid)
    assert metrics["hidden_sum"] > 0 and metrics["attention_sum"] > 0
    assert np.abs(np.asarray(aux_grads["projection"])).max() > 0
    # Queries and keys through the attention KL; the last layer's MLP through the hidden term.
    for name in ("wq", "wk", "w_down"):
        assert np.abs(np.asarray(student_grads["layers"][name])).max() > 0, name
    assert jax.tree.structure(student_grads) == jax.tree.structure(student_params)
    assert all(np.isfinite(np.asarray(leaf)).all()
               for leaf in jax.tree.leaves((student_grads, aux_grads)))
    assert all((np.asarray(leaf) == 0).all() for leaf in jax.tree.leaves(teacher_grads))


def test_layer_pairs_default_and_refusals():
    assert uniform_pairs(2, 4) == [[0, 1], [1, 3]]
    assert uniform_pairs(3, 4) == [[0, 1], [1, 2], [2, 3]]
    assert uniform_pairs(4, 2) == [[0, 0], [1, 0], [2, 1], [3, 1]]
    on = dataclasses.replace(LOSS, hidden_weight=1.0, attention_weight=0.5)
    terms = WhiteBox.of(on, STUDENT, dataclasses.replace(TEACHER, n_layers=4))
    assert terms.hidden_pairs == ((0, 1), (1, 3)) and terms.attention_pairs == ((1, 3),)
    assert terms.request(0) == {"with_layers": True, "attention_layers": (1,)}
    assert terms.request(1) == {"with_layers": True, "attention_layers": (3,)}
    assert WhiteBox.of(LOSS, STUDENT, TEACHER) is None
    with pytest.raises(ConfigError, match=r"^loss.hidden_layers: teacher layer 2 does not exist "
                                          r"\(the teacher has 2 layers, 0 to 1\)$"):
        WhiteBox.of(dataclasses.replace(on, hidden_layers=[[0, 2]]), STUDENT, TEACHER)
    with pytest.raises(ConfigError, match="sliding window"):
        WhiteBox.of(on, STUDENT, dataclasses.replace(TEACHER, sliding_window=4))
    # Equal widths start from the identity; others from a random map of std 1 / sqrt(d).
    same = WhiteBox.of(on, STUDENT, dataclasses.replace(TEACHER, d_model=STUDENT.d_model))
    np.testing.assert_array_equal(same.init_aux()["projection"][1], np.eye(STUDENT.d_model))
    assert WhiteBox.of(on, STUDENT, TEACHER).init_aux()["projection"].shape == (2, 32, 48)


def test_the_attention_log_probabilities_are_what_dense_attention_applies():
    segment_ids, _ = masks()
    q, k, v = random(6, (B, T, 4, 4)), random(7, (B, T, 2, 4)), random(8, (B, T, 2, 4))

    @jax.jit
    def both(q, k, v, mask):
        probs_bnts = jnp.exp(attention.log_probs(q, k, mask))
        attended = jnp.einsum("bnts,bsnh->btnh", probs_bnts, jnp.repeat(v, 2, axis=2))
        return attended, attention.dense(q, k, v, mask)

    attended, dense = both(q, k, v, np_allowed(segment_ids))
    valid = segment_ids > 0  # a padding query sees nothing: dense spreads it evenly
    assert_close(np.asarray(attended)[valid], np.asarray(dense)[valid])
