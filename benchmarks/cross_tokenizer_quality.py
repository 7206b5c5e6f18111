"""Does a teacher with another tokenizer help? The demo's byte-level teacher into BPE students.

    python benchmarks/cross_tokenizer_quality.py OUT [--teacher RUN_DIR] [--seeds 0,1] [--quick]

The demo's teacher (`kd_jax.demo`: 0.85M parameters, byte-level, trained on the Python standard
library; trained into OUT/teacher unless --teacher names a finished one). The students have the
demo student's shape (d 48, 2 layers) but a tokenizer of their own: a byte-level BPE of 512 ids
trained here on the demo's training documents, rows of 64 tokens (about as many bytes as the
teacher's 128-byte rows), the demo's optimizer, batch and steps. For each seed (the student's
initialization and data order):

- hard labels: the BPE student trained on the corpus alone;
- cross-tokenizer KD: distilled from the byte-level teacher through the vocabulary's buckets
  (`loss.cross_vocab: mapped`, forward KL at T 1, kd_weight 1 and ce_weight 1: a position with
  no aligned teacher position learns from its label);
- ULD (first seed only): the same with `loss.cross_vocab: uld`.

Every student is evaluated on the same held-out documents in bits per byte (comparable across
tokenizers). Writes OUT/cross_quality.json and prints the table; a full run keeps a copy in
benchmarks/results/cross_tokenizer_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpora import byte_level_bpe  # noqa: E402
from kd_jax import config as config_lib  # noqa: E402
from kd_jax.data.sources import load_documents  # noqa: E402
from kd_jax.demo import recipe  # noqa: E402
from kd_jax.eval.report import format_table  # noqa: E402
from kd_jax.train.loop import run as run_training  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, SEQ_TOKENS, BPE_TRAINING_BYTES = 512, 64, 2_000_000


def train_tokenizer(path: Path, cfg: config_lib.Config) -> Path:
    """A byte-level BPE of VOCAB ids on the first BPE_TRAINING_BYTES of the training documents."""
    train_docs, _ = load_documents(cfg.data)
    texts, size = [], 0
    for doc in train_docs:
        texts.append(doc.text)
        size += len(doc.text)
        if size >= BPE_TRAINING_BYTES:
            break
    byte_level_bpe(path, texts, VOCAB)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--teacher", type=Path, help="a finished demo teacher run directory")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--quick", action="store_true", help="a few steps of each (a smoke test)")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher"
    if args.teacher and not teacher_dir.exists():
        shutil.copytree(args.teacher, teacher_dir)
    configs = recipe(out, args.quick)
    teacher_report = run_training(configs["teacher"], "train")  # resumes a finished one

    base = copy.deepcopy(configs["distilled"])
    tokenizer = train_tokenizer(out / "student_tokenizer.json", base)
    base.data.tokenizer = str(tokenizer)
    base.data.seq_len = SEQ_TOKENS
    base.model.vocab_size = VOCAB
    base.model.max_seq_len = SEQ_TOKENS
    base.train.eval_every = 0
    base.loss = config_lib.LossConfig(divergence="forward_kl", temperature=1.0, kd_weight=1.0,
                                      ce_weight=1.0)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    variants = []
    for seed in seeds:
        variants.append((f"hard labels, seed {seed}", "train", seed, {}))
        variants.append((f"cross-tokenizer KD (mapped), seed {seed}", "distill", seed,
                         {"loss.cross_vocab": "mapped"}))
    variants.append((f"cross-tokenizer ULD, seed {seeds[0]}", "distill", seeds[0],
                     {"loss.cross_vocab": "uld"}))
    results = {}
    for index, (name, mode, seed, overrides) in enumerate(variants):
        cfg = copy.deepcopy(base)
        config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
        cfg.model.seed, cfg.train.seed = 2 + seed, seed
        if mode == "train":
            cfg.loss = config_lib.LossConfig()
        cfg.train.run_dir = str(out / f"student{index}")
        config_lib.validate(cfg)
        start = time.perf_counter()
        report = run_training(cfg, mode)
        student = report["student"]
        results[name] = {"bits_per_byte": student["bits_per_byte"], "params": student["params"],
                         "seconds": time.perf_counter() - start, "seed": seed, "mode": mode}

    def spread(prefix: str) -> list[float]:
        return [r["bits_per_byte"] for name, r in results.items() if name.startswith(prefix)]

    hard, mapped = spread("hard labels"), spread("cross-tokenizer KD")
    rows = [["teacher (byte-level)", teacher_report["student"]["params"],
             teacher_report["student"]["bits_per_byte"]]]
    rows += [[name, r["params"], r["bits_per_byte"]] for name, r in results.items()]
    print(format_table(["model", "params", "held-out bits/byte"], rows))
    summary = {"teacher": teacher_report["student"]["bits_per_byte"], "students": results,
               "hard_labels": {"mean": statistics.fmean(hard), "spread": max(hard) - min(hard)},
               "mapped": {"mean": statistics.fmean(mapped),
                          "spread": max(mapped) - min(mapped)},
               "steps": base.train.steps, "batch": base.train.batch_size,
               "seq_tokens": SEQ_TOKENS, "vocab": VOCAB, "quick": args.quick}
    print(f"hard labels {summary['hard_labels']['mean']:.4f} (spread "
          f"{summary['hard_labels']['spread']:.4f}); cross-tokenizer KD "
          f"{summary['mapped']['mean']:.4f} (spread {summary['mapped']['spread']:.4f})")
    (out / "cross_quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(out / "cross_quality.json", RESULTS / "cross_tokenizer_quality.json")
    print(f"wrote {out / 'cross_quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
