"""The sampler with a key/value cache (`kd_jax.models.generate`) against the model's own forward
pass: greedy tokens equal to the argmax of a full forward pass at every step, drawn tokens with
the frequencies of the softmax (and top-k and top-p supports exact), stop tokens, and one
compilation for every step and every call of the same shapes.

The models are tiny and random, with weights far from their initialization scale (std 0.3, norm
scales around 1), so their distributions are neither flat nor one-hot and every family flag's
weights (biases, query and key norms) take part.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats

from kd_jax.models.generate import Sampling, left_pad, make_sampler, row_keys
from tests.helpers import STUDENT, VALID_VOCAB, cli_env
from tests.models import generate_sharded_worker as worker
from tests.models.generate_sharded_worker import (
    MAX_NEW,
    NO_STOP,
    PROMPT_LENGTHS,
    make_prompts,
    random_params,
)

# Plain Llama-like with grouped-query attention; and Qwen-like flags with a tied head, a window
# shorter than the generated length and Llama 3 rotary scaling.
FAMILIES = {
    "llama_gqa": STUDENT,
    "qwen_window": dataclasses.replace(
        STUDENT, qkv_bias=True, o_bias=True, qk_norm=True, tie_embeddings=True,
        sliding_window=4, rope_scaling="llama3", rope_factor=4.0, rope_original_max=16),
}
# p-values below this fail a frequency test; the draws are seeded, so the outcome is fixed.
P_VALUE = 1e-3


def full_forward_logits(model, params, sequences):
    """float32 [rows, longest, VALID_VOCAB]: the model's forward pass over each sequence
    (right-padded with segment 0, which no real token attends to)."""
    width = max(len(seq) for seq in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    segments = np.zeros_like(tokens)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)], segments[row, :len(seq)] = seq, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segments}
    return np.asarray(jax.jit(model.logits)(params, batch))[..., :VALID_VOCAB]


@functools.cache
def _family(name: str):
    """(config, model, params, prompts, sampler) of a family: built once, compiled once."""
    cfg = FAMILIES[name]
    model, params = random_params(cfg, seed=7)
    return cfg, model, params, make_prompts(), make_sampler(cfg, MAX_NEW, VALID_VOCAB)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return _family(request.param)


def generate(sampler, params, prompts, sampling=Sampling(), stop_ids=NO_STOP, seed=0):
    tokens, lengths = left_pad(prompts)
    out = sampler(params, tokens, lengths, row_keys(seed, np.arange(len(prompts))), sampling,
                  stop_ids)
    return jax.tree.map(np.asarray, out)


def test_greedy_is_the_argmax_of_a_full_forward_pass_at_every_step(family):
    cfg, model, params, prompts, sampler = family
    out = generate(sampler, params, prompts)
    assert out.tokens_bn.shape == (len(prompts), MAX_NEW)
    np.testing.assert_array_equal(out.lengths_b, MAX_NEW)
    assert not out.stopped_b.any()
    sequences = [prompt + list(new) for prompt, new in zip(prompts, out.tokens_bn)]
    logits = full_forward_logits(model, params, sequences)
    for row, prompt in enumerate(prompts):
        # The token after position i is the argmax of the logits at i.
        argmax = logits[row, len(prompt) - 1: len(prompt) - 1 + MAX_NEW].argmax(-1)
        np.testing.assert_array_equal(out.tokens_bn[row], argmax, err_msg=f"row {row}")
    if cfg.sliding_window:
        assert max(PROMPT_LENGTHS) + MAX_NEW > 2 * cfg.sliding_window


@pytest.fixture(scope="module")
def first_token():
    """(sampler of one new token, params, prompt, the full forward's logits of its next token)."""
    cfg = FAMILIES["qwen_window"]
    model, params = random_params(cfg, seed=3)
    prompt = [3, 14, 15, 9, 26]
    logits = full_forward_logits(model, params, [prompt])[0, -1].astype(np.float64)
    return make_sampler(cfg, 1, VALID_VOCAB), params, prompt, logits


def _kept_probabilities(logits, temperature, top_k, top_p):
    """The distribution a draw must follow, from its definition: softmax(logits / T) over the
    top k, renormalized, then over the smallest most-likely set reaching top_p, renormalized."""
    probs = np.exp((logits - logits.max()) / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), bool)
    keep[order[:top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0) / probs[keep].sum()
    before = np.cumsum(probs[order]) - probs[order]
    assert top_p == 1 or np.abs(before - top_p).min() > 1e-4  # no boundary within rounding
    nucleus = np.zeros(len(probs), bool)
    nucleus[order[before < top_p]] = True
    return np.where(nucleus, probs, 0) / probs[nucleus].sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (1.5, 8, 0.5)])
def test_drawn_tokens_follow_the_kept_softmax(first_token, temperature, top_k, top_p):
    sampler, params, prompt, logits = first_token
    draws = 4096
    out = generate(sampler, params, [prompt] * draws, Sampling(temperature, top_k, top_p),
                   seed=11)
    counts = np.bincount(out.tokens_bn[:, 0], minlength=VALID_VOCAB)
    expected = _kept_probabilities(logits, temperature, top_k, top_p)
    support = expected > 0
    assert support.sum() >= 3  # a distribution worth testing, not a near-certain token
    if top_k or top_p < 1:
        assert support.sum() < VALID_VOCAB / 2
    assert counts[~support].sum() == 0, "a token outside the kept set was drawn"
    assert counts.sum() == draws
    # Chi-square over the kept tokens, the rarest merged until each bucket expects >= 5 draws.
    order = np.argsort(expected[support])
    observed, predicted = counts[support][order], draws * expected[support][order]
    rare = np.cumsum(predicted) < 5
    observed = np.append(observed[~rare], observed[rare].sum())
    predicted = np.append(predicted[~rare], predicted[rare].sum())
    keep = predicted > 0
    p_value = stats.chisquare(observed[keep], predicted[keep]).pvalue
    assert p_value > P_VALUE, (p_value, observed, predicted.round(1))


def test_a_stop_token_ends_its_row(family):
    _, _, params, prompts, sampler = family
    free = generate(sampler, params, prompts)
    # Row 0's third new token, if it is new in that row, else its first token not seen before.
    row0 = list(free.tokens_bn[0])
    at = next(i for i in range(2, MAX_NEW) if row0[i] not in row0[:i])
    stop = row0[at]
    out = generate(sampler, params, prompts, stop_ids=np.array([stop, -1], np.int32))
    for row in range(len(prompts)):
        hits = np.flatnonzero(free.tokens_bn[row] == stop)
        end = hits[0] if len(hits) else MAX_NEW
        assert out.lengths_b[row] == end and out.stopped_b[row] == bool(len(hits))
        np.testing.assert_array_equal(out.tokens_bn[row, :end + 1],
                                      free.tokens_bn[row, :end + 1])
        np.testing.assert_array_equal(out.tokens_bn[row, end + 1:], 0)  # padding after it
    assert out.lengths_b[0] == at


class _Compilations(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


def test_one_compilation_for_every_step_and_every_call_of_the_same_shapes(family):
    cfg, _, params, prompts, _ = family
    sampler = make_sampler(cfg, MAX_NEW, VALID_VOCAB)  # a fresh jit: nothing compiled yet
    compilations = _Compilations()
    logger = logging.getLogger("jax")
    logger.addHandler(compilations)
    try:
        with jax.log_compiles():
            first = generate(sampler, params, prompts)
            assert compilations.names.count("jit(sample)") == 1  # MAX_NEW steps, one program
            compilations.names.clear()
            rng = np.random.default_rng(1)
            others = [list(rng.integers(0, VALID_VOCAB, n)) for n in (4, 7, 3, 6)]
            generate(sampler, params, others, Sampling(0.8, 5, 0.9), np.array([7, 9], np.int32),
                     seed=5)
            generate(sampler, params, prompts, Sampling(1.2, 0, 1.0), np.array([3, -1], np.int32))
            again = generate(sampler, params, prompts)
    finally:
        logger.removeHandler(compilations)
    assert "jit(sample)" not in compilations.names
    assert sampler.compiled._cache_size() == 1
    np.testing.assert_array_equal(again.tokens_bn, first.tokens_bn)


def test_sharded_over_eight_devices_it_decodes_as_one_device_does(tmp_path):
    """Parameters in the fsdp_tensor layout, prompts over data x fsdp, the cache's kv heads over
    tensor (tests/models/generate_sharded_worker.py): the same tokens as one device's, and an
    on-policy step there takes the step one device takes."""
    # The worker compares the mesh with one device, both compiled in it.
    result = subprocess.run([sys.executable, worker.__file__, str(tmp_path)],
                            env=cli_env(8, fast_compile=True),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"] == 8 and report["compilations"] == 1
    assert report["cache_spec"] == "P(None, ('data', 'fsdp'), None, 'tensor')"
    assert report["cache_per_device"] is not None  # one row and one kv head a device
    _, _, params, prompts, sampler = _family("llama_gqa")
    for name, sampling in worker.SAMPLINGS.items():
        one_device = generate(sampler, params, prompts, sampling)
        np.testing.assert_array_equal(report[name], one_device.tokens_bn, err_msg=name)
    # An on-policy step on the mesh: the same answers (their lengths) and loss as one device's.
    mesh, one = report["onpolicy_mesh"], report["onpolicy_one"]
    assert mesh["answers"] == one["answers"] == 4 and mesh["answer_tokens"] == one["answer_tokens"]
    for key in ("loss_sum", "kd_sum", "tokens", "grad_norm"):
        np.testing.assert_allclose(mesh[key], one[key], rtol=1e-5, err_msg=key)
