"""kd_jax.losses.cross_bytes: the teacher's next-byte distribution backed off to where its token
started, against a float64 reference written from the definition (value and gradient, inside a
token and at its end, with tokens longer than the student's partial text, special tokens and
bytes the student cannot start a token with); with byte-level tokenizers on both sides it is
the divergence between the two distributions exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.align.vocabulary import SortedSpellings
from kd_jax.losses.cross_bytes import ByteTables, bytes_divergence_bt
from kd_jax.losses.divergences import divergence_bt

# A teacher vocabulary with shared prefixes: runs of digits, a word and its extensions, a
# multi-byte character, a special token (spells nothing), and padded logits past it.
TEACHER = [b"", b"1", b"2", b"20", b"202", b"2024", b"21", b"t", b"th", b"the", b"them",
           b" ", b" t", b" the", "é".encode(), b"\xc3", b"x", b"0", b"4", b"e", b"m"]
TEACHER_WIDTH = len(TEACHER) + 3
# The student: single bytes, but no token starts with b"x" (its teacher mass is left out), a
# special token, and a two-byte token (its first byte is what it is compared by).
STUDENT = [b"", *(bytes([b]) for b in b"0124them \xc3\xa9"), b"th"]
STUDENT_WIDTH = len(STUDENT) + 2


def reference(student_logits, back_logits, here_logits, token, inside, temperature):
    """float64 KL(p || q) * T^2 from the definition, and its gradient in the student's logits."""
    def softmax(x, valid):
        x = np.asarray(x, np.float64)[:valid] / temperature
        e = np.exp(x - x.max())
        return np.concatenate([e / e.sum(), np.zeros(len(np.asarray(x)) - valid)])

    student_has = {spelled[0] for spelled in STUDENT if spelled}
    p_back = softmax(back_logits, len(TEACHER))
    p_here = softmax(here_logits, len(TEACHER))
    read = TEACHER[token][:inside]
    target = np.zeros(256)
    if inside == 0:  # no position before the token: the next token's first byte alone
        for w, spelled in enumerate(TEACHER):
            if spelled:
                target[spelled[0]] += p_here[w]
    for w, spelled in enumerate(TEACHER):
        if inside and spelled.startswith(read) and len(spelled) > inside:
            target[spelled[inside]] += p_back[w]
    if 0 < inside == len(TEACHER[token]):
        for w, spelled in enumerate(TEACHER):
            if spelled:
                target[spelled[0]] += p_back[token] * p_here[w]
    for b in range(256):
        if b not in student_has:
            target[b] = 0.0
    target /= target.sum()

    def loss(logits):
        q = softmax(logits, len(STUDENT))
        first = np.zeros(256)
        for u, spelled in enumerate(STUDENT):
            if spelled:
                first[spelled[0]] += q[u]
        first /= first.sum()
        held = target > 0
        return temperature**2 * np.sum(target[held] * (np.log(target[held])
                                                        - np.log(first[held])))

    logits = np.asarray(student_logits, np.float64)
    grad = np.zeros_like(logits)
    for u in range(len(logits)):
        step = np.zeros_like(logits)
        step[u] = 1e-6
        grad[u] = (loss(logits + step) - loss(logits - step)) / 2e-6
    return loss(logits), grad


CASES = [  # (covering token, bytes of it read): inside a token, at its end, no extension
    (5, 1), (5, 2), (5, 3), (5, 4), (9, 2), (9, 3), (13, 2), (14, 1), (14, 2), (1, 1),
    (10, 4), (3, 0)]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_backed_off_divergence_is_the_float64_reference(temperature):
    rng = np.random.default_rng(0)
    n = len(CASES)
    student = rng.normal(size=(1, n, STUDENT_WIDTH)).astype(np.float32) * 2
    back = rng.normal(size=(1, n, TEACHER_WIDTH)).astype(np.float32) * 2
    here = rng.normal(size=(1, n, TEACHER_WIDTH)).astype(np.float32) * 2
    token = np.array([[t for t, _ in CASES]], np.int32)
    inside = np.array([[m for _, m in CASES]], np.int32)
    spellings = SortedSpellings(TEACHER)
    runs = np.array([[spellings.run(TEACHER[t][:m]) if m else (0, 0) for t, m in CASES]],
                    np.int32)
    tables = ByteTables.of(TEACHER, STUDENT, TEACHER_WIDTH, STUDENT_WIDTH)
    aligned = np.ones((1, n), bool)

    def total(student_logits):
        values = bytes_divergence_bt(
            "forward_kl", student_logits, back, here, token, inside, runs[..., 0],
            runs[..., 1], aligned, tables, temperature=temperature,
            student_valid=len(STUDENT), teacher_valid=len(TEACHER))
        return jnp.sum(values), values

    (_, values), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(student))
    for i, (t, m) in enumerate(CASES):
        want, want_grad = reference(student[0, i], back[0, i], here[0, i], t, m, temperature)
        np.testing.assert_allclose(float(values[0, i]), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grad[0, i]), want_grad, rtol=1e-4, atol=1e-5)


def test_unaligned_positions_are_zero_with_finite_gradients():
    tables = ByteTables.of(TEACHER, STUDENT, TEACHER_WIDTH, STUDENT_WIDTH)
    zeros = np.zeros((1, 2), np.int32)

    def total(student_logits):
        return jnp.sum(bytes_divergence_bt(
            "forward_kl", student_logits, jnp.zeros((1, 2, TEACHER_WIDTH)),
            jnp.zeros((1, 2, TEACHER_WIDTH)), zeros, zeros, zeros, zeros,
            np.zeros((1, 2), bool), tables, temperature=1.0))

    value, grad = jax.value_and_grad(total)(jnp.ones((1, 2, STUDENT_WIDTH)))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_byte_level_tokenizers_on_both_sides_give_the_plain_divergence(kind):
    """A byte-level teacher's tokens are bytes: read whole, none extends, and the target is its
    next byte; a byte-level student's first bytes are its tokens."""
    vocabulary = [bytes([b]) for b in range(256)]
    rng = np.random.default_rng(1)
    student = rng.normal(size=(2, 5, 256)).astype(np.float32)
    back = rng.normal(size=(2, 5, 256)).astype(np.float32)
    here = rng.normal(size=(2, 5, 256)).astype(np.float32)
    token = rng.integers(0, 256, size=(2, 5)).astype(np.int32)
    spellings = SortedSpellings(vocabulary)
    runs = np.array([[spellings.run(vocabulary[t]) for t in row] for row in token], np.int32)
    tables = ByteTables.of(vocabulary, vocabulary, 256, 256)
    got = bytes_divergence_bt(kind, student, back, here, token, np.ones_like(token),
                              runs[..., 0], runs[..., 1], np.ones((2, 5), bool), tables,
                              temperature=2.0)
    want = divergence_bt(kind, student, here, temperature=2.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_run_is_every_spelling_that_starts_with_the_prefix():
    words = [b"a", b"ab", b"abc", b"ab\xff", b"ab\xff\xff", b"ac", b"b", b"\xff", b"\xff\x01", b""]
    spellings = SortedSpellings(words)
    for prefix in {w[:n] for w in words for n in range(1, len(w) + 1)}:
        lo, hi = spellings.run(prefix)
        assert spellings.spellings[lo:hi] == sorted(w for w in words if w.startswith(prefix))
