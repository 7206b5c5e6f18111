"""`kd-jax eval --tasks` against an independent reference: a Hugging Face checkpoint scored by
transformers in float64, one request at a time, with the tokenizer transformers loads and the
requests, acc and acc_norm written here from lm-evaluation-harness's definitions; on two task
files, one whose choices differ in length so that acc and acc_norm differ, one of edge cases
(trailing whitespace, an empty context, a context longer than the model's)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kd_jax import cli  # noqa: E402
from kd_jax.data.tokenizers import load_tokenizer  # noqa: E402
from kd_jax.eval.tasks import encode_requests, make_score_fn, read_task_file  # noqa: E402
from kd_jax.eval.tasks import score_requests  # noqa: E402
from kd_jax.models import load_pretrained  # noqa: E402
from kd_jax.train.tasks import evaluate_checkpoint_tasks  # noqa: E402
from tests.helpers import RTOL, fast_jit, write_corpus  # noqa: E402
from tests.hf_checkpoints import make_checkpoint  # noqa: E402

END = "<|endoftext|>"


def byte_level_tokenizer(directory, corpus):
    """A GPT-2-style byte-level BPE of 300 ids (spaces belong to the next word), with the
    tokenizer_config.json naming its one special token as beginning and end of sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END]))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": END, "eos_token": END, "tokenizer_class": "PreTrainedTokenizerFast"}))


def task_files(directory, corpus):
    """continuations.jsonl: a line's start, its true rest among three other lines' rests (of
    other lengths); edge.jsonl: the cases where lm-evaluation-harness's rules matter."""
    lines = [line.strip() for line in corpus.read_text().splitlines()
             if len(line.strip()) > 30 and " " in line.strip()[10:]]
    rng = random.Random(0)
    rng.shuffle(lines)
    rows = []
    for line in lines[:40]:
        cut = line.index(" ", 10)
        choices = [line[cut + 1:]] + [other.split(" ", 2)[-1] for other in
                                      rng.sample(lines[40:], 3)]
        rng.shuffle(choices)
        rows.append({"context": line[:cut], "choices": choices,
                     "answer": choices.index(line[cut + 1:])})
    edge = [
        {"context": "def insort(a, x, lo=0, hi=None): ", "choices": ["return", "while"],
         "answer": 0},
        {"context": "", "choices": ["import sys", "import heapq", "x = 1"], "answer": 1},
        {"context": "The Zen of Python, by Tim Peters\n\n", "choices": ["Beautiful", "Ugly"],
         "answer": 0},
        {"context": " ".join(lines[50:56]), "choices": ["lo = mid", "hi = mid"], "answer": 1},
        {"context": "caf\u00e9 na\u00efve", "choices": ["\u00fcber", "uber"], "answer": 1},
        {"context": "for i in range(n):\n   ", "choices": ["pass", "break", "continue"],
         "answer": 2},
    ]
    paths = []
    for name, examples in (("continuations", rows), ("edge", edge)):
        paths.append(directory / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(example) + "\n" for example in examples))
    return paths


def reference_logliks(checkpoint, path, max_length):
    """Each choice's log-likelihood as lm-evaluation-harness's `hf` model computes it, here in
    float64: (context, " " + choice), trailing spaces moved onto the continuation, the
    continuation's tokens those of the whole past the context's, an empty context the
    beginning-of-sequence token, the last max_length + 1 tokens kept."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).double().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    examples = [json.loads(line) for line in path.read_text().splitlines()]
    logliks = []
    for example in examples:
        scores = []
        for choice in example["choices"]:
            context, continuation = example["context"], " " + choice
            if context == "":
                continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
                context_ids = [tokenizer.bos_token_id]
            else:
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                whole = tokenizer(context + continuation).input_ids
                context_ids = tokenizer(context).input_ids
                continuation_ids = whole[len(context_ids):]
            ids = (context_ids + continuation_ids)[-(max_length + 1):]
            with torch.no_grad():
                logits = model(torch.tensor([ids[:-1]])).logits[0]
            logprobs = torch.log_softmax(logits, dim=-1).numpy()
            n = len(continuation_ids)
            scores.append(float(logprobs[np.arange(len(ids) - 1), ids[1:]][-n:].sum()))
        logliks.append(scores)
    return examples, logliks


def reference_metrics(examples, logliks):
    """acc and acc_norm (log-likelihood per character of the choice) from their definition,
    with the standard error of a mean, sample variance."""
    acc = np.array([float(np.argmax(scores) == example["answer"])
                    for example, scores in zip(examples, logliks)])
    acc_norm = np.array([
        float(np.argmax(np.array(scores) / [len(c) for c in example["choices"]])
              == example["answer"]) for example, scores in zip(examples, logliks)])
    return {"acc": acc.mean(), "acc_stderr": acc.std(ddof=1) / np.sqrt(len(acc)),
            "acc_norm": acc_norm.mean(),
            "acc_norm_stderr": acc_norm.std(ddof=1) / np.sqrt(len(acc_norm))}


def test_a_checkpoint_scores_as_transformers_and_the_definitions_say(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    checkpoint = make_checkpoint(tmp_path / "checkpoint", "llama2", vocab_size=320)
    byte_level_tokenizer(checkpoint, corpus)
    continuations, edge = task_files(tmp_path, corpus)
    max_length = json.loads((checkpoint / "config.json").read_text())[
        "max_position_embeddings"]
    assert max_length == 64

    result = evaluate_checkpoint_tasks(checkpoint, [continuations, edge])["tasks"]
    pretrained = load_pretrained(checkpoint)
    score_fn = fast_jit(make_score_fn(pretrained.model))
    tokenizer = load_tokenizer(str(checkpoint / "tokenizer.json"))
    for path in (continuations, edge):
        examples, expected = reference_logliks(checkpoint, path, max_length)
        requests = encode_requests(read_task_file(path), tokenizer, max_length)
        ours = score_requests(score_fn, pretrained.params, requests, 8, max_length)
        np.testing.assert_allclose(ours, np.concatenate(expected), rtol=RTOL)
        metrics = result[path.stem]["model"]
        assert result[path.stem]["examples"] == len(examples)
        assert metrics == pytest.approx(reference_metrics(examples, expected), rel=1e-12)
    # Normalizing by the choice's length is real: on choices of other lengths it changes
    # which choice wins.
    assert result["continuations"]["model"]["acc"] != result["continuations"]["model"][
        "acc_norm"]
    assert any(len(r.tokens) == max_length + 1 for r in encode_requests(
        read_task_file(edge), tokenizer, max_length))  # a context was cut

    capsys.readouterr()
    assert cli.main(["eval", str(checkpoint), "--tasks", str(continuations), "--tasks",
                     str(edge)]) == 0
    printed = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in printed if line.startswith("continuations"))
    assert row[:3] == ["continuations", "model", "40"]
    assert float(row[3]) == pytest.approx(result["continuations"]["model"]["acc"], abs=5e-5)


def test_a_checkpoint_without_its_tokenizer_or_tasks_is_refused(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "checkpoint", "llama2")
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n")
    for argv, message in (
            ([str(checkpoint), "--tasks", str(task)],
             f"{checkpoint} has no tokenizer.json: name its tokenizer with --tokenizer (byte, "
             "or a tokenizer.json)"),
            ([str(checkpoint)], f"{checkpoint} is a checkpoint directory, not a run: kd-jax "
                                "eval scores it on task files (--tasks FILE.jsonl)"),
            ([str(checkpoint), "--tasks", str(task), "--tasks", str(task)],
             f"--tasks: {task} and {task} are both task 't': a task is named by its file"),
            ([str(checkpoint), "--tasks", str(task), "--tokenizer", "byte"],
             f"the byte tokenizer has 256 ids, more than the 96 rows of {checkpoint}'s "
             "embedding")):
        capsys.readouterr()
        assert cli.main(["eval", *argv]) == 2
        assert capsys.readouterr().err.strip() == f"kd-jax: error: {message}"
