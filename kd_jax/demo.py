"""`kd-jax demo`: the whole story of distillation on two CPU cores, with no download.

The data is the Python standard library's own source code (the running interpreter's `.py`
files, without test folders or site-packages), split into training and held-out files, read
byte by byte. Three runs share the data order, the schedule and the number of steps:

1. a teacher LM trained on hard labels;
2. a student with about a tenth of the teacher's parameters, distilled from it;
3. the same student trained on hard labels only (the baseline).

The table compares them on held-out bytes, with `xz -9` (Python's lzma) on the same held-out
text as a reference line; report.png and report.md (`kd_jax.compare`) show the students'
curves against the teacher and the retention table. Runs resume: rerunning the demo in the same
directory finishes it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import lzma
from pathlib import Path
from typing import Any

from kd_jax import config as config_lib
from kd_jax.compare import compare_runs
from kd_jax.eval.evaluate import heldout_bytes
from kd_jax.eval.report import format_table
from kd_jax.train.run_data import load_data
from kd_jax.train.loop import run as run_training

# Byte-level vocabulary of 256; 64 sequences of 128 bytes a step (8,192 bytes).
SEQ_LEN = 128
BATCH = 64
TEACHER_STEPS = 400  # 3.3M bytes
STUDENT_STEPS = 300  # 2.5M bytes, for the distilled and the baseline student alike


def recipe(out: Path, quick: bool = False) -> dict[str, config_lib.Config]:
    """The three configs of the demo (configs/stdlib_*.yaml are the same recipe as files)."""
    base = config_lib.Config()
    base.data = config_lib.DataConfig(source="stdlib", tokenizer="byte", seq_len=SEQ_LEN,
                                      heldout_fraction=0.05, seed=0)
    base.train = config_lib.TrainConfig(
        batch_size=BATCH, log_every=10, eval_sequences=0, checkpoint_every=100,
        keep_checkpoints=1, seed=0)
    base.optimizer = config_lib.OptimizerConfig(lr=3e-3, warmup_steps=20, schedule="cosine",
                                                min_lr_ratio=0.1, weight_decay=0.01)

    # 4 x (attention 2*128*128 + 2*128*64, MLP 3*128*384) + 2 x 256*128 = 0.85M parameters.
    teacher = dataclasses.replace(
        base, model=config_lib.ModelConfig(
            vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
            # remat: ~20% faster here (less memory traffic)
            max_seq_len=SEQ_LEN, seed=1, remat="full"),
        train=dataclasses.replace(base.train, run_dir=str(out / "teacher"), steps=TEACHER_STEPS))
    # 2 x (attention 2*48*48 + 2*48*24, MLP 3*48*128) + 2 x 256*48 = 0.075M: 1/11 of the teacher.
    student_model = config_lib.ModelConfig(
        vocab_size=256, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=SEQ_LEN, seed=2)
    teacher_source = config_lib.TeacherConfig(source="checkpoint", path=str(out / "teacher"))
    # A held-out point halfway for report.png's curves: one more evaluation of each student
    # (all held-out rows, and the teacher for agreement: ~20 s on 2 CPU cores).
    student_train = dataclasses.replace(base.train, steps=STUDENT_STEPS,
                                        eval_every=STUDENT_STEPS // 2)
    distilled = dataclasses.replace(
        base, model=student_model, teacher=teacher_source,
        loss=config_lib.LossConfig(divergence="forward_kl", temperature=1.0, kd_weight=1.0,
                                   ce_weight=0.0),
        train=dataclasses.replace(student_train, run_dir=str(out / "distilled")))
    # The baseline names the teacher too, only so that its evaluation reports agreement with it.
    baseline = dataclasses.replace(
        base, model=student_model, teacher=teacher_source,
        train=dataclasses.replace(student_train, run_dir=str(out / "baseline")))
    # No two configs share a section object: each run owns its config.
    configs = {name: copy.deepcopy(cfg) for name, cfg in
               (("teacher", teacher), ("distilled", distilled), ("baseline", baseline))}
    if quick:
        for cfg in configs.values():
            cfg.train.steps, cfg.train.eval_sequences, cfg.data.max_documents = 6, 16, 40
            cfg.train.log_every, cfg.optimizer.warmup_steps = 2, 2
            cfg.train.eval_every = 3 if cfg.train.eval_every else 0
    for cfg in configs.values():
        config_lib.validate(cfg)
    return configs


def xz_bits_per_byte(text: bytes) -> float:
    """The held-out text's size under `xz -9` (lzma preset 9), in bits per byte."""
    return 8.0 * len(lzma.compress(text, preset=9)) / len(text)


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    configs = recipe(out, quick)
    reports = {
        "teacher": run_training(configs["teacher"], "train"),
        "distilled": run_training(configs["distilled"], "distill"),
        "baseline": run_training(configs["baseline"], "train"),
    }
    heldout = load_data(configs["teacher"]).heldout
    xz = xz_bits_per_byte(heldout_bytes(heldout, configs["teacher"].train.eval_sequences))

    teacher_accuracy = reports["teacher"]["student"]["accuracy"]
    summary: dict[str, Any] = {}
    for name, report in reports.items():
        m = report["student"]
        summary[name] = {
            "params": m["params"],
            "bits_per_byte": m["bits_per_byte"],
            "accuracy": m["accuracy"],
            "agreement": m.get("agreement"),
            "kl": m.get("kl"),
            "ece": m["ece"],
            "tokens_per_second": m["tokens_per_second"],
            "retention": m["accuracy"] / teacher_accuracy,
            "run_dir": report["run_dir"],
        }
    summary["xz"] = {"bits_per_byte": xz}

    rows = [[name, s["params"], s["bits_per_byte"], s["accuracy"], s["agreement"],
             s["tokens_per_second"], s["retention"]]
            for name, s in summary.items() if name in reports]
    rows.append(["xz -9", None, xz, None, None, None, None])
    table = format_table(["model", "params", "bits/byte", "next-byte acc", "agreement",
                          "train tok/s", "retention"], rows)
    print(table)
    verdict = summary["baseline"]["bits_per_byte"] - summary["distilled"]["bits_per_byte"]
    print(f"distillation gain over hard labels: {verdict:+.4f} bits/byte")
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    png, md = compare_runs([Path(report["run_dir"]) for report in reports.values()], out)
    print(f"wrote {out / 'report.json'}, {png} and {md}")
    return summary
