"""`kd-jax precompute` against transformers' forward pass of the same checkpoint, tokens/s.

    python benchmarks/precompute_speed.py [--quick] [--rows N] [--repeats R] [--json PATH]

A SmolLM-135M-shaped checkpoint with random weights is made here by transformers (30 layers,
hidden 576, 9 heads, 3 key/value heads, MLP 1536, vocabulary 49,152, tied; saved as
safetensors), with a byte-level BPE tokenizer.json of 4,096 ids trained on the standard
library's source; the text is the first of its lines, about `--rows` rows of 256 tokens. Then, alternating `--repeats` times in this process:

- kd_jax: `kd_jax.train.precompute.precompute` as `kd-jax precompute` runs it (top-k targets,
  k 32, 8 x 256 tokens a teacher pass, `--rows` rows into a fresh cache), once for each
  `teacher.dtype` (float32, bfloat16, and auto, which resolves for this platform); its own
  tokens/s, which leaves out loading and compiling and includes feeding the rows and writing
  the shards;
- transformers: `model(input_ids).logits` under `torch.no_grad()`, in float32 and with the
  model cast to bfloat16, on 8 x 256 token batches, one pass after another.

Both get the same threads. Each figure is the median over the repeats, against transformers'
float32 forward pass (the checkpoint's own precision). Results in `results/precompute_speed.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpora import byte_level_bpe, stdlib_source  # noqa: E402
from kd_jax.parallel.cpu import keep_cpu_step_memory  # noqa: E402

SMOLLM = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
              tie_word_embeddings=True, head_dim=64)
BATCH, SEQ = 8, 256
DTYPES = ("float32", "bfloat16", "auto")  # kd_jax's teacher.dtype
TORCH_DTYPES = ("float32", "bfloat16")


def write_corpus(path: Path, size: int) -> Path:
    """`size` bytes of the running interpreter's standard library source."""
    path.write_text(stdlib_source(size)[:size])
    return path


def make_teacher(path: Path, corpus: Path, layers: int):
    """The checkpoint and a byte-level BPE tokenizer.json beside it; returns the tokenizer."""
    from tests.hf_checkpoints import hf_model

    # transformers' own initialization (normal, std 0.02): weights of a trained model's scale.
    hf_model("smollm", perturb=False, **{**SMOLLM, "num_hidden_layers": layers}
             ).save_pretrained(path)
    return byte_level_bpe(path / "tokenizer.json", corpus.read_text().splitlines(), 4096)


def write_rows(path: Path, corpus: Path, tokenizer, tokens: int) -> Path:
    """The first lines of `corpus` that make about `tokens` tokens: what is precomputed."""
    lines, total = [], 0
    for line in corpus.read_text().splitlines():
        lines.append(line)
        total += len(tokenizer.encode(line).ids) + 1  # and its BOS
        if total >= tokens:
            break
    path.write_text("\n".join(lines) + "\n")
    return path


def precompute_config(root: Path, teacher: Path, corpus: Path, dtype: str, rows: int, run: str):
    from kd_jax import config as config_lib

    cfg = config_lib.Config()
    cfg.teacher = config_lib.TeacherConfig(source="hf", path=str(teacher), dtype=dtype)
    cfg.data = config_lib.DataConfig(source="text", path=str(corpus), tokenizer="auto",
                                     seq_len=SEQ, heldout_fraction=0.01)
    cfg.model = config_lib.ModelConfig(vocab_size=4096, max_seq_len=SEQ)  # unused: no student
    cfg.cache = config_lib.CacheConfig(dir=str(root / f"cache_{run}"), mode="topk", k=32,
                                       batch_size=BATCH, rows_per_shard=rows)
    cfg.train = config_lib.TrainConfig(batch_size=BATCH, progress=False,
                                       run_dir=str(root / f"run_{run}"))
    config_lib.validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 16 rows, 1 repeat")
    parser.add_argument("--rows", type=int, default=64, help="rows precomputed a repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    keep_cpu_step_memory()  # as the CLI does, before JAX starts
    import jax
    import torch
    import transformers

    from benchmarks.throughput import RESULTS, machine_info, versions
    from kd_jax.teacher.loading import teacher_dtype_choice
    from kd_jax.train.precompute import precompute

    layers = 4 if args.quick else SMOLLM["num_hidden_layers"]
    rows, repeats = (16, 1) if args.quick else (args.rows, args.repeats)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="precompute_speed_"))
    corpus = write_corpus(root / "corpus.txt", 4_000_000)
    teacher = root / "teacher"
    tokenizer = make_teacher(teacher, corpus, layers)
    # 1% of the lines are held out: a little more text than `rows` rows need.
    text = write_rows(root / "rows.txt", corpus, tokenizer, int(rows * SEQ * 1.02))

    references = {dtype: transformers.AutoModelForCausalLM.from_pretrained(
        teacher, dtype=getattr(torch, dtype)).eval() for dtype in TORCH_DTYPES}
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, 4096, (BATCH, SEQ)))

    def transformers_tokens_per_second(dtype: str) -> float:
        with torch.no_grad():
            references[dtype](tokens)  # warm
            start = time.perf_counter()
            for _ in range(rows // BATCH):
                references[dtype](tokens).logits.float().numpy()
        return rows * SEQ / (time.perf_counter() - start)

    figures: dict[str, list[float]] = {
        name: [] for name in (*DTYPES, *(f"transformers {d}" for d in TORCH_DTYPES))}
    resolved = {}
    for repeat in range(repeats):
        for dtype in DTYPES:
            cfg = precompute_config(root, teacher, text, dtype, rows, f"{dtype}_{repeat}")
            resolved[dtype] = teacher_dtype_choice(cfg, jax.default_backend())
            figures[dtype].append(precompute(cfg)["tokens_per_second"])
        for dtype in TORCH_DTYPES:
            figures[f"transformers {dtype}"].append(transformers_tokens_per_second(dtype))
    median = {name: statistics.median(each) for name, each in figures.items()}
    print(f"SmolLM-135M-shaped teacher, {layers} layers, {BATCH} x {SEQ} tokens a pass, "
          f"{rows} rows, {threads} threads, median of {repeats}; {jax.default_backend()}")
    base = median["transformers float32"]
    print(f"{'':44s} {'tokens/s':>9s} {'x transformers float32':>23s}")
    for dtype in DTYPES:
        label = f"kd_jax precompute, teacher {dtype}"
        if dtype == "auto":
            label += f" ({resolved[dtype][0]})"
        print(f"{label:44s} {median[dtype]:9,.0f} {median[dtype] / base:23.2f}")
    for dtype in TORCH_DTYPES:
        value = median[f"transformers {dtype}"]
        print(f"{f'transformers forward, {dtype}':44s} {value:9,.0f} {value / base:23.2f}")
    print(f"auto: {resolved['auto'][1]}")
    path = args.json or RESULTS / f"precompute_speed{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": "precompute_speed", "quick": args.quick, "machine": machine_info(),
        "versions": dict(versions(), torch=torch.__version__,
                         transformers=transformers.__version__),
        "threads": threads, "layers": layers, "rows": rows, "batch": BATCH, "seq": SEQ,
        "repeats": repeats, "auto": {"dtype": resolved["auto"][0], "why": resolved["auto"][1]},
        "tokens_per_second": figures, "median": median,
        "ratio_to_transformers_float32": {name: value / base for name, value in median.items()}},
        indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
