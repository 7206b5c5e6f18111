"""One step's loss and gradients on a fixed batch, pinned: the step computes what it computed.

The values were computed by the step before the package was reorganized into stages (same tiny
models and batch as tests/helpers.py) and must survive any refactoring. Whole training runs are
not pinned: their figures depend on the kind of CPU. One step's are stable to about 1e-6
relative across CPU kinds (vector widths change summation order); RTOL below is set from that,
a hundred times wider, and is far tighter than any change to the computation would be.
"""

import jax
import numpy as np
import pytest

from kd_jax.losses.soft_targets import TopK
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.sparse import topk_targets
from kd_jax.train.step import make_loss_fn
from tests.helpers import LOSS, VALID_VOCAB, make_batch

RTOL = 1e-4

# loss, then the Euclidean norm of each parameter's gradient.
GOLDEN = {
    "online": {"loss": 1.1863954067230225, "embedding": 0.16878866814307464,
               "final_norm": 0.0039858554164698004, "head": 0.17214780561036327,
               "layers/attn_norm": 0.0010458979113786647, "layers/mlp_norm": 0.00015461055645959516,
               "layers/w_down": 0.011402094836411447, "layers/w_gate": 0.00564590804156186,
               "layers/w_up": 0.005957417433188094, "layers/wk": 0.0003884323901503361,
               "layers/wo": 0.10034810584372379, "layers/wq": 0.00035374601348178464,
               "layers/wv": 0.04777793988104768},
    "hard_labels": {"loss": 3.9179024696350098, "embedding": 0.5593478562127029,
                    "final_norm": 0.010858856513115744, "head": 0.5691610599221355,
                    "layers/attn_norm": 0.00345639992583091,
                    "layers/mlp_norm": 0.0004943165221609741,
                    "layers/w_down": 0.03786191043351187, "layers/w_gate": 0.018737863661807186,
                    "layers/w_up": 0.019714173639965037, "layers/wk": 0.0012909900203056587,
                    "layers/wo": 0.33179883374877805, "layers/wq": 0.0011712767690725003,
                    "layers/wv": 0.15719793610691027},
    "top8": {"loss": 1.1795310974121094, "embedding": 0.16869222069171758,
             "final_norm": 0.003347634670069381, "head": 0.17111895920417206,
             "layers/attn_norm": 0.001045625987403629, "layers/mlp_norm": 0.00015070797927470758,
             "layers/w_down": 0.011413527944002683, "layers/w_gate": 0.005656509830255516,
             "layers/w_up": 0.0059456591800035, "layers/wk": 0.00038788239146532726,
             "layers/wo": 0.10008745339904736, "layers/wq": 0.0003519004214328942,
             "layers/wv": 0.04767514506131976},
}


class _TopKFromBatch:
    """A cached teacher's step side, without a cache on disk: top-k targets in the batch."""

    def soft_targets(self, params, batch):
        return TopK(**batch["soft_targets"])


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_one_step_matches_the_pinned_values(case, tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = make_batch(0)
    if case == "online":
        step_teacher, params = OnlineTeacher(teacher), teacher_params
    elif case == "hard_labels":
        step_teacher, params = None, None
    else:
        top = topk_targets(teacher.logits(teacher_params, batch), 8,
                           temperature=LOSS.temperature, valid_vocab=VALID_VOCAB)
        batch = dict(batch, soft_targets=top)
        step_teacher, params = _TopKFromBatch(), None
    loss_fn = make_loss_fn(student, step_teacher, LOSS, VALID_VOCAB)
    num_valid = np.float32(batch["loss_mask"].sum())
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        student_params, params, batch, num_valid)
    got = {"loss": float(loss)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = "/".join(str(key.key) for key in path)
        got[name] = float(np.sqrt(np.sum(np.square(np.asarray(leaf, np.float64)))))
    assert sorted(got) == sorted(GOLDEN[case])
    for name, expected in GOLDEN[case].items():
        assert got[name] == pytest.approx(expected, rel=RTOL), name
