"""Beyond logits on fixed data, on the demo's data: which recipe gives the best student?

    python benchmarks/distill_recipes.py OUT [--teacher RUN_DIR] [--quick]

The demo's teacher (`kd_jax.demo`: 0.85M parameters, byte-level, trained on the Python standard
library; trained into OUT/teacher unless --teacher names a finished one) and the demo's student
(75,504 parameters), 300 steps of 64 x 128 bytes for every recipe, the demo's optimizer and data
order:

- off-policy KD: forward KL on the corpus (the demo's distilled student);
- off-policy JSD: the generalized JSD (beta 0.5) on the corpus;
- on-policy JSD (GKD), lambda 0.5: half of each batch's rows keep their first 64 bytes, the
  student answers with 64 bytes sampled at temperature 1 inside the step, the teacher scores
  them (`onpolicy` section); JSD (beta 0.5) over the whole batch;
- sequence-level KD (Kim & Rush 2016): `kd-jax generate` has the teacher continue 8,192
  prompts (the first 32 bytes of training rows) with 96 bytes each, sampled at temperature 1;
  the student is trained on those responses alone, with hard labels (`kd-jax train`, loss on
  the response);
- KD + hidden states: the off-policy forward KL plus 1.0 x the cosine distance between the
  student's 2 layers' outputs, projected, and the teacher's layers 1 and 3 (TinyBERT's term).

Every student is evaluated on the same held-out bytes (every held-out row of the corpus): bits
per byte, next-byte accuracy, agreement with the teacher. Then what the students write: each
(and the teacher, for reference) continues the first 64 bytes of 512 held-out rows with 64
bytes sampled at temperature 1 (`kd-jax generate`), and the teacher scores the continuations
(`kd-jax eval` on them, the teacher's bits per byte of the continued bytes: lower is text the
teacher finds likelier). `--samples-only` runs this part alone, on the students already in OUT.
Writes OUT/recipes.json and prints the table; benchmarks/results/distill_recipes.json keeps a
copy.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from kd_jax import config as config_lib
from kd_jax.demo import recipe
from kd_jax.eval.report import format_table
from kd_jax.train.builder import load_data
from kd_jax.train.generate import generate
from kd_jax.train.loop import evaluate_checkpoint
from kd_jax.train.loop import run as run_training

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_BYTES, RESPONSE_BYTES, PROMPTS = 32, 96, 8192
SAMPLE_PROMPT_BYTES, SAMPLE_BYTES, SAMPLE_PROMPTS = 64, 64, 512


def configs(out: Path, teacher_dir: Path, quick: bool) -> dict[str, config_lib.Config]:
    """The students' configs, each its own copy of the demo's distilled student."""
    base = recipe(out, quick)["distilled"]
    base.teacher.path = str(teacher_dir)
    base.train.eval_every = 0  # one evaluation, at the end
    variants = {
        "off-policy KD (forward KL)": {},
        "off-policy JSD (beta 0.5)": {"loss.divergence": "jsd", "loss.beta": 0.5},
        "on-policy JSD, lambda 0.5": {"loss.divergence": "jsd", "loss.beta": 0.5,
                                      "onpolicy.fraction": 0.5, "onpolicy.prompt_tokens": 64,
                                      "onpolicy.max_new_tokens": 64,
                                      "onpolicy.temperature": 1.0},
        "KD + hidden states (cosine)": {"loss.hidden_weight": 1.0, "loss.hidden_kind": "cosine"},
    }
    result = {}
    for index, (name, overrides) in enumerate(variants.items()):
        cfg = copy.deepcopy(base)
        config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
        cfg.train.run_dir = str(out / f"student{index}")
        config_lib.validate(cfg)
        result[name] = cfg
    return result


def sequence_level(out: Path, teacher_dir: Path, base: config_lib.Config, quick: bool
                   ) -> tuple[config_lib.Config, dict]:
    """The teacher's responses to prompts cut from the training rows, as a JSONL file; the
    config that trains the student on them (hard labels, loss on the response)."""
    rows = load_data(base).train
    count = 64 if quick else PROMPTS
    picked = np.random.default_rng(0).choice(rows.n_rows, size=min(count, rows.n_rows),
                                             replace=False)
    tokens = rows.take(np.sort(picked))["tokens"][:, :PROMPT_BYTES]
    prompts = out / "seqkd_prompts.jsonl"
    write_prompts(prompts, tokens)
    gen = copy.deepcopy(base)
    gen.generate = config_lib.GenerateConfig(
        model="teacher", prompts=str(prompts), out=str(out / "seqkd.jsonl"),
        max_new_tokens=RESPONSE_BYTES, temperature=1.0, batch_size=256, seed=0)
    start = time.perf_counter()
    summary = generate(gen)
    summary["seconds"] = time.perf_counter() - start
    train = copy.deepcopy(base)
    train.data = config_lib.DataConfig(
        source="json", path=str(out / "seqkd.jsonl"), prompt_column="prompt",
        response_column="response", tokenizer="byte", seq_len=base.data.seq_len,
        heldout_fraction=0.02, seed=0)
    train.train.run_dir = str(out / "student_seqkd")
    config_lib.validate(train)
    return train, summary


def write_prompts(path: Path, tokens: np.ndarray) -> None:
    """A JSONL file of {"prompt": text}, one a row of byte ids."""
    with open(path, "w", encoding="utf-8") as file:
        for row in tokens:
            # A character cut at the end is dropped (a replacement character would add bytes).
            text = bytes(row.astype(np.uint8).tolist()).decode("utf-8", errors="ignore")
            file.write(json.dumps({"prompt": text}) + "\n")


def sample_quality(out: Path, base: config_lib.Config, runs: dict[str, Path],
                   quick: bool) -> dict[str, float]:
    """name -> the teacher's bits per byte of what that model writes after held-out prompts
    ("teacher": the teacher's own continuations)."""
    heldout = load_data(base).heldout
    count = min(32 if quick else SAMPLE_PROMPTS, heldout.n_rows)
    prompts = out / "sample_prompts.jsonl"
    write_prompts(prompts, heldout.take(np.arange(count))["tokens"][:, :SAMPLE_PROMPT_BYTES])
    scored = {}
    for index, (name, run_dir) in enumerate(runs.items()):
        # A copy of the run: `kd-jax eval` writes its report into the run directory.
        scratch = out / "samples" / str(index)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(run_dir, scratch)
        cfg = copy.deepcopy(base)
        cfg.train.run_dir = str(scratch)
        samples = out / "samples" / f"{index}.jsonl"
        cfg.generate = config_lib.GenerateConfig(
            model="teacher" if name == "teacher" else "student", prompts=str(prompts),
            out=str(samples), max_new_tokens=SAMPLE_BYTES, temperature=1.0, batch_size=256,
            seed=1)
        generate(cfg)
        report = evaluate_checkpoint(scratch, [
            "data.source=json", f"data.path={samples}", "data.prompt_column=prompt",
            "data.response_column=response", "data.heldout_fraction=0.99",
            "data.max_documents=0", "train.eval_sequences=0"])
        scored[name] = report["teacher"]["bits_per_byte"]
    return scored


def student_row(report: dict) -> dict:
    m = report["student"]
    return {key: m.get(key) for key in ("params", "bits_per_byte", "accuracy", "agreement",
                                         "kl", "tokens_per_second")}


def train_students(out: Path, teacher_dir: Path, students: dict[str, config_lib.Config],
                   quick: bool) -> tuple[dict, dict]:
    """The teacher's row and each student's, trained (or resumed) and evaluated."""
    teacher = student_row(run_training(recipe(out, quick)["teacher"], "train"))  # resumes
    results = {}
    for name, cfg in students.items():
        start = time.perf_counter()
        report = run_training(cfg, "distill")
        results[name] = student_row(report) | {"seconds": time.perf_counter() - start}
    base = next(iter(students.values()))
    seqkd_cfg, generated = sequence_level(out, teacher_dir, base, quick)
    start = time.perf_counter()
    run_training(seqkd_cfg, "train")
    # Evaluated on the corpus's held-out rows, as the others are (not the responses' own).
    corpus = base.data
    report = evaluate_checkpoint(seqkd_cfg.train.run_dir, [
        f"data.source={corpus.source}", "data.path=", "data.prompt_column=",
        "data.response_column=", f"data.heldout_fraction={corpus.heldout_fraction}",
        f"data.max_documents={corpus.max_documents}"])
    results["sequence-level KD"] = student_row(report) | {
        "seconds": time.perf_counter() - start, "generation": generated}

    return teacher, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--teacher", type=Path, help="a finished demo teacher run directory")
    parser.add_argument("--quick", action="store_true", help="a few steps of each (a smoke test)")
    parser.add_argument("--samples-only", action="store_true",
                        help="score the samples of the students already in OUT (recipes.json)")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher"
    if args.teacher and not teacher_dir.exists():
        shutil.copytree(args.teacher, teacher_dir)

    students = configs(out, teacher_dir, args.quick)
    base = next(iter(students.values()))
    if args.samples_only:
        summary = json.loads((out / "recipes.json").read_text())
        teacher, results = summary["teacher"], summary["students"]
    else:
        teacher, results = train_students(out, teacher_dir, students, args.quick)
    runs = {"teacher": base.train.run_dir}  # its copy names the teacher, which generates
    runs.update({name: cfg.train.run_dir for name, cfg in students.items()})
    runs["sequence-level KD"] = str(out / "student_seqkd")
    scored = sample_quality(out, base, {k: Path(v) for k, v in runs.items()}, args.quick)
    teacher["teacher_bits_per_byte_on_samples"] = scored.pop("teacher")
    for name, value in scored.items():
        results[name]["teacher_bits_per_byte_on_samples"] = value

    rows = [["teacher", teacher["params"], teacher["bits_per_byte"], teacher["accuracy"], None,
             teacher["teacher_bits_per_byte_on_samples"]]]
    rows += [[name, r["params"], r["bits_per_byte"], r["accuracy"], r["agreement"],
              r["teacher_bits_per_byte_on_samples"]] for name, r in results.items()]
    table = format_table(["model", "params", "held-out bits/byte", "next-byte acc",
                          "agreement", "teacher bits/byte of its samples"], rows)
    print(table)
    summary = {"teacher": teacher, "students": results, "steps": base.train.steps,
               "batch": base.train.batch_size, "seq_len": base.data.seq_len,
               "quick": args.quick}
    (out / "recipes.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(out / "recipes.json", RESULTS / "distill_recipes.json")
    print(f"wrote {out / 'recipes.json'}")


if __name__ == "__main__":
    sys.exit(main())
