"""What a teacher with another tokenizer costs: the host's work to write each batch's teacher rows
(`kd_jax.align.rows.teacher_rows`), and the distillation step with such a teacher against the
same step with a teacher of the student's tokenizer.

    python benchmarks/cross_tokenizer.py [--quick] [--steps N] [--repeats R] [--json PATH]

The text is the standard library's source (a few MB: modules read in a fixed order). Two
byte-level BPE tokenizers are trained on its first part here: the student's (4,096 ids) and the
teacher's (8,192 ids, digits one a token, as Llama's pre-tokenizer does not and many do). The
student's rows are packed from the rest, 8 x 256 tokens a batch.

- Host: per batch, the student's rows as the data feed takes them, then the teacher's rows and
  the alignment written from them; the median of 20 batches (`--quick`: 4). Also how many of the
  student's positions align, and how many teacher tokens the same text takes; and the same
  rows with the fields `loss.cross_vocab: bytes` reads besides (`backoff`). Then the same
  made once for every row (`kd_jax.align.prepared`, what `kd-jax prepare` does on a token
  store): its time, and a batch's teacher rows read back from it.
- Step: `throughput.py`'s models (teacher 6 x 512, student 4 x 256; `--quick`: tiny) at these
  vocabularies, the fused distillation step (forward KL, T 2, 0.5 CE), once with the teacher on
  its own rows (as long as `data.teacher_seq_len: 0` makes them) through the vocabulary's
  buckets (`mapped`), once compared byte by byte (`bytes`: the teacher read at two positions a
  student position), once with a teacher of the student's vocabulary on the student's rows; each compiled
  once, medians of `--repeats` x `--steps` steps, interleaved. Results in
  `results/cross_tokenizer.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpora import byte_level_bpe, stdlib_source  # noqa: E402
from kd_jax.parallel.cpu import keep_cpu_step_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    keep_cpu_step_memory()  # as kd-jax does, before JAX starts

    import jax

    import throughput as tp
    from kd_jax.align.prepared import prepare_teacher_rows
    from kd_jax.align.rows import teacher_rows, teacher_seq_len_for
    from kd_jax.align.vocabulary import buckets, map_vocabularies
    from kd_jax.data.packing import pack
    from kd_jax.data.sources import Document
    from kd_jax.data.tokenizers import load_tokenizer
    from kd_jax.losses.cross_bytes import ByteTables
    from kd_jax.losses.cross_vocab import Buckets
    from kd_jax.models.pure import abstract_model, init_params
    from kd_jax.teacher.cross import CrossTokenizerTeacher
    from kd_jax.teacher.online import OnlineTeacher
    from kd_jax.train import step as step_lib

    batch, seq = (2, 32) if args.quick else (8, 256)
    batches = 4 if args.quick else 20
    text = stdlib_source(300_000 if args.quick else 3_000_000)
    lines = text.splitlines()
    half = len(lines) // 2
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {}
        for side, vocab, split_digits in (("student", 512 if args.quick else 4096, False),
                                          ("teacher", 768 if args.quick else 8192, True)):
            path = Path(tmp) / f"{side}.json"
            byte_level_bpe(path, lines[:half], vocab, split_digits)
            tokenizers[side] = load_tokenizer(str(path))
    student_tok, teacher_tok = tokenizers["student"], tokenizers["teacher"]
    documents = [Document(doc) for doc in "\n".join(lines[half:]).split("\n\n\n") if doc]
    data = pack(documents, student_tok, seq)
    first = np.arange(min(32, data.n_rows))
    teacher_seq = teacher_seq_len_for(data.take(first), student_tok, teacher_tok,
                                      data.document_starts(first), 4 * seq)

    # Host: the student's batch, then the teacher's rows and the alignment written from it.
    take_s, write_s, backoff_s, aligned, teacher_tokens, student_tokens = [], [], [], [], 0, 0
    rng = np.random.default_rng(0)
    for _ in range(batches):
        rows = rng.integers(0, data.n_rows, batch)
        start = time.perf_counter()
        student_batch = data.take(rows)
        middle = time.perf_counter()
        fields = teacher_rows(student_batch, student_tok, teacher_tok, teacher_seq,
                              data.document_starts(rows))
        take_s.append(middle - start)
        write_s.append(time.perf_counter() - middle)
        start = time.perf_counter()
        teacher_rows(student_batch, student_tok, teacher_tok, teacher_seq,
                     data.document_starts(rows), backoff=True)
        backoff_s.append(time.perf_counter() - start)
        real = student_batch["loss_mask"] > 0
        aligned.append(float((fields["teacher_index"] >= 0)[real].mean()))
        teacher_tokens += int((fields["teacher_segment_ids"] > 0).sum())
        student_tokens += int((student_batch["segment_ids"] > 0).sum())
    # Prepared once (as `kd-jax prepare` does on a token store): every row's teacher rows
    # written, then a batch's read back.
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prepared = prepare_teacher_rows(tmp, data, student_tok, teacher_tok, teacher_seq)
        prepare_s = time.perf_counter() - start
        read_s = []
        for _ in range(batches):
            rows = rng.integers(0, data.n_rows, batch)
            start = time.perf_counter()
            prepared.fields(rows)
            read_s.append(time.perf_counter() - start)
    host = {"take_ms": 1e3 * statistics.median(take_s),
            "teacher_rows_ms": 1e3 * statistics.median(write_s),
            "teacher_rows_backoff_ms": 1e3 * statistics.median(backoff_s),
            "aligned_fraction": statistics.median(aligned),
            "teacher_tokens_per_student_token": teacher_tokens / student_tokens,
            "prepare_rows": data.n_rows, "prepare_seconds": prepare_s,
            "prepare_student_tokens_per_second": data.n_rows * seq / prepare_s,
            "prepared_read_ms": 1e3 * statistics.median(read_s)}

    # Step: the same models, a teacher of the student's vocabulary or of its own.
    workload = tp.shrink(tp.Workload()) if args.quick else tp.Workload()
    workload = dataclasses.replace(workload, batch=batch, seq=seq)
    teacher_cfg, student_cfg, loss_cfg, opt_cfg = tp.build_configs(workload)
    student_cfg = dataclasses.replace(student_cfg, vocab_size=student_tok.vocab_size)
    own_cfg = dataclasses.replace(teacher_cfg, vocab_size=teacher_tok.vocab_size,
                                  max_seq_len=teacher_seq)
    same_cfg = dataclasses.replace(teacher_cfg, vocab_size=student_tok.vocab_size)
    vocabulary = map_vocabularies(teacher_tok.token_bytes(), student_tok.ids_by_bytes(),
                                  student_tok.vocab_size)
    bucket_set = Buckets.of(*buckets(vocabulary, teacher_tok.token_bytes(),
                                     student_tok.token_bytes()),
                            own_cfg.vocab_size, student_cfg.vocab_size)
    rows = np.arange(batch)
    student_batch = data.take(rows)
    cross_batch = dict(student_batch, **{
        key: value for key, value in teacher_rows(
            student_batch, student_tok, teacher_tok, teacher_seq,
            data.document_starts(rows), backoff=True).items() if key != "same_next"})
    tables = ByteTables.of(teacher_tok.token_bytes(), student_tok.token_bytes(),
                           own_cfg.vocab_size, student_cfg.vocab_size)
    tx, schedule = step_lib.make_optimizer(opt_cfg, 1000)
    student, _ = abstract_model(student_cfg)
    variants = {}
    for name, cfg, teacher_of, batch_arrays in (
            ("same tokenizer", same_cfg, lambda model: OnlineTeacher(model), student_batch),
            ("other tokenizer", own_cfg, lambda model: CrossTokenizerTeacher(
                model, bucket_set, "mapped", teacher_tok.vocab_size), cross_batch),
            ("other, bytes", own_cfg, lambda model: CrossTokenizerTeacher(
                model, bucket_set, "bytes", teacher_tok.vocab_size, byte_tables=tables),
             cross_batch)):
        teacher_model, _ = abstract_model(cfg)
        teacher_params = jax.jit(lambda cfg=cfg: init_params(cfg))()
        state = step_lib.init_state_on(student_cfg, tx, 0, None)
        update = jax.jit(step_lib.make_update(student, teacher_of(teacher_model), tx, schedule,
                                              loss_cfg, 1, student_tok.vocab_size),
                         donate_argnums=(0,))
        device_batch = jax.device_put(batch_arrays)
        compiled = update.lower(state, teacher_params, device_batch).compile()
        holder = {"state": state}

        def step(compiled=compiled, teacher_params=teacher_params, device_batch=device_batch,
                 holder=holder):
            holder["state"], metrics = compiled(holder["state"], teacher_params, device_batch)
            return metrics

        jax.block_until_ready(step())
        variants[name] = step
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                out = step()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.steps)
    steps = {name: statistics.median(each) for name, each in times.items()}

    print(f"student {student_tok.vocab_size:,} ids, teacher {teacher_tok.vocab_size:,} ids; "
          f"{batch} x {seq} student tokens a batch, teacher rows of {teacher_seq}; "
          f"{jax.default_backend()}")
    print(vocabulary.describe())
    print(f"host, per batch: student rows {host['take_ms']:.1f} ms, teacher rows and "
          f"alignment {host['teacher_rows_ms']:.1f} ms ({host['teacher_rows_backoff_ms']:.1f} "
          f"ms with the back-off fields); {host['aligned_fraction']:.1%} of "
          f"student positions aligned; {host['teacher_tokens_per_student_token']:.2f} teacher "
          "tokens a student token")
    print(f"prepared once: {host['prepare_rows']:,} rows in {host['prepare_seconds']:.1f} s "
          f"({host['prepare_student_tokens_per_second']:,.0f} student tokens/s); a batch's "
          f"teacher rows then read in {host['prepared_read_ms']:.2f} ms")
    for name, seconds in steps.items():
        print(f"fused step, teacher of the {name:16s} {seconds:8.4f} s  "
              f"x {seconds / steps['same tokenizer']:.2f}")
    path = args.json or Path(__file__).parent / "results" / (
        "cross_tokenizer_quick.json" if args.quick else "cross_tokenizer.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": "cross_tokenizer", "quick": args.quick, "machine": tp.machine_info(),
        "versions": tp.versions(), "batch": batch, "seq": seq, "teacher_seq": teacher_seq,
        "vocab": {"student": student_tok.vocab_size, "teacher": teacher_tok.vocab_size},
        "map": vocabulary.describe(), "host": host, "step_seconds": steps,
        "step_seconds_each": times}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
