"""Task evaluation: multiple-choice task files scored by the log-likelihood of each choice.

A task file is JSON Lines, one example a line: {"context": str, "choices": [str, ...],
"answer": int}. Each choice is scored as lm-evaluation-harness scores a `multiple_choice` task
(docs/tasks.md): the request is (context, " " + choice); trailing whitespace of the context moves
to the front of the continuation; the continuation's tokens are those of context + continuation
past the context's own; the score is the sum of their log-probabilities under the model, the
log-softmax taken over every row of the output head (as transformers computes it). Per example,
acc is 1 when the most likely choice is the answer, acc_norm when the most likely choice per
character of the choice is; both are reported as a mean and its standard error.

Requests are sorted by length and batched into rows padded to a few lengths (powers of two), so
a model compiles at most one program per length; the scores stay on device until the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.config import ConfigError
from kd_jax.data.tokenizers import HFTokenizer, Tokenizer, configured_token, end_of_sequence
from kd_jax.models.pure import PureModel

DELIMITER = " "  # between the context and a choice: lm-evaluation-harness's target_delimiter
KEYS = ("context", "choices", "answer")
SHORTEST_ROW = 16  # the shortest padded length; then powers of two up to the model's context


@dataclasses.dataclass(frozen=True)
class Example:
    line: int  # in its file, from 1
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # the file's name without .jsonl
    path: Path
    examples: tuple[Example, ...]


@dataclasses.dataclass(frozen=True)
class Request:
    """One choice of one example, tokenized: `tokens` is context + continuation (cut from the
    left to the model's context + 1), of which the last `continuation` tokens are scored."""

    tokens: np.ndarray
    continuation: int


def read_task_file(path: str | Path) -> Task:
    """The examples of a task file, every line checked; a bad line is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--tasks: no task file at '{path}'")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    examples = [_example(path, number, line) for number, line in enumerate(lines, 1)
                if line.strip()]
    if not examples:
        raise ConfigError(f"{path}: no examples (one JSON object a line: context, choices, "
                          "answer)")
    return Task(path.name.removesuffix(".jsonl"), path, tuple(examples))


def _example(path: Path, number: int, line: str) -> Example:
    where = f"{path}:{number}"
    try:
        raw = json.loads(line)
    except ValueError as err:
        raise ConfigError(f"{where}: not JSON ({str(err).split(':')[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object with {', '.join(KEYS)}")
    for key in raw:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (the keys are {', '.join(KEYS)})")
    for key in KEYS:
        if key not in raw:
            raise ConfigError(f"{where}: missing {key!r}")
    context, choices, answer = (raw[key] for key in KEYS)
    if not isinstance(context, str):
        raise ConfigError(f"{where}: 'context' must be a string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(choice, str) and choice for choice in choices)):
        raise ConfigError(f"{where}: 'choices' must be a list of at least two non-empty "
                          "strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not (
            0 <= answer < len(choices)):
        raise ConfigError(f"{where}: 'answer' must be the index of a choice (0 to "
                          f"{len(choices) - 1}), got {answer!r}")
    return Example(number, context, tuple(choices), answer)


def empty_context_token(tokenizer: Tokenizer) -> int | None:
    """What an empty context is: the beginning-of-sequence token (tokenizer_config.json's
    bos_token, else what the tokenizer puts before a text), else the end-of-sequence token, as
    lm-evaluation-harness conditions on; None for a tokenizer with neither (bytes)."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    bos = configured_token(tokenizer, "bos_token")
    if bos is not None:
        return tokenizer.token_id(bos)
    if tokenizer.document_prefix:
        return tokenizer.document_prefix[-1]
    eos = end_of_sequence(tokenizer)
    return tokenizer.token_id(eos) if eos is not None else None


def encode_requests(task: Task, tokenizer: Tokenizer, max_seq_len: int) -> list[Request]:
    """Every choice of every example as a request, in order; a choice the model cannot score
    (no token of its own, longer than the model's context, after an empty context the tokenizer
    has no token for) is a ConfigError naming its line."""
    prefix = list(tokenizer.document_prefix)  # as the tokenizer's post-processor adds it
    pairs = []  # (example, choice index, context text, continuation text)
    for example in task.examples:
        context = example.context.rstrip()
        moved = example.context[len(context):]  # trailing whitespace joins the continuation
        pairs += [(example, index, context, moved + DELIMITER + choice)
                  for index, choice in enumerate(example.choices)]
    contexts = sorted({context for _, _, context, _ in pairs if context})
    encoded = dict(zip(contexts, tokenizer.encode_batch(contexts)))
    wholes = tokenizer.encode_batch([context + continuation
                                     for _, _, context, continuation in pairs])
    requests = []
    for (example, index, context, continuation), whole in zip(pairs, wholes):
        where = f"{task.path}:{example.line}: choice {index}"
        if context:
            context_ids = prefix + encoded[context].tolist()
            continuation_ids = (prefix + whole.tolist())[len(context_ids):]
        else:
            start = empty_context_token(tokenizer)
            if start is None:
                raise ConfigError(f"{task.path}:{example.line}: the context is empty and "
                                  f"{tokenizer.description} has no beginning- or "
                                  "end-of-sequence token to stand for it")
            continuation_ids = whole.tolist()
            # A continuation that starts with that token is conditioned on it (as lm-eval does).
            if continuation_ids and continuation_ids[0] == start:
                context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
            else:
                context_ids = [start]
        if not continuation_ids:
            raise ConfigError(f"{where} adds no token to the context")
        if len(continuation_ids) > max_seq_len:
            raise ConfigError(f"{where} is {len(continuation_ids)} tokens, more than the "
                              f"model's context ({max_seq_len})")
        # Too long for the model: the context is cut from the left.
        tokens = np.asarray((context_ids + continuation_ids)[-(max_seq_len + 1):], np.int32)
        requests.append(Request(tokens, len(continuation_ids)))
    return requests


def make_score_fn(model: PureModel) -> Callable:
    """score(params, batch) -> [rows] float32: each row's summed log-probability of its labels
    where `loss_mask` is set (the log-softmax over every row of the output head)."""

    def score(params, batch):
        logits_btv = model.logits(params, batch)
        picked_bt = jnp.take_along_axis(logits_btv, batch["labels"][..., None], axis=-1)[..., 0]
        logprob_bt = picked_bt - jax.nn.logsumexp(logits_btv, axis=-1)
        # where, not multiply: a padded row's NaN (a query with no key) stays out of the sum.
        return jnp.sum(jnp.where(batch["loss_mask"] > 0, logprob_bt, 0.0), axis=1)

    return score


def padded_length(tokens: int, max_seq_len: int) -> int:
    """The row length a request of `tokens` input tokens is padded to."""
    length = SHORTEST_ROW
    while length < tokens:
        length *= 2
    return min(length, max_seq_len)


def request_batch(requests: Sequence[Request], rows: int, length: int) -> dict[str, np.ndarray]:
    """`rows` rows of `length`: each request's input (its tokens but the last), its next tokens
    as labels, its continuation masked in; the rows past the requests are padding."""
    batch = {key: np.zeros((rows, length), np.int32)
             for key in ("tokens", "labels", "positions", "segment_ids", "loss_mask")}
    for row, request in enumerate(requests):
        n = len(request.tokens) - 1
        batch["tokens"][row, :n] = request.tokens[:-1]
        batch["labels"][row, :n] = request.tokens[1:]
        batch["positions"][row, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        batch["loss_mask"][row, n - request.continuation:n] = 1
    return batch


def score_requests(score_fn: Callable, params: Any, requests: Sequence[Request], rows: int,
                   max_seq_len: int, place: Callable | None = None) -> np.ndarray:
    """The log-likelihood of each request's continuation (float64 on the host), in order.

    `score_fn` is `make_score_fn`'s, jitted; `place` turns a host batch of `rows` rows into
    what it takes (this process's share, on the mesh), by default the batch as it is."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
    chunks, sums = [], []
    for first in range(0, len(order), rows):
        chunk = order[first:first + rows]
        length = padded_length(len(requests[chunk[0]].tokens) - 1, max_seq_len)
        batch = request_batch([requests[i] for i in chunk], rows, length)
        sums.append(score_fn(params, batch if place is None else place(batch)))
        chunks.append(chunk)
    fetched = jax.device_get(sums)  # note: the one host sync of a task's scoring
    loglik = np.zeros(len(requests), np.float64)
    for chunk, values in zip(chunks, fetched):
        loglik[chunk] = np.asarray(values, np.float64)[:len(chunk)]
    return loglik


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error, sqrt(sample variance / n), as lm-evaluation-harness
    reports it (None for a single value)."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(float(np.sum((values - mean) ** 2)) / (len(values) - 1)
                           / len(values))


def choice_metrics(task: Task, loglik: np.ndarray) -> dict[str, float | None]:
    """acc and acc_norm (log-likelihood per character of the choice), means and standard
    errors, from the log-likelihood of every request of `encode_requests`, in order."""
    correct, correct_norm, at = [], [], 0
    for example in task.examples:
        scores = loglik[at:at + len(example.choices)]
        at += len(example.choices)
        characters = np.array([len(choice) for choice in example.choices], np.float64)
        # argmax takes the first of equal scores, as numpy does in lm-evaluation-harness.
        correct.append(float(np.argmax(scores) == example.answer))
        correct_norm.append(float(np.argmax(scores / characters) == example.answer))
    acc, acc_stderr = mean_and_stderr(correct)
    acc_norm, acc_norm_stderr = mean_and_stderr(correct_norm)
    return {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm,
            "acc_norm_stderr": acc_norm_stderr}
