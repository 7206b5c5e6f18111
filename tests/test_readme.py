"""Every command in the README's ```bash blocks runs as written, at tiny sizes.

Not rerun here: the set-up lines (`pip install -e '.[test]' && ...`), which install the project,
run the demo (`tests/test_cli.py` runs `kd-jax demo --quick`) and run this suite; `.ci/run` runs
the test command on a fresh machine. `hf download REPO --local-dir DIR` is stood in for by a tiny
checkpoint of the same family that transformers writes into DIR, with a tokenizer trained on the
test's text (nothing reaches the network: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).

Every `kd-jax` line runs as written, in order, through the CLI's entry point in a subprocess
(`kd_jax.cli.main`, one process for consecutive lines, XLA's backend optimizations off), in a
temporary directory holding a copy of `configs/` and a folder `my_texts/` of text files, with
overrides appended that make its models, data and steps tiny (a later override wins). A README
line of any other command, or naming a config this test has no tiny sizes for, fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST_COMPILE, write_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = "pip install"  # the set-up lines: installation and the test suite

SCRATCH_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.d_ff=64", "model.max_seq_len=64"]
TINY_RUN = ["data.seq_len=32", "train.steps=2", "train.batch_size=4", "train.log_every=1",
            "train.eval_every=0", "train.eval_sequences=4", "train.checkpoint_every=2",
            "train.progress=false", "optimizer.warmup_steps=1"]
STDLIB = ["data.max_documents=4", "model.remat=none", "cache.batch_size=64"]
# A config the README names -> the overrides that make its run tiny.
TINY = {
    "stdlib_teacher.yaml": SCRATCH_MODEL + STDLIB + TINY_RUN,
    "stdlib_distill.yaml": SCRATCH_MODEL + STDLIB + TINY_RUN,
    "generate_stdlib.yaml": ["generate.max_new_tokens=8"],
    "quickstart.yaml": ["model.init_layers=[0,1]", *TINY_RUN],
    # Planned with the quickstart's tiny checkpoint in place of the published shapes.
    "qwen2.5-7b_to_qwen2.5-0.5b.yaml": ["teacher.path=checkpoints/SmolLM2-135M",
                                        "model.path=checkpoints/SmolLM2-135M",
                                        "data.seq_len=32", "train.batch_size=8",
                                        "train.microbatches=1"],
}


def readme_commands() -> list[str]:
    """The lines of the README's ```bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def hf_download_stand_in(words: list[str], workdir: Path) -> None:
    """`hf download REPO --local-dir DIR`: a tiny Llama-family checkpoint (SmolLM's layout: tied
    head) with a tokenizer.json, written into DIR."""
    from tests.helpers import write_tokenizer
    from tests.hf_checkpoints import make_checkpoint, with_tokenizer

    assert words[:2] == ["hf", "download"] and "--local-dir" in words, words
    local_dir = workdir / words[words.index("--local-dir") + 1]
    tokenizer = write_tokenizer(workdir / "tokenizer.json",
                                workdir / "my_texts" / "train" / "a.txt")
    with_tokenizer(make_checkpoint(local_dir, "smollm", vocab_size=224), tokenizer)


def tiny(words: list[str]) -> list[str]:
    """The kd-jax arguments of a README line, with the overrides that make it tiny."""
    configs = [word for word in words if word.endswith(".yaml")]
    if not configs:  # eval, export, report, cache verify: a run or cache made above
        return words[1:]
    name = Path(configs[0]).name
    assert name in TINY, f"README's `{shlex.join(words)}`: no tiny sizes for {name} in this test"
    return [*words[1:], *TINY[name]]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    texts = tmp_path / "my_texts"
    for folder in ("train", "validation"):
        (texts / folder).mkdir(parents=True)
    corpus = write_corpus(tmp_path / "corpus.txt").read_text().splitlines()
    for i, name in enumerate(("train/a.txt", "train/b.txt", "validation/c.txt")):
        (texts / name).write_text("\n".join(corpus[i::3]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def test_readme_is_at_most_15_kb():
    assert README.stat().st_size <= 15 * 1024, f"README.md is {README.stat().st_size:,} bytes"


# Runs kd-jax command lines (a JSON list of argument lists) one after another in one process.
DRIVER = """
import json, sys
from kd_jax import cli
for argv in json.loads(sys.argv[1]):
    print("$ kd-jax", *argv, flush=True)
    if cli.main(argv) != 0:
        sys.exit(f"README's `kd-jax {' '.join(argv)}` failed")
"""


def run_kd_jax(lines: list[list[str]], workdir: Path) -> str:
    flags = " ".join(f"--{name}={value}" for name, value in FAST_COMPILE.items())
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(lines)], cwd=workdir,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_every_readme_command_runs_as_written(workdir):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

    pending, ran, outputs = [], [], []
    for line in readme_commands():
        words = shlex.split(line)
        if line.startswith(SETUP):
            continue
        if words[0] == "kd-jax" and words[1] != "plan":
            pending.append(tiny(words))  # run with the next lines of kd-jax
        else:
            if pending:
                outputs.append(run_kd_jax(pending, workdir))
                pending = []
            if words[0] == "hf":
                hf_download_stand_in(words, workdir)
            elif words[0] == "kd-jax":  # plan: placeholder devices, a fresh JAX of its own
                outputs.append(run_kd_jax([tiny(words)], workdir))
                assert "fits" in outputs[-1], outputs[-1]
            else:
                pytest.fail(f"README's `{line}`: a command this test does not know how to run")
        ran.append(words[1] if words[0] == "kd-jax" else words[0])
    if pending:
        outputs.append(run_kd_jax(pending, workdir))
    # The quickstart and every command the README lists ran.
    assert {"hf", "train", "distill", "eval", "export", "report", "generate", "prepare",
            "precompute", "cache", "plan"} <= set(ran), ran
    # The quickstart ends with a report of student and teacher on the validation files, and an
    # export that transformers loads and runs.
    report = json.loads((workdir / "runs" / "quickstart" / "report.json").read_text())
    assert {"student", "teacher"} <= set(report), sorted(report)
    from kd_jax.run_dir import read_run

    assert read_run(workdir / "runs" / "quickstart")[0].data.heldout_path == \
        "my_texts/validation/*.txt"
    import torch
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(
        workdir / "exported" / "my_student")
    with torch.no_grad():
        logits = exported(torch.arange(1, 9)[None]).logits
    assert logits.shape == (1, 8, exported.config.vocab_size) and torch.isfinite(logits).all()
    assert (workdir / "runs" / "stdlib_generated.jsonl").exists()
    assert (workdir / "runs" / "report.png").exists()
