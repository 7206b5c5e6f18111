"""Every bad input a user can give: one line on stderr with its exact message, exit code 2, and
nothing that exists changed (an existing run directory, a cache and a token store are hashed
before and after). The messages are the catalogue in docs/errors.md, which this test checks.

Paths in messages are written with placeholders: TMP (the test's directory), TEACHER (the
session's teacher run), CACHE (the session's sampled cache).
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd_jax import cli
from tests.helpers import write_config, write_tokenizer
from tests.teacher.test_cross import word_level

DOCS = Path(__file__).parents[1] / "docs" / "errors.md"


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# The session's teacher run, distilled from online.
ONLINE = ["teacher.source=checkpoint", "teacher.path={teacher}"]
# name -> the command line, with {config}, {tmp}, {teacher}, {cache}, {cache_config} filled in.
# The message each must print is in docs/errors.md.
CASES = {
    "command without its config": ["train"],
    "unknown command": ["trian", "{config}"],
    "unknown option": ["train", "{config}", "--steps=3"],
    "unknown key": ["train", "{config}", "train.setps=3"],
    "unknown section": ["train", "{config}", "trian.steps=3"],
    "override without a value": ["train", "{config}", "train.steps"],
    "wrong type": ["train", "{config}", "optimizer.lr=fast"],
    "not a choice": ["train", "{config}", "loss.divergence=kl"],
    "NaN learning rate": ["train", "{config}", "optimizer.lr=nan"],
    "infinite learning rate": ["train", "{config}", "optimizer.lr=inf"],
    "NaN temperature": ["train", "{config}", "loss.temperature=nan"],
    "zero temperature": ["train", "{config}", "loss.temperature=0"],
    "negative stop_at": ["train", "{config}", "train.stop_at=-1"],
    "negative eval_every": ["train", "{config}", "train.eval_every=-1"],
    "negative eval_sequences": ["train", "{config}", "train.eval_sequences=-4"],
    "negative init_std": ["train", "{config}", "model.init_std=-0.5"],
    "negative weight_decay": ["train", "{config}", "optimizer.weight_decay=-0.1"],
    "negative max_documents": ["train", "{config}", "data.max_documents=-5"],
    "Adam beta of 1 or more": ["train", "{config}", "optimizer.b2=1.5"],
    "mesh size below -1": ["train", "{config}", "mesh.data=-2"],
    "negative seed": ["train", "{config}", "data.seed=-1"],
    "JSD beta out of range": ["train", "{config}", "loss.beta=2"],
    "held-out fraction out of range": ["train", "{config}", "data.heldout_fraction=1.5"],
    "batch not divisible by microbatches": ["train", "{config}", "train.microbatches=3"],
    "sequence longer than the context": ["train", "{config}", "data.seq_len=1024"],
    "heads not grouped evenly": ["train", "{config}", "model.n_heads=3"],
    "quantization group that does not divide": ["train", "{config}", "model.quantize=int4",
        "model.quantize_group=24"],
    "quantization group with nothing quantized": ["train", "{config}", "model.quantize_group=32"],
    "quantization group with llama.cpp's formats only": ["train", "{config}",
        "model.quantize=q4_0", "model.quantize_group=32"],
    "llama.cpp block that does not divide": ["train", "{config}", "model.quantize=q8_0",
        "model.d_model=48"],
    "GGUF export with the byte tokenizer": ["export", "{teacher}", "{tmp}/gguf", "--format",
        "gguf"],
    "tied embedding and head quantized apart": ["train", "{config}", "model.tie_embeddings=true",
        "model.quantize=int4", "model.quantize_head=int4"],
    "LoRA on a student from scratch": ["train", "{config}", "model.lora_rank=8"],
    "LoRA rank above a projection's dimension": ["distill", "{config}", *ONLINE,
        "model.init=teacher", "model.lora_rank=20"],
    "unknown LoRA projection": ["train", "{config}", "model.lora_rank=4",
        "model.lora_targets=[q, query]"],
    "LoRA dropout of 1": ["train", "{config}", "model.lora_rank=4", "model.lora_dropout=1"],
    "LoRA setting without a rank": ["train", "{config}", "model.lora_dropout=0.1"],
    "prompt column alone": ["train", "{config}", "data.prompt_column=q"],
    "streaming without a store": ["train", "{config}", "data.source=hub", "data.path=x",
        "data.streaming=true"],
    "mixture without a store": ["train", "{config}", 
        "data.mixture=[{{weight: 1, source: stdlib}}]"],
    "mixture with an unknown key": ["train", "{config}", "data.store={tmp}/mix",
        "data.mixture=[{{weight: 1, sauce: x}}]"],
    "missing config file": ["train", "{tmp}/nowhere.yaml"],
    "config file not UTF-8": ["train", "{tmp}/binary.yaml"],
    "config file not YAML": ["train", "{tmp}/broken.yaml"],
    "config file a list": ["train", "{tmp}/list.yaml"],
    "run directory is a file": ["train", "{config}", "train.run_dir={tmp}/afile"],
    "resumed with another loss": ["train", "{config}", "train.run_dir={tmp}/existing",
        "loss.ce_weight=0.5"],
    "no data file matches": ["train", "{config}", "data.path={tmp}/none*.txt"],
    "held-out files not found": ["train", "{config}", "data.heldout_path={tmp}/none*.txt"],
    "held-out files trained on too": ["train", "{config}", "data.heldout_path={tmp}/afile.txt",
        "data.path={tmp}/*.txt"],
    "empty data file": ["train", "{config}", "data.path={tmp}/empty.txt"],
    "missing tokenizer file": ["train", "{config}", "data.tokenizer={tmp}/no/tokenizer.json"],
    "tokenizer file that is not one": ["train", "{config}", "data.tokenizer={tmp}/broken.yaml"],
    "distill without a teacher": ["distill", "{config}"],
    "teacher path a file": ["distill", "{config}", "teacher.source=checkpoint",
        "teacher.path={tmp}/afile"],
    "Hugging Face teacher path a file": ["distill", "{config}", "teacher.source=hf",
        "teacher.path={tmp}/afile"],
    "cache verified against other data": ["cache", "verify", "{cache}", "--config",
        "{cache_config}", "data.seq_len=16"],
    "teacher directory missing": ["distill", "{config}", "teacher.source=checkpoint",
        "teacher.path={tmp}/nowhere"],
    "teacher directory without checkpoints": ["distill", "{config}", "teacher.source=checkpoint",
        "teacher.path={tmp}/afile_dir"],
    "teacher with another tokenizer and white-box terms": ["distill", "{config}",
        "teacher.source=checkpoint", "teacher.path={teacher}",
        "data.tokenizer={tmp}/tokenizer.json", "loss.hidden_weight=1"],
    "teacher tokenizer with nothing in common": ["distill", "{config}", *ONLINE,
        "data.tokenizer={tmp}/words.json"],
    "sampled cache of a teacher with another tokenizer": ["precompute", "{config}",
        "teacher.source=checkpoint", "teacher.path={teacher}",
        "data.tokenizer={tmp}/tokenizer.json", "cache.mode=sample", "cache.dir={tmp}/new_cache"],
    "cache of a teacher with another tokenizer for loss.cross_vocab bytes": ["precompute",
        "{config}", "teacher.source=checkpoint", "teacher.path={teacher}",
        "data.tokenizer={tmp}/tokenizer.json", "loss.cross_vocab=bytes", "cache.mode=full",
        "cache.dir={tmp}/new_cache"],
    "negative teacher_seq_len": ["train", "{config}", "data.teacher_seq_len=-1"],
    "pickle weights where safetensors are expected": ["distill", "{config}", "teacher.source=hf",
        "teacher.path={tmp}/pickled"],
    "cache without a directory": ["distill", "{config}", "teacher.source=cache"],
    "cache of another packing": ["distill", "{cache_config}", "teacher.source=cache",
        "cache.dir={cache}", "data.seq_len=16", "train.run_dir={tmp}/r"],
    "cache loss it cannot serve": ["distill", "{cache_config}", "teacher.source=cache",
        "cache.dir={cache}", "loss.divergence=reverse_kl", "train.run_dir={tmp}/r"],
    "white-box loss from a cache": ["distill", "{config}", "teacher.source=cache",
        "cache.dir={cache}", "loss.attention_weight=1"],
    "white-box layer out of range": ["distill", "{config}", "teacher.source=checkpoint",
        "teacher.path={teacher}", "loss.hidden_weight=1", "loss.hidden_layers=[[0, 5]]"],
    "precompute without a cache directory": ["precompute", "{config}", "teacher.source=checkpoint",
        "teacher.path={teacher}"],
    "prepare without a store": ["prepare", "{config}"],
    "store of another packing": ["train", "{config}", "data.store={tmp}/store", "data.seq_len=16"],
    "store directory not empty": ["prepare", "{config}", "data.store={tmp}/existing"],
    "eval of a directory that is no run": ["eval", "{tmp}/afile_dir"],
    "eval of neither file nor directory": ["eval", "{tmp}/nothing"],
    "task file with a bad line": ["eval", "{teacher}", "--tasks", "{tmp}/bad_task.jsonl"],
    "task file missing": ["eval", "{teacher}", "--tasks", "{tmp}/nowhere.jsonl"],
    "plan on no devices": ["plan", "{config}", "--devices", "0"],
    "truncated teacher checkpoint": ["distill", "{config}", "teacher.source=checkpoint",
                                     "teacher.path={tmp}/damaged_teacher"],
    "pickle in a token store": ["train", "{config}", "data.store={tmp}/pickled_store"],
    "damaged token store prepared again": ["prepare", "{config}",
        "data.store={tmp}/damaged_store"],
    "eval of a damaged checkpoint": ["eval", "{tmp}/damaged_teacher"],
    "report of a missing run directory": ["report", "{tmp}/existing", "{tmp}/nothing"],
    "report of a directory that is no run": ["report", "{tmp}/afile_dir"],
    "report of a run without metrics": ["report", "{tmp}/no_metrics"],
    "report into a file": ["report", "{tmp}/existing", "--out", "{tmp}/afile"],
    "generate without a prompts file": ["generate", "{config}",
        "generate.prompts={tmp}/nowhere.jsonl", "generate.out={tmp}/out.jsonl"],
    "generate top_p out of range": ["generate", "{config}", "generate.top_p=1.5"],
    "generate with a negative temperature": ["generate", "{config}",
        "generate.temperature=-0.5"],
    "on-policy in a train run": ["train", "{config}", *ONLINE, "onpolicy.fraction=0.5",
        "onpolicy.max_new_tokens=16"],
    "on-policy from a cache": ["distill", "{config}", "teacher.source=cache",
        "cache.dir={cache}", "onpolicy.fraction=0.5"],
    "on-policy answers as long as a row": ["distill", "{config}", *ONLINE,
        "onpolicy.fraction=0.5", "onpolicy.max_new_tokens=32"],
    "on-policy fraction of no row": ["distill", "{config}", *ONLINE, "onpolicy.fraction=0.05",
        "onpolicy.max_new_tokens=16"],
    "on-policy stop that is no token": ["distill", "{config}", *ONLINE, "onpolicy.fraction=0.5",
        "onpolicy.max_new_tokens=16", "onpolicy.stop=[ab]"],
}


@pytest.fixture(scope="module")
def world(teacher_run, sampled_cache, tmp_path_factory):
    """The files the cases point at, and the things that must not change."""
    from kd_jax.data.prepare import prepare
    from kd_jax.data.tokenizers import ByteTokenizer

    teacher_root, corpus = teacher_run
    cache_root, _, cache_config = sampled_cache
    tmp = tmp_path_factory.mktemp("bad_inputs")
    config = write_config(tmp / "good.yaml", corpus, tmp / "run")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00model:")
    (tmp / "broken.yaml").write_text("model: [unclosed\n")
    (tmp / "list.yaml").write_text("- model\n- data\n")
    (tmp / "afile").write_text("not a directory")
    (tmp / "afile_dir").mkdir()
    (tmp / "empty.txt").write_text("")
    (tmp / "afile.txt").write_text("a held-out file")
    (tmp / "bad_task.jsonl").write_text(
        '{"context": "a", "choices": ["b", "c"], "answer": 0}\n'
        '{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
    write_tokenizer(tmp / "tokenizer.json", corpus)
    word_level(tmp / "words.json", [line for line in corpus.read_text().splitlines() if line])
    existing = tmp / "existing"
    assert cli.main(["train", str(config), f"train.run_dir={existing}", "train.steps=2",
                     "train.checkpoint_every=2"]) == 0
    (tmp / "no_metrics").mkdir()  # a run directory whose run has not logged a step yet
    for name in ("config.yaml", "run.json"):
        shutil.copy(existing / name, tmp / "no_metrics" / name)
    (tmp / "pickled").mkdir()
    marker = tmp / "executed"
    (tmp / "pickled" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": 256}))
    (tmp / "pickled" / "pytorch_model.bin").write_bytes(_pickle_payload(marker))
    from kd_jax.config import DataConfig

    prepare(DataConfig(source="text", path=str(corpus), tokenizer="byte", seq_len=32,
                       heldout_fraction=0.1, store=str(tmp / "store")), ByteTokenizer(),
            progress=False)
    # A store whose token shard is a pickled object array, and a teacher with a truncated file.
    shutil.copytree(tmp / "store", tmp / "damaged_store")
    shard = tmp / "damaged_store" / "p0-00000.tokens.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    shutil.copytree(tmp / "store", tmp / "pickled_store")
    with open(tmp / "pickled_store" / "p0-00000.tokens.npy", "wb") as file:
        np.save(file, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    damaged = shutil.copytree(teacher_root / "teacher", tmp / "damaged_teacher")
    step_dir = damaged / "checkpoints" / "6" / "params"
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-100])
    (tmp / "damaged_file.txt").write_text(data.relative_to(damaged / "checkpoints" / "6")
                                          .as_posix())
    return {"config": config, "tmp": tmp, "teacher": teacher_root / "teacher",
            "cache": cache_root / "cache", "cache_config": cache_config, "marker": marker}


def documented_messages() -> dict[str, str]:
    """case name -> its message, from the catalogue: each case is a `### name` heading followed,
    a few lines down, by an indented `kd-jax: error: ...` line."""
    messages, name = {}, None
    for line in DOCS.read_text().splitlines():
        if line.startswith("### "):
            name = line[4:].strip()
        elif line.startswith("    kd-jax: error: ") and name is not None:
            messages[name] = line.removeprefix("    kd-jax: error: ")
            name = None
    return messages


def test_the_catalogue_lists_every_case_once():
    assert sorted(documented_messages()) == sorted(CASES)


class _Payload:
    """Unpickled, it creates the file `marker`: a stand-in for code hidden in a weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_payload(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(_Payload(marker))


def _normalize(text: str, world: dict) -> str:
    damaged = (world["tmp"] / "damaged_file.txt").read_text()
    text = text.replace(damaged, "params/DATA_FILE")  # its name is a hash
    for key, name in (("tmp", "TMP"), ("teacher", "TEACHER"), ("cache", "CACHE")):
        text = text.replace(str(world[key]), name)
    return text


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_is_one_line_exit_2_and_changes_nothing(name, world, capsys):
    argv, expected = CASES[name], documented_messages().get(name)
    argv = [part.format(**{k: str(v) for k, v in world.items()}) for part in argv]
    watched = [world["tmp"] / "existing", world["cache"], world["tmp"] / "store",
               world["teacher"]]
    before = [_digest(directory) for directory in watched]
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (name, err)
    assert len(err) == 1, (name, err)  # nothing before the refusal: no progress, no log line
    last = _normalize(err[-1], world)
    assert last.startswith("kd-jax: error: ") or last.startswith("kd-jax "), (name, err)
    assert "Traceback" not in "\n".join(err)
    message = last.removeprefix("kd-jax: error: ")
    with open(world["tmp"] / "messages.txt", "a") as file:  # for a reader of a failure
        file.write(f"{name}\t{code}\t{message}\n")
    assert message == expected, f"{name}: docs/errors.md says {expected!r}"
    assert [_digest(directory) for directory in watched] == before, name
    assert not (world["tmp"] / "run").exists()  # the config's run directory: never written
    assert not world["marker"].exists()  # the pickle was never unpickled
