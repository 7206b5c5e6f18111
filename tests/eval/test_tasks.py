"""kd_jax.eval.tasks: task files read and refused line by line, requests split as
lm-evaluation-harness splits them, batched scores equal to one request at a time, and acc,
acc_norm and their standard errors by hand. (Against transformers: tests/train/test_tasks.py.)"""

import json
import math

import numpy as np
import pytest

from kd_jax.config import ConfigError
from kd_jax.data.tokenizers import ByteTokenizer
from kd_jax.eval.tasks import (
    Request,
    choice_metrics,
    encode_requests,
    make_score_fn,
    mean_and_stderr,
    padded_length,
    read_task_file,
    request_batch,
    score_requests,
)
from tests.helpers import RTOL, STUDENT, VALID_VOCAB, fast_jit


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"context": "a", "choices": ["b", "c"], "answer": 1})
BAD_LINES = {
    "not JSON": ("{context", "not JSON (Expecting property name enclosed in double quotes)"),
    "a list": ("[1, 2]", "expected a JSON object with context, choices, answer"),
    "unknown key": ('{"query": "a", "context": "a", "choices": ["b", "c"], "answer": 0}',
                    "unknown key 'query' (the keys are context, choices, answer)"),
    "missing key": ('{"context": "a", "choices": ["b", "c"]}', "missing 'answer'"),
    "context a number": ('{"context": 3, "choices": ["b", "c"], "answer": 0}',
                         "'context' must be a string"),
    "one choice": ('{"context": "a", "choices": ["b"], "answer": 0}',
                   "'choices' must be a list of at least two non-empty strings"),
    "an empty choice": ('{"context": "a", "choices": ["b", ""], "answer": 0}',
                        "'choices' must be a list of at least two non-empty strings"),
    "answer out of range": ('{"context": "a", "choices": ["b", "c"], "answer": 2}',
                            "'answer' must be the index of a choice (0 to 1), got 2"),
    "answer a boolean": ('{"context": "a", "choices": ["b", "c"], "answer": true}',
                         "'answer' must be the index of a choice (0 to 1), got True"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_refused_with_its_file_and_line(case, tmp_path):
    line, message = BAD_LINES[case]
    path = write_lines(tmp_path / "task.jsonl", [GOOD, "", line])
    with pytest.raises(ConfigError) as err:
        read_task_file(path)
    assert str(err.value) == f"{path}:3: {message}"


def test_a_file_is_read_in_order_blank_lines_skipped(tmp_path):
    path = write_lines(tmp_path / "arc.jsonl", [GOOD, "  ", GOOD.replace('"a"', '"x"')])
    task = read_task_file(path)
    assert task.name == "arc" and [e.line for e in task.examples] == [1, 3]
    assert task.examples[1].context == "x" and task.examples[1].choices == ("b", "c")
    with pytest.raises(ConfigError, match="no examples"):
        read_task_file(write_lines(tmp_path / "empty.jsonl", ["", " "]))
    with pytest.raises(ConfigError, match="no task file at"):
        read_task_file(tmp_path / "nowhere.jsonl")


def test_requests_are_split_as_lm_evaluation_harness_splits_them(tmp_path):
    """Bytes: the context's trailing spaces move onto the continuation, which is " " + choice;
    too long, the context is cut from the left."""
    path = write_lines(tmp_path / "t.jsonl", [
        json.dumps({"context": "ab ", "choices": ["cd", "e"], "answer": 0}),
        json.dumps({"context": "0123456789", "choices": ["xy", "z"], "answer": 1})])
    requests = encode_requests(read_task_file(path), ByteTokenizer(), max_seq_len=6)
    spelled = [(bytes(r.tokens.astype(np.uint8)).decode(), r.continuation) for r in requests]
    assert spelled == [("ab  cd", 4), ("ab  e", 3), ("6789 xy", 3), ("56789 z", 2)]


def test_requests_the_model_cannot_score_are_refused(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [
        GOOD, json.dumps({"context": "", "choices": ["b", "c"], "answer": 0})])
    with pytest.raises(ConfigError) as err:
        encode_requests(read_task_file(empty), ByteTokenizer(), 32)
    assert str(err.value) == (f"{empty}:2: the context is empty and the byte tokenizer has no "
                              "beginning- or end-of-sequence token to stand for it")
    long = write_lines(tmp_path / "long.jsonl", [
        json.dumps({"context": "a", "choices": ["b", "c" * 8], "answer": 0})])
    with pytest.raises(ConfigError) as err:
        encode_requests(read_task_file(long), ByteTokenizer(), 8)
    assert str(err.value) == f"{long}:1: choice 1 is 9 tokens, more than the model's context (8)"


def test_acc_acc_norm_and_standard_errors_by_hand(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [
        json.dumps({"context": "q", "choices": ["a", "bbbb"], "answer": 1}),
        json.dumps({"context": "q", "choices": ["aa", "b", "cc"], "answer": 0}),
        json.dumps({"context": "q", "choices": ["a", "b"], "answer": 0})])
    loglik = np.array([-2.0, -4.0,  # acc picks "a" (-2); per character "bbbb" (-1 > -2): norm
                       -3.0, -2.0, -5.0,  # acc picks "b"; per character -1.5, -2, -2.5: "aa"
                       -1.0, -1.0])  # a tie: the first, as numpy's argmax
    metrics = choice_metrics(read_task_file(path), loglik)
    # acc: [0, 0, 1], mean 1/3, sample variance 1/3, standard error sqrt(1/3 / 3) = 1/3;
    # acc_norm: [1, 1, 1], mean 1, standard error 0.
    assert metrics == pytest.approx({"acc": 1 / 3, "acc_stderr": 1 / 3, "acc_norm": 1.0,
                                     "acc_norm_stderr": 0.0}, rel=1e-12)
    assert mean_and_stderr([1.0]) == (1.0, None)
    values = [0.0, 1.0, 1.0, 1.0]
    assert mean_and_stderr(values)[1] == pytest.approx(
        math.sqrt(np.var(values, ddof=1) / 4), rel=1e-12)


def test_batched_padded_scores_equal_one_request_at_a_time(tiny_models):
    """Sorted, bucketed, padded rows and padding rows change no request's score; a length of
    padding compiles once."""
    student, student_params, _, _ = tiny_models
    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(0, VALID_VOCAB, n + 1).astype(np.int32), cont)
                for n, cont in ((5, 2), (20, 7), (3, 3), (32, 1), (17, 17), (9, 4), (12, 5))]
    traces = []

    def counted(params, batch):
        traces.append(batch["tokens"].shape)
        return make_score_fn(student)(params, batch)

    batched = score_requests(fast_jit(counted), student_params, requests, 4, STUDENT.max_seq_len)
    assert sorted(traces) == [(4, 16), (4, 32)]  # inputs 32, 20, 17, 12 | 9, 5, 3 tokens

    logits_fn = fast_jit(student.logits)
    for request, score in zip(requests, batched):
        alone = request_batch([request], 1, len(request.tokens) - 1)
        logits = np.asarray(logits_fn(student_params, alone), np.float64)[0]
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
            -1, keepdims=True)) - logits.max(-1, keepdims=True)
        n = len(request.tokens) - 1
        picked = logprobs[np.arange(n), request.tokens[1:]][n - request.continuation:]
        np.testing.assert_allclose(score, picked.sum(), rtol=RTOL)
    assert padded_length(3, 32) == 16 and padded_length(17, 32) == 32
    assert padded_length(33, 48) == 48
