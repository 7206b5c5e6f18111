"""Independent float64 references and random inputs shared by the loss and target tests.

The losses and targets compute in float32; the tolerances follow from that dtype, are set once
here, and are never loosened.
"""

from __future__ import annotations

import numpy as np

COMPUTE_DTYPE = np.dtype(np.float32)
RTOL, ATOL = {np.dtype(np.float32): (1e-5, 1e-6)}[COMPUTE_DTYPE]

B, T, V = 2, 5, 33  # V is the valid vocabulary; WIDTH the padded embedding width
WIDTH = 40


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def random_logits(seed, shape=(B, T, V), scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(COMPUTE_DTYPE)


def pad_columns(logits, width, fill):
    padding = np.full(logits.shape[:-1] + (width - logits.shape[-1],), fill, COMPUTE_DTYPE)
    return np.concatenate([logits, padding], axis=-1)


def np_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def np_log_softmax(logits, temperature=1.0):
    scaled = logits.astype(np.float64) / temperature
    shifted = scaled - scaled.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_kl(p, r):
    """KL(p || r) over the last axis; entries with p == 0 contribute 0."""
    terms = np.zeros_like(p)
    support = p > 0
    terms[support] = p[support] * (np.log(p[support]) - np.log(r[support]))
    return terms.sum(-1)
