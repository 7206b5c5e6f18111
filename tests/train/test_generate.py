"""`kd-jax generate` end to end on the session's tiny teacher run: the JSONL it writes holds the
sampler's own responses, the teacher path gives the same model's, and the file is a
prompt/response dataset with the loss on the response only."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, cli
from kd_jax.config import DataConfig
from kd_jax.data.packing import tokenize
from kd_jax.data.sources import iter_documents
from kd_jax.data.tokenizers import ByteTokenizer
from kd_jax.models import generate as sampler_lib
from kd_jax.models.pure import abstract_model
from kd_jax.run_dir import read_run
from tests.helpers import write_config

PROMPTS = ["def insort(a, x):", "import", "The Zen of Python, by Tim Peters\n\nBeautiful"]
MAX_NEW, BATCH = 10, 2
KEYS = {"prompt", "response", "prompt_tokens", "response_tokens"}


@pytest.fixture(scope="module")
def generated(teacher_run, tmp_path_factory):
    """(teacher run directory, output of generate.model=student, of generate.model=teacher)."""
    root, corpus = teacher_run
    tmp = tmp_path_factory.mktemp("generate")
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = write_config(tmp / "generate.yaml", corpus, root / "teacher", f"""
generate:
  prompts: {tmp / 'prompts.jsonl'}
  out: {tmp / 'student.jsonl'}
  max_new_tokens: {MAX_NEW}
  batch_size: {BATCH}
""")
    assert cli.main(["generate", str(config)]) == 0
    assert cli.main(["generate", str(config), "generate.model=teacher", "teacher.source=checkpoint",
                     f"teacher.path={root / 'teacher'}", f"generate.out={tmp / 'teacher.jsonl'}"]
                    ) == 0
    assert sorted(path.name for path in tmp.iterdir()) == [  # no temporary file left behind
        "generate.yaml", "prompts.jsonl", "student.jsonl", "teacher.jsonl"]
    return root / "teacher", tmp / "student.jsonl", tmp / "teacher.jsonl"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_line_is_a_prompt_and_the_sampler_s_greedy_response(generated):
    run_dir, student_out, _ = generated
    lines = _lines(student_out)
    assert [line["prompt"] for line in lines] == PROMPTS
    assert all(set(line) == KEYS for line in lines)
    # The same decoding, called directly: the run's weights, the prompts' bytes (no prefix for
    # the byte tokenizer), the command's batches (the last filled with its first prompt).
    cfg, _ = read_run(run_dir)
    model_cfg = cfg.model
    _, abstract = abstract_model(model_cfg)
    params = checkpoint.restore_params(run_dir, abstract)
    sample = sampler_lib.make_sampler(model_cfg, MAX_NEW, ByteTokenizer.vocab_size)
    encoded = [list(prompt.encode()) for prompt in PROMPTS]
    width = max(map(len, encoded))
    responses = []
    for rows in ([0, 1], [2, 2]):
        tokens, lengths = sampler_lib.left_pad([encoded[row] for row in rows], width)
        out = sample(params, tokens, lengths, sampler_lib.row_keys(0, np.array(rows)),
                     sampler_lib.Sampling(), np.array([-1], np.int32))
        out = jax.tree.map(np.asarray, out)
        responses += [out.tokens_bn[i, :out.lengths_b[i]] for i in range(len(set(rows)))]
    for line, prompt_ids, response in zip(lines, encoded, responses):
        assert line["prompt_tokens"] == len(prompt_ids)
        assert line["response_tokens"] == len(response) == MAX_NEW  # bytes: no stop token
        assert line["response"] == ByteTokenizer().decode(response)


def test_the_teacher_path_generates_with_the_same_model(generated):
    _, student_out, teacher_out = generated
    assert _lines(teacher_out) == _lines(student_out)


def test_the_output_is_a_prompt_response_dataset_trained_on_the_response_only(generated):
    _, student_out, _ = generated
    data = DataConfig(source="json", path=str(student_out), prompt_column="prompt",
                      response_column="response", tokenizer="byte")
    docs = list(iter_documents(data, data.split))
    assert [(doc.prompt, doc.text) for doc in docs] == [
        (line["prompt"], line["response"]) for line in _lines(student_out)]
    tokenized = tokenize(docs, ByteTokenizer(), add_bos=True)
    # The untrained spans are exactly the prompts, back to back with their responses.
    prompt_bytes = [len(doc.prompt.encode()) for doc in docs]
    starts = np.cumsum([0] + [len(d.prompt.encode()) + len(d.text.encode()) for d in docs])[:-1]
    np.testing.assert_array_equal(tokenized.untrained,
                                  np.stack([starts, starts + prompt_bytes], axis=1))


def test_prompts_come_from_a_text_file_or_the_data_section(tmp_path):
    from kd_jax import config as config_lib
    from kd_jax.train.generate import read_prompts

    (tmp_path / "prompts.txt").write_text("first prompt\n\n  second, indented\n")
    cfg = config_lib.load(None, [f"generate.prompts={tmp_path / 'prompts.txt'}"])
    assert read_prompts(cfg) == ["first prompt", "  second, indented"]
    rows = [{"q": "what?", "a": "this"}, {"q": "why?", "a": "because"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config_lib.load(None, ["data.source=json", f"data.path={tmp_path / 'qa.jsonl'}",
                                 "data.prompt_column=q", "data.response_column=a"])
    assert read_prompts(cfg) == ["what?", "why?"]


def test_stop_tokens_default_to_the_tokenizer_s_end_of_sequence(teacher_run, tmp_path):
    from kd_jax.config import ConfigError
    from kd_jax.data.tokenizers import load_tokenizer, stop_token_ids
    from tests.helpers import write_tokenizer

    _, corpus = teacher_run
    tokenizer = load_tokenizer(str(write_tokenizer(tmp_path / "tokenizer.json", corpus)))
    stop = "generate.stop"
    assert stop_token_ids([], tokenizer, stop).tolist() == [-1]  # no tokenizer_config.json: none
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "[UNK]"}}))
    assert stop_token_ids([], tokenizer, stop).tolist() == [tokenizer.token_id("[UNK]")]
    assert stop_token_ids(["def", 7], tokenizer, stop).tolist() == [tokenizer.token_id("def"), 7]
    assert stop_token_ids(["\n"], ByteTokenizer(), stop).tolist() == [10]
    with pytest.raises(ConfigError, match="'def x' is not one token"):
        stop_token_ids(["def x"], tokenizer, stop)
    with pytest.raises(ConfigError, match="token id 256 is not below the vocabulary size"):
        stop_token_ids([256], ByteTokenizer(), stop)
