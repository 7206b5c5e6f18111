"""White-box distillation: the student learns from the teacher's layers, not only its outputs.

Two terms, each added to the objective with its weight (`loss.hidden_weight`,
`loss.attention_weight`; 0: off), over the objective's tokens (the loss mask), summed and divided
once by the valid tokens of the whole global batch, as the objective's terms are:

* hidden states (TinyBERT, Jiao et al. 2020): for each [student layer, teacher layer] pair, the
  student's layer output times a learned projection W [d_student, d_teacher] against the
  teacher's layer output; per token the mean over the teacher's width of the squared error
  (`loss.hidden_kind: mse`) or 1 - their cosine similarity (`cosine`), averaged over the pairs.
* attention distributions (MiniLM, Wang et al. 2020): for each pair, KL(teacher || student)
  between the rows of softmax(q k^T / sqrt(head_dim)) (each model's own queries and keys, one
  mask: causal, within the segment, no padding), per query token, averaged over heads and pairs.
  Head counts that differ are matched by groups: with g = gcd(student heads, teacher heads),
  each model's heads are cut into g groups of consecutive heads (consecutive query heads share
  a key/value head) and a group's distribution is the mean of its heads'. Equal counts compare
  head by head; when one count divides the other, each head of the smaller model is compared
  with the mean of its heads in the larger; coprime counts compare the means over all heads.

Layer i is the output of layer i, 0-based (the residual stream after it, as
`Transformer.__call__(..., with_layers=True)` returns it), and for attention layer i's
attention. With no pairs configured, hidden states pair every student layer i with teacher
layer ceil((i + 1) * L_teacher / L_student) - 1 (uniform; the last with the last: TinyBERT's
mapping) and attention pairs the last layers (MiniLM). The teacher's layers come from the same
forward pass as its logits (`OnlineTeacher.soft_targets_and_outputs`).

The projections are the only parameters of these terms: `WhiteBox.init_aux` makes them (the
identity when the widths are equal, else normal with std 1 / sqrt(d_student)); the train state
keeps them beside the student's parameters (`kd_jax.train.step`), so they are trained and
checkpointed with it, and never exported. Attention probabilities are [batch, heads, tokens,
tokens] per chosen layer, quadratic in the sequence (`config.validation` caps the length).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kd_jax.config import ConfigError, HiddenKind, LossConfig, ModelConfig, choices

HIDDEN_KINDS = choices(HiddenKind)

# Squared norms below this count as this in the cosine: a zero vector has no direction, and
# sqrt's gradient at 0 is infinite.
_COSINE_EPS = 1e-12


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[list[int]]:
    """Every student layer i with teacher layer ceil((i + 1) * L_t / L_s) - 1."""
    return [[i, -(-(i + 1) * teacher_layers // student_layers) - 1]
            for i in range(student_layers)]


def hidden_distance_bt(student_pbtd, teacher_pbte, projection_pde, kind: str) -> jax.Array:
    """Per token [b, t], float32: the distance between each pair's projected student states
    [pairs, b, t, d] @ [pairs, d, e] and the teacher's [pairs, b, t, e], averaged over pairs.
    `mse`: the mean over e of the squared error; `cosine`: 1 - the cosine similarity."""
    projected_pbte = jnp.einsum("pbtd,pde->pbte", student_pbtd.astype(jnp.float32),
                                projection_pde.astype(jnp.float32))
    teacher_pbte = teacher_pbte.astype(jnp.float32)
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden kind must be one of {', '.join(HIDDEN_KINDS)}, got {kind!r}")
    if kind == "mse":
        distance_pbt = jnp.mean(jnp.square(projected_pbte - teacher_pbte), axis=-1)
    else:  # cosine
        dot_pbt = jnp.sum(projected_pbte * teacher_pbte, axis=-1)
        norms_pbt = (jnp.maximum(jnp.sum(jnp.square(projected_pbte), axis=-1), _COSINE_EPS)
                     * jnp.maximum(jnp.sum(jnp.square(teacher_pbte), axis=-1), _COSINE_EPS))
        distance_pbt = 1.0 - dot_pbt * jax.lax.rsqrt(norms_pbt)
    return jnp.mean(distance_pbt, axis=0)


def attention_kl_bt(student_pbnts, teacher_pbmts) -> jax.Array:
    """Per query token [b, t], float32: KL(teacher || student) between attention distributions
    given as log-probabilities [pairs, b, heads, t, s] (-inf where a key is masked), heads
    matched by groups (module docstring), averaged over groups and pairs.

    A key counts where both models may attend to it; a query that may attend to nothing
    (padding) gives 0."""
    groups = math.gcd(student_pbnts.shape[2], teacher_pbmts.shape[2])
    # The mask is the same for every head: -inf marks the keys a query may not see.
    allowed_pbts = (jnp.isfinite(student_pbnts[:, :, 0]) & jnp.isfinite(teacher_pbmts[:, :, 0]))
    log_q_pbgts = _grouped(student_pbnts, allowed_pbts, groups)
    log_p_pbgts = _grouped(teacher_pbmts, allowed_pbts, groups)
    allowed_pb1ts = allowed_pbts[:, :, None]
    # where, not multiply, on both sides of the arithmetic: a masked key's log-probability is
    # -inf, and p * (log p - log q) there would be NaN, in the value and in the gradient.
    terms_pbgts = jnp.where(allowed_pb1ts, jnp.exp(log_p_pbgts) * (log_p_pbgts - log_q_pbgts),
                            0.0)
    return jnp.mean(jnp.sum(terms_pbgts, axis=-1), axis=(0, 2))


def _grouped(log_probs_pbnts, allowed_pbts, groups: int) -> jax.Array:
    """The mean distribution of each group of consecutive heads, as log-probabilities
    [p, b, groups, t, s]; masked keys hold 0 (finite), never -inf."""
    p, b, n, t, s = log_probs_pbnts.shape
    finite_pbnts = jnp.where(allowed_pbts[:, :, None], log_probs_pbnts.astype(jnp.float32), 0.0)
    per_group = finite_pbnts.reshape(p, b, groups, n // groups, t, s)
    return jax.nn.logsumexp(per_group, axis=3) - math.log(n // groups)


@dataclasses.dataclass(frozen=True)
class WhiteBox:
    """The white-box terms of a run: which layers, what distance, what weights."""

    hidden_weight: float
    hidden_kind: str
    hidden_pairs: tuple[tuple[int, int], ...]
    attention_weight: float
    attention_pairs: tuple[tuple[int, int], ...]
    student_width: int
    teacher_width: int
    seed: int = 0  # the projections' random initialization

    @classmethod
    def of(cls, loss: LossConfig, student: ModelConfig, teacher: ModelConfig,
           seed: int = 0) -> WhiteBox | None:
        """The terms `loss` configures between these models (None: none); ConfigError for a
        layer a model does not have, or attention under two different masks."""
        if loss.hidden_weight == 0 and loss.attention_weight == 0:
            return None
        hidden = loss.hidden_layers or uniform_pairs(student.n_layers, teacher.n_layers)
        attention = loss.attention_layers or [[student.n_layers - 1, teacher.n_layers - 1]]
        for term, pairs in (("hidden", hidden), ("attention", attention)):
            for pair in pairs:
                for model, index, layers in zip(("student", "teacher"), pair,
                                                (student.n_layers, teacher.n_layers)):
                    if not 0 <= index < layers:
                        raise ConfigError(
                            f"loss.{term}_layers: {model} layer {index} does not exist (the "
                            f"{model} has {layers} layers, 0 to {layers - 1})")
        if loss.attention_weight > 0 and student.sliding_window != teacher.sliding_window:
            raise ConfigError(
                f"loss.attention_weight compares attention under one mask, but the student's "
                f"sliding window ({student.sliding_window}) and the teacher's "
                f"({teacher.sliding_window}) differ")
        return cls(loss.hidden_weight, loss.hidden_kind,
                   tuple(map(tuple, hidden)) if loss.hidden_weight > 0 else (),
                   loss.attention_weight,
                   tuple(map(tuple, attention)) if loss.attention_weight > 0 else (),
                   student.d_model, teacher.d_model, seed)

    def request(self, model: int) -> dict:
        """What model 0 (the student) or 1 (the teacher) must return: `PureModel.apply`'s
        `with_layers` and `attention_layers`."""
        return {"with_layers": bool(self.hidden_pairs),
                "attention_layers": tuple(pair[model] for pair in self.attention_pairs)}

    def init_aux(self) -> dict:
        """The projections, {"projection": [pairs, d_student, d_teacher]} float32, or {}."""
        if not self.hidden_pairs:
            return {}
        shape = (len(self.hidden_pairs), self.student_width, self.teacher_width)
        if self.student_width == self.teacher_width:
            return {"projection": jnp.broadcast_to(jnp.eye(self.student_width), shape)}
        draw = jax.random.normal(jax.random.key(self.seed), shape, jnp.float32)
        return {"projection": draw / math.sqrt(self.student_width)}

    def loss(self, aux: dict, student, teacher, loss_mask_bt, num_valid_tokens
             ) -> tuple[jax.Array, dict]:
        """(weighted sum / num_valid_tokens, {"loss_sum", "hidden_sum", "attention_sum"}) from
        the models' outputs (`ModelOutputs` with the layers `request` asked for); the sums are
        unweighted, over the tokens of `loss_mask_bt`."""
        teacher = jax.lax.stop_gradient(teacher)  # the teacher is frozen
        mask_bt = loss_mask_bt.astype(bool)
        metrics = {}
        loss_sum = jnp.zeros((), jnp.float32)
        if self.hidden_pairs:
            student_idx, teacher_idx = (jnp.asarray(index) for index in zip(*self.hidden_pairs))
            # Masked tokens' states are replaced before any arithmetic, as in the objective.
            keep_1bt1 = mask_bt[None, :, :, None]
            per_token_bt = hidden_distance_bt(
                jnp.where(keep_1bt1, student.layers_lbtd[student_idx], 0),
                jnp.where(keep_1bt1, teacher.layers_lbtd[teacher_idx], 0),
                aux["projection"], self.hidden_kind)
            metrics["hidden_sum"] = _masked_sum(per_token_bt, mask_bt)
            loss_sum = loss_sum + jnp.float32(self.hidden_weight) * metrics["hidden_sum"]
        if self.attention_pairs:
            per_token_bt = attention_kl_bt(student.attention_kbnts, teacher.attention_kbnts)
            metrics["attention_sum"] = _masked_sum(per_token_bt, mask_bt)
            loss_sum = loss_sum + jnp.float32(self.attention_weight) * metrics["attention_sum"]
        metrics["loss_sum"] = loss_sum
        return loss_sum / jnp.maximum(jnp.asarray(num_valid_tokens, jnp.float32), 1.0), metrics


def _masked_sum(values_bt, mask_bt) -> jax.Array:
    # where, not multiply: a padded position's value never reaches the sum (nor its gradient).
    return jnp.sum(jnp.where(mask_bt, values_bt, 0.0), dtype=jnp.float32)
