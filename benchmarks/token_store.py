"""The token store: a corpus tokenized once, and what a run then pays for the corpus's size.

    python benchmarks/token_store.py [--quick] [--work DIR] [--repeats N]

Everything is generated under --work (default /tmp/kd_jax_token_store), never in the repository:

0. Corpora: JSONL documents of about 3 KB ({"text": ...}) from a seeded generator (8,000
   made-up words of 1 to 4 syllables, drawn with Zipf-like frequencies, in sentences and
   paragraphs), 10 MiB and 1 GiB (--quick: 50 MiB); the smaller is a prefix of the larger. A
   byte-level BPE tokenizer.json (`tokenizers`, vocabulary 8,192) is trained on the first 20 MiB.
1. Prepare: `kd-jax prepare` of each corpus with each tokenizer (rows of 256 tokens), timed as a
   subprocess, with its peak resident memory (ru_maxrss, which counts the pages of the
   memory-mapped shards read back for hashing) and its peak anonymous memory (RssAnon, polled);
   then again on the same store, which must answer "already prepared". A byte store of rows of
   4,096 tokens of the large corpus too, for part 3.
2. Start-up: `kd-jax distill` with train.steps=1 (a tiny teacher trained first with `kd-jax
   train` on the small store, 3 steps; a small student; batch 16; 16 held-out rows evaluated at
   the end; one checkpoint) on the small and on the large store, alternating, --repeats times
   each (5; --quick: 2). Measured per run: the wall time from launch to the first step's line in
   metrics.jsonl (polled every 10 ms: imports, build, compile, the first step and its host
   sync), the wall time to exit (the rest adds the evaluation and the checkpoint), and the
   child's peak resident memory (ru_maxrss from os.wait4 on that child alone; and RssAnon,
   polled). The best of the repeats is kept, and the median. Then the part of start-up that
   depends on the data, alone in a fresh process per store: the store opened, the first batch
   (the epoch's permutation), one held-out batch, and the memory they add.
3. Reader: `StoreRows.take` of 16 random rows a batch, in this process, warm page cache (the
   stores were just written), against the tokens a second the distill step consumes at the same
   sizes: the demo's teacher (d128 x 4 layers) and student (d48 x 2 layers), batch 16, byte
   tokens, rows of 256 and 4,096 tokens; the step's rate is the median of steps 2.. of a
   `kd-jax distill` run with train.log_every=1 (metrics.jsonl).
4. Formats: the small byte store's training rows also written as a Hugging Face `datasets`
   Arrow dataset (save_to_disk; one row per packed sequence; tokens, labels, segment_ids and
   loss_mask as fixed-length int32 lists) and as plain int32 .npy files of the same four arrays;
   each opened in a fresh process: open time, resident memory added by opening, random batches
   of 16 rows read, bytes on disk per token.

Writes benchmarks/results/token_store.json (--quick: token_store_quick.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1 << 20
SEED = 0
SEQ_LEN = 256
LONG_SEQ_LEN = 4096
BATCH = 16
BPE_VOCAB = 8192
BPE_TRAIN_BYTES = 20 * MiB
GENERATOR = "kd_jax.benchmarks.token_store/1"  # bump when the generated text changes

# --- the corpus -------------------------------------------------------------------------------

SYLLABLES = ("ka ri to na me lo su pe ta mi no ru se ki ha ya mo ne shi chi tsu fu wa ban dor "
             "el fin gar hel ist jor kel lan mar nor oth par quin rad sel tor ush val wen xer "
             "yor zan ae io ou str th ch ph").split()
N_WORDS = 8000
# How a word is written where it stands: inside a sentence, first, before a comma, last in a
# sentence, last in a paragraph (an escaped JSON newline pair), last in the document.
FORMS = ("{} ", "{} ", "{}, ", "{}. ", "{}.\\n\\n", "{}.")
INSIDE, FIRST, COMMA, SENTENCE_END, PARAGRAPH_END, DOCUMENT_END = range(len(FORMS))


def word_list() -> list[str]:
    """N_WORDS distinct made-up words, shortest first: the most frequent words are short."""
    rng = np.random.default_rng([SEED, 1])
    words, seen = [], set()
    while len(words) < N_WORDS:
        syllables = rng.integers(0, len(SYLLABLES), int(rng.integers(1, 5)))
        word = "".join(SYLLABLES[i] for i in syllables)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return sorted(words, key=lambda word: (len(word), word))


class Pieces:
    """Every written form of every word, and the JSONL line's head and tail, as one byte buffer:
    a document is a sequence of piece ids, and its bytes one gather."""

    def __init__(self):
        words = word_list()
        texts = [form.format(word.capitalize() if n == FIRST else word)
                 for word in words for n, form in enumerate(FORMS)]
        self.line_start, self.line_end = len(texts), len(texts) + 1
        texts += ['{"text": "', '"}\n']
        encoded = [text.encode("ascii") for text in texts]
        self.lengths = np.array([len(piece) for piece in encoded], dtype=np.int64)
        self.offsets = np.cumsum(self.lengths) - self.lengths
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        rank = np.arange(1, N_WORDS + 1, dtype=np.float64)
        weights = 1.0 / (rank + 2.7) ** 1.07  # Zipf-Mandelbrot, as word frequencies go
        self.cdf = np.cumsum(weights) / weights.sum()

    def gather(self, pieces: np.ndarray) -> np.ndarray:
        lengths = self.lengths[pieces]
        ends = np.cumsum(lengths)
        start_of_each = np.repeat(self.offsets[pieces] - (ends - lengths), lengths)
        return self.buffer[start_of_each + np.arange(ends[-1])]


def document_chunks(pieces: Pieces, rng: np.random.Generator, documents: int = 1000):
    """Chunks of JSONL lines (bytes) and each line's length, endlessly, from `rng`."""
    while True:
        paragraphs = rng.integers(3, 13, documents)
        sentences = rng.integers(3, 9, paragraphs.sum())
        words = rng.integers(5, 21, sentences.sum())
        n_words = int(words.sum())
        ids = np.minimum(np.searchsorted(pieces.cdf, rng.random(n_words)), N_WORDS - 1)
        form = np.where(rng.random(n_words) < 0.06, COMMA, INSIDE)
        sentence_ends = np.cumsum(words) - 1
        form[sentence_ends - words + 1] = FIRST
        form[sentence_ends] = SENTENCE_END
        paragraph_ends = sentence_ends[np.cumsum(sentences) - 1]
        form[paragraph_ends] = PARAGRAPH_END
        document_ends = paragraph_ends[np.cumsum(paragraphs) - 1]
        form[document_ends] = DOCUMENT_END
        stream = ids * len(FORMS) + form
        # Each document between its line's head and tail: word j of document d moves 2d + 1 on.
        words_per_document = np.diff(np.concatenate([[-1], document_ends]))
        document = np.repeat(np.arange(documents), words_per_document)
        line = np.empty(n_words + 2 * documents, dtype=np.int64)
        line[np.arange(n_words) + 2 * document + 1] = stream
        line[document_ends - words_per_document + 1 + 2 * np.arange(documents)] = \
            pieces.line_start
        line[document_ends + 2 * np.arange(documents) + 2] = pieces.line_end
        text = pieces.gather(line)
        line_ends = np.flatnonzero(text == ord("\n")) + 1
        yield text, np.diff(np.concatenate([[0], line_ends]))


def write_corpus(path: Path, target_bytes: int) -> dict:
    """The first documents of the generator's stream, until they reach `target_bytes`."""
    info_path = path.with_suffix(".info.json")
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("generator") == GENERATOR and info.get("target_bytes") == target_bytes:
            return info
    started = time.perf_counter()
    written, documents = 0, 0
    digest = hashlib.sha256()
    with open(path.with_name(path.name + ".partial"), "wb") as out:
        for text, line_lengths in document_chunks(Pieces(), np.random.default_rng(SEED)):
            ends = np.cumsum(line_lengths)
            keep = min(len(ends), int(np.searchsorted(ends, target_bytes - written)) + 1)
            data = text[: ends[keep - 1]].tobytes()
            out.write(data)
            digest.update(data)
            written += len(data)
            documents += keep
            if written >= target_bytes:
                break
    os.replace(path.with_name(path.name + ".partial"), path)
    info = {"generator": GENERATOR, "target_bytes": target_bytes, "bytes": written,
            "documents": documents, "sha256": digest.hexdigest(),
            "seconds": round(time.perf_counter() - started, 2)}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def texts_of(path: Path, limit_bytes: int):
    """The documents' texts of the first `limit_bytes` of a JSONL corpus."""
    read = 0
    with open(path, "rb") as lines:
        for line in lines:
            read += len(line)
            yield json.loads(line)["text"]
            if read >= limit_bytes:
                return


def train_bpe(corpus: Path, out: Path) -> dict:
    """A byte-level BPE tokenizer.json of BPE_VOCAB ids, from the corpus's first 20 MiB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = out / "tokenizer.json"
    if not path.is_file():
        started = time.perf_counter()
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator(texts_of(corpus, BPE_TRAIN_BYTES), trainer)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path.with_name(path.name + ".partial")))
        os.replace(path.with_name(path.name + ".partial"), path)
        (out / "trained.json").write_text(json.dumps(
            {"seconds": round(time.perf_counter() - started, 2)}) + "\n")
    from tokenizers import Tokenizer

    return {"path": str(path), "vocab_size": Tokenizer.from_file(str(path)).get_vocab_size(),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "train_seconds": json.loads((out / "trained.json").read_text())["seconds"]}


# --- running kd-jax ---------------------------------------------------------------------------

KD_JAX = ([str(Path(sys.executable).with_name("kd-jax"))]
          if Path(sys.executable).with_name("kd-jax").is_file()
          else [sys.executable, "-m", "kd_jax.cli"])


def resident_mib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, RssAnon (the process's own memory) and RssFile (mapped files' pages, which the
    kernel can drop) of a process, MiB; {} where /proc does not say."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon", "RssFile")
            if key in fields}


def kd_jax(args: list[str], log: Path, first_file: Path | None = None) -> dict:
    """`kd-jax ARGS` as a child process: wall time, the time `first_file` first exists, and the
    child's own peak resident memory (os.wait4's rusage of that pid: ru_maxrss, which counts the
    pages of memory-mapped files too), and the peak of its anonymous memory (RssAnon), both
    polled every 10 ms."""
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([*KD_JAX, *args], stdout=out, stderr=subprocess.STDOUT,
                                 cwd=log.parent)
    first, load, anon = None, os.getloadavg()[0], 0.0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if first is None and first_file is not None and first_file.exists():
            first = time.perf_counter() - started
        anon = max(anon, resident_mib(child.pid).get("RssAnon", 0.0))
        time.sleep(0.01)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"kd-jax {' '.join(args)} exited {child.returncode}:\n{tail}")
    return {"wall_s": wall, "first_step_s": first, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_anon_mib": anon, "load_average_1min": [load, os.getloadavg()[0]],
            "output": log.read_text()}


def yaml_config(path: Path, sections: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def data_section(corpus: Path, tokenizer: str, store: Path, seq_len: int = SEQ_LEN) -> dict:
    return {"source": "json", "path": str(corpus), "text_column": "text",
            "tokenizer": tokenizer, "seq_len": seq_len, "store": str(store)}


def train_section(run_dir: Path, steps: int, batch: int = BATCH, log_every: int = 1) -> dict:
    return {"run_dir": str(run_dir), "steps": steps, "batch_size": batch,
            "log_every": log_every, "eval_sequences": BATCH, "checkpoint_every": 1000,
            "keep_checkpoints": 1, "progress": False}


def model(vocab: int, d: int, layers: int, d_ff: int, max_seq_len: int, seed: int,
          remat: str = "none") -> dict:
    return {"vocab_size": vocab, "d_model": d, "n_layers": layers, "n_heads": 4,
            "n_kv_heads": 2, "d_ff": d_ff, "max_seq_len": max_seq_len, "remat": remat,
            "seed": seed}


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


# --- 1. prepare -------------------------------------------------------------------------------

def prepare(work: Path, name: str, corpus: Path, tokenizer: str, seq_len: int,
            reuse: bool) -> dict:
    store = work / "stores" / name
    if store.exists() and not reuse:
        shutil.rmtree(store)
    config = yaml_config(work / "configs" / f"prepare_{name}.yaml", {
        "model": {"max_seq_len": seq_len}, "data": data_section(corpus, tokenizer, store, seq_len),
        "train": {"progress": False}})
    first = kd_jax(["prepare", str(config)], work / "logs" / f"prepare_{name}.log")
    again = kd_jax(["prepare", str(config)], work / "logs" / f"prepare_{name}_again.log")
    manifest = json.loads((store / "manifest.json").read_text())
    reported = re.search(r"prepared in ([0-9.]+) s", first["output"])
    return {"store": name, "path": str(store), "seq_len": seq_len,
            "prepared_now": "already prepared" not in first["output"],
            "wall_s": first["wall_s"], "prepare_s": float(reported.group(1)) if reported else None,
            "peak_rss_mib": first["peak_rss_mib"], "peak_anon_mib": first["peak_anon_mib"],
            "store_bytes": directory_bytes(store),
            "documents": manifest["documents"], "tokens": manifest["tokens"],
            "train_rows": manifest["splits"]["train"]["rows"],
            "tokens_per_second": manifest["tokens"] / first["wall_s"],
            "again_wall_s": again["wall_s"],
            "again_already_prepared": "already prepared" in again["output"],
            "again_output": again["output"].strip().splitlines()[-1]}


def prepare_table(rows: list[dict]) -> str:
    lines = ["| store | seq | documents | tokens | prepare s (wall) | tokens/s | store MB | "
             "B/token | peak RSS MiB | peak anon MiB | again s | again says |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['seq_len']} | {r['documents']:,} | {r['tokens']:,} | "
            f"{r['wall_s']:.1f} | {r['tokens_per_second']:,.0f} | {r['store_bytes'] / 1e6:,.1f} | "
            f"{r['store_bytes'] / r['tokens']:.3f} | {r['peak_rss_mib']:,.0f} | "
            f"{r['peak_anon_mib']:,.0f} | {r['again_wall_s']:.2f} | "
            f"{'already prepared' if r['again_already_prepared'] else 'PREPARED AGAIN'} |")
    return "\n".join(lines)


# --- 2. start-up ------------------------------------------------------------------------------

STARTUP_MEASURES = ("first_step_s", "wall_s", "peak_rss_mib", "peak_anon_mib")

def train_teacher(work: Path, name: str, data: dict, model_section: dict, steps: int,
                  batch: int) -> Path:
    run_dir = work / "runs" / name
    if (run_dir / "report.json").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    config = yaml_config(work / "configs" / f"{name}.yaml", {
        "model": model_section, "data": data, "optimizer": {"warmup_steps": 0},
        "train": train_section(run_dir, steps, batch)})
    kd_jax(["train", str(config)], work / "logs" / f"{name}.log")
    return run_dir


def distill(work: Path, name: str, teacher: Path, data: dict, student: dict, steps: int,
            batch: int = BATCH) -> dict:
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory left over would resume
    config = yaml_config(work / "configs" / f"{name}.yaml", {
        "model": student, "teacher": {"source": "checkpoint", "path": str(teacher)},
        "data": data, "optimizer": {"warmup_steps": 0},
        "train": train_section(run_dir, steps, batch)})
    result = kd_jax(["distill", str(config)], work / "logs" / f"{name}.log",
                    first_file=run_dir / "metrics.jsonl")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result["step_tokens_per_second"] = [m["tokens_per_second"] for m in metrics
                                        if "tokens_per_second" in m]
    return result


def startup(work: Path, tokenizers: dict, corpora: dict, repeats: int) -> list[dict]:
    runs = {}
    teachers = {}
    for tok, (spec, vocab) in tokenizers.items():
        teachers[tok] = train_teacher(
            work, f"tiny_teacher_{tok}",
            data_section(corpora["small"], spec, work / "stores" / f"{tok}_small"),
            model(vocab, 64, 2, 256, SEQ_LEN, seed=1), steps=3, batch=BATCH)
    for repeat in range(repeats):
        for tok, (spec, vocab) in tokenizers.items():
            for size in ("small", "large"):
                data = data_section(corpora[size], spec, work / "stores" / f"{tok}_{size}")
                result = distill(work, f"startup_{tok}_{size}", teachers[tok], data,
                                 model(vocab, 48, 2, 128, SEQ_LEN, seed=2), steps=1)
                result.pop("output")
                runs.setdefault((tok, size), []).append(result)
                print(f"  start-up {tok} {size} #{repeat + 1}: first step "
                      f"{result['first_step_s']:.2f} s, exit {result['wall_s']:.2f} s, "
                      f"peak RSS {result['peak_rss_mib']:.0f} MiB (anonymous "
                      f"{result['peak_anon_mib']:.0f})", flush=True)
    rows = []
    for tok in tokenizers:
        best = {}
        for size in ("small", "large"):
            done = runs[(tok, size)]
            best[size] = {key: min(run[key] for run in done)
                          for key in STARTUP_MEASURES}
            best[size]["median"] = {key: float(np.median([run[key] for run in done]))
                                    for key in STARTUP_MEASURES}
            best[size]["runs"] = done
        row = {"tokenizer": tok, "small": best["small"], "large": best["large"]}
        for key in STARTUP_MEASURES:
            row[f"{key}_ratio"] = best["large"][key] / best["small"][key]
            row[f"{key}_difference"] = best["large"][key] - best["small"][key]
            row[f"{key}_median_ratio"] = (best["large"]["median"][key]
                                          / best["small"]["median"][key])
        row["within_goal"] = all(
            row[f"{key}_ratio"] <= 1.10 and row[f"{key}_difference"] <= limit
            for key, limit in (("first_step_s", float("inf")), ("wall_s", float("inf")),
                               ("peak_rss_mib", 200.0)))
        row["parts"] = {size: startup_parts(work / "configs" / f"startup_{tok}_{size}.yaml")
                        for size in ("small", "large")}
        rows.append(row)
    return rows


def startup_parts(config: Path) -> dict:
    """What of a run's start-up depends on the data, timed alone in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--probe-startup", str(config)],
                          capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_startup(config: str) -> dict:
    """The data's part of start-up, as `kd_jax.train.loop.run` meets it: the store opened
    (`builder.load_data`), the first batch (the epoch's permutation and its rows, read), one
    held-out batch; the resident memory they add."""
    from kd_jax import config as config_lib
    from kd_jax.data.batches import Batches, heldout_batches
    from kd_jax.train import builder
    from kd_jax.train.resolve import resolve

    cfg = resolve(config_lib.load(config))
    before, out = resident_mib(), {}
    started = time.perf_counter()
    data = builder.load_data(cfg)
    out["open_s"] = time.perf_counter() - started
    started = time.perf_counter()
    batches = Batches(data.train, cfg.train.batch_size, cfg.train.seed)
    batches.take(batches.rows(0, np.arange(cfg.train.batch_size)))
    out["first_batch_s"] = time.perf_counter() - started
    started = time.perf_counter()
    next(heldout_batches(data.heldout, cfg.train.batch_size, cfg.train.eval_sequences))
    out["heldout_batch_s"] = time.perf_counter() - started
    after = resident_mib()
    out.update({f"added_{key}_mib": after[key] - before[key] for key in after})
    out["train_rows"] = data.train.n_rows
    return out


def parts_table(rows: list[dict], sizes: dict) -> str:
    lines = ["| tokenizer | store | train rows | open ms | first batch ms | held-out batch ms | "
             "RSS added, MiB | of it anonymous | of it mapped files |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for size, p in r["parts"].items():
            lines.append(f"| {r['tokenizer']} | {sizes[size]} | {p['train_rows']:,} | "
                         f"{1e3 * p['open_s']:.1f} | {1e3 * p['first_batch_s']:.1f} | "
                         f"{1e3 * p['heldout_batch_s']:.1f} | {p.get('added_VmRSS_mib', 0):.1f} "
                         f"| {p.get('added_RssAnon_mib', 0):.1f} | "
                         f"{p.get('added_RssFile_mib', 0):.1f} |")
    return "\n".join(lines)


def startup_table(rows: list[dict], sizes: dict) -> str:
    lines = [f"| tokenizer | measure | {sizes['small']} | {sizes['large']} | ratio | difference "
             "| median ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for key, label, unit in (("first_step_s", "launch to first step", "s"),
                                 ("wall_s", "launch to exit (steps=1)", "s"),
                                 ("peak_rss_mib", "peak RSS (ru_maxrss)", "MiB"),
                                 ("peak_anon_mib", "peak anonymous RSS", "MiB")):
            lines.append(f"| {r['tokenizer']} | {label}, {unit} | {r['small'][key]:.2f} | "
                         f"{r['large'][key]:.2f} | {r[f'{key}_ratio']:.3f} | "
                         f"{r[f'{key}_difference']:+.2f} | {r[f'{key}_median_ratio']:.3f} |")
    return "\n".join(lines)


# --- 3. reader against the step ---------------------------------------------------------------

def read_throughput(store: Path, batches: int, seed: int = 0) -> dict:
    from kd_jax.data.store import TokenStore

    rows = TokenStore(store).split("train")
    draws = np.random.default_rng(seed).integers(0, rows.n_rows, (batches + 1, BATCH))
    rows.take(draws[0])  # warm-up
    times = []
    for batch in draws[1:]:
        started = time.perf_counter()
        rows.take(batch)
        times.append(time.perf_counter() - started)
    tokens = BATCH * rows.seq_len
    return {"seq_len": rows.seq_len, "rows": rows.n_rows, "batches": batches,
            "ms_per_batch_median": 1e3 * float(np.median(times)),
            "tokens_per_second": tokens * batches / float(np.sum(times))}


def reader(work: Path, corpora: dict, steps: int, read_batches: int) -> list[dict]:
    # The demo's teacher and student (kd_jax/demo.py), with rotary tables for 4,096 tokens.
    # The teacher's weights do not change the step's cost: one step of training makes it.
    teacher = train_teacher(
        work, "demo_teacher",
        data_section(corpora["small"], "byte", work / "stores" / "byte_small"),
        model(256, 128, 4, 384, LONG_SEQ_LEN, seed=1, remat="full"), steps=1, batch=2)
    rows = []
    for store, seq_len in (("bpe_large", SEQ_LEN), ("byte_large", SEQ_LEN),
                           ("byte_large_4096", LONG_SEQ_LEN)):
        read = read_throughput(work / "stores" / store, read_batches)
        row = {"store": store, **read, "step_tokens_per_second": None, "ratio": None}
        if store.startswith("byte"):
            data = data_section(corpora["large"], "byte", work / "stores" / store, seq_len)
            run = distill(work, f"step_{store}", teacher, data,
                          model(256, 48, 2, 128, LONG_SEQ_LEN, seed=2), steps=steps)
            per_step = run["step_tokens_per_second"][1:]  # step 1 waits on the first batch
            row["step_tokens_per_second"] = float(np.median(per_step))
            row["step_tokens_per_second_each"] = run["step_tokens_per_second"]
            row["ratio"] = read["tokens_per_second"] / row["step_tokens_per_second"]
        rows.append(row)
        print(f"  reader {store}: {read['tokens_per_second']:,.0f} tokens/s", flush=True)
    return rows


def reader_table(rows: list[dict]) -> str:
    lines = ["| store | seq | rows | ms/batch of 16 | read tokens/s | distill step tokens/s | "
             "read / step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = (f"{r['step_tokens_per_second']:,.0f}" if r["step_tokens_per_second"] else "-")
        ratio = f"{r['ratio']:,.0f}" if r["ratio"] else "-"
        lines.append(f"| {r['store']} | {r['seq_len']} | {r['rows']:,} | "
                     f"{r['ms_per_batch_median']:.2f} | {r['tokens_per_second']:,.0f} | {step} | "
                     f"{ratio} |")
    return "\n".join(lines)


# --- 4. formats -------------------------------------------------------------------------------

COLUMNS = ("tokens", "labels", "segment_ids", "loss_mask")


def write_formats(work: Path, store: Path) -> dict[str, Path]:
    """The store's training rows materialized as an Arrow dataset and as plain .npy files."""
    import datasets
    import pyarrow as pa

    from kd_jax.data.store import TokenStore

    rows = TokenStore(store).split("train")
    arrays = {key: np.zeros((rows.n_rows, rows.seq_len), dtype=np.int32) for key in COLUMNS}
    for first in range(0, rows.n_rows, 4096):
        taken = rows.take(np.arange(first, min(first + 4096, rows.n_rows)))
        for key in COLUMNS:
            arrays[key][first: first + len(taken[key])] = taken[key]
    out = {"kd_jax store": store, "datasets arrow": work / "formats" / "arrow",
           "numpy .npy": work / "formats" / "npy"}
    for path in list(out.values())[1:]:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    table = pa.table({key: pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)),
                                                             rows.seq_len)
                      for key, value in arrays.items()})
    datasets.disable_progress_bars()
    datasets.Dataset(table).save_to_disk(str(out["datasets arrow"]))
    for key, value in arrays.items():
        np.save(out["numpy .npy"] / f"{key}.npy", value)
    return out


def probe(kind: str, path: str, batches: int) -> dict:
    """In a fresh process: open one format, then read random batches of 16 rows."""
    import psutil

    process = psutil.Process()
    started = time.perf_counter()
    if kind == "kd_jax store":
        from kd_jax.data.store import TokenStore
    elif kind == "datasets arrow":
        import datasets
    imported = time.perf_counter() - started
    before = process.memory_info().rss
    started = time.perf_counter()
    if kind == "kd_jax store":
        rows = TokenStore(path).split("train")
        n_rows, read = rows.n_rows, rows.take
    elif kind == "datasets arrow":
        dataset = datasets.load_from_disk(path).with_format("numpy")
        n_rows = len(dataset)
        read = lambda at: dataset[at.tolist()]  # noqa: E731
    else:
        arrays = {key: np.load(Path(path) / f"{key}.npy", mmap_mode="r") for key in COLUMNS}
        n_rows = len(arrays["tokens"])
        read = lambda at: {key: value[np.sort(at)] for key, value in arrays.items()}  # noqa: E731
    opened = time.perf_counter() - started
    after_open = process.memory_info().rss
    draws = np.random.default_rng(0).integers(0, n_rows, (batches + 1, BATCH))
    batch = read(draws[0])
    seq_len = batch["tokens"].shape[1]
    started = time.perf_counter()
    for at in draws[1:]:
        read(at)
    seconds = time.perf_counter() - started
    return {"import_s": imported, "open_s": opened, "rss_before_open_mib": before / MiB,
            "rss_added_by_open_mib": (after_open - before) / MiB,
            "rss_after_reads_mib": process.memory_info().rss / MiB, "seq_len": seq_len,
            "rows": n_rows, "read_dtype": str(batch["tokens"].dtype),
            "tokens_per_second": BATCH * seq_len * batches / seconds,
            "ms_per_batch": 1e3 * seconds / batches}


def formats(work: Path, store: Path, batches: int) -> list[dict]:
    rows = []
    for kind, path in write_formats(work, store).items():
        done = subprocess.run([sys.executable, __file__, "--probe", kind, str(path),
                               "--probe-batches", str(batches)],
                              capture_output=True, text=True, check=True, cwd=REPO)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        size = directory_bytes(path)
        tokens = (json.loads((path / "manifest.json").read_text())["tokens"]
                  if kind == "kd_jax store" else result["rows"] * result["seq_len"])
        rows.append({"format": kind, "path": str(path), "bytes": size, "tokens": tokens,
                     "bytes_per_token": size / tokens, **result})
    return rows


def formats_table(rows: list[dict]) -> str:
    lines = ["| format | B/token on disk | MB on disk | import s | open ms | RSS added by open, "
             "MiB | ms/batch of 16 | read tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bytes_per_token']:.3f} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['import_s']:.2f} | {1e3 * r['open_s']:.1f} | "
                     f"{r['rss_added_by_open_mib']:.1f} | {r['ms_per_batch']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} |")
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------

def machine() -> dict:
    import psutil

    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import version

    found = {name: version(name) for name in
             ("jax", "jaxlib", "numpy", "tokenizers", "datasets", "pyarrow")}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "kd_jax"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    found["kd_jax"] = commit + (" (kd_jax/ modified)" if dirty else "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 50 MiB corpus instead of 1 GiB, fewer repeats and batches")
    parser.add_argument("--work", default="/tmp/kd_jax_token_store",
                        help="where corpora, stores and runs are generated")
    parser.add_argument("--repeats", type=int, default=None,
                        help="start-up runs per store (default 5; --quick: 2)")
    parser.add_argument("--reuse-stores", action="store_true",
                        help="keep stores prepared by an earlier run (their prepare time is not "
                             "measured again)")
    parser.add_argument("--probe", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-batches", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--probe-startup", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(*args.probe, args.probe_batches)))
        return
    if args.probe_startup:
        print(json.dumps(probe_startup(args.probe_startup)))
        return

    work = Path(args.work).resolve()
    if work == REPO or REPO in work.parents:
        parser.error("--work must lie outside the repository")
    for sub in ("corpora", "stores", "configs", "logs", "runs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    sizes = {"small": 10 * MiB, "large": (50 if args.quick else 1024) * MiB}
    size_names = {size: f"{n // MiB} MiB" for size, n in sizes.items()}
    repeats = args.repeats or (2 if args.quick else 5)
    started = time.perf_counter()

    print(f"# token store benchmark{' (quick)' if args.quick else ''}: work in {work}",
          flush=True)
    corpora, corpus_info = {}, {}
    for size, target in sizes.items():
        corpora[size] = work / "corpora" / f"corpus_{target // MiB}mib.jsonl"
        corpus_info[size] = write_corpus(corpora[size], target)
        print(f"  corpus {size}: {corpus_info[size]['bytes']:,} bytes, "
              f"{corpus_info[size]['documents']:,} documents", flush=True)
    bpe = train_bpe(corpora["large"], work / f"bpe{BPE_VOCAB}")
    print(f"  BPE tokenizer: {bpe['vocab_size']} ids, sha256 {bpe['sha256'][:16]}", flush=True)
    tokenizers = {"byte": ("byte", 256), "bpe": (bpe["path"], BPE_VOCAB)}

    prepared = []
    for tok, (spec, _) in tokenizers.items():
        for size in ("small", "large"):
            prepared.append(prepare(work, f"{tok}_{size}", corpora[size], spec, SEQ_LEN,
                                    args.reuse_stores))
            print(f"  prepared {tok}_{size}: {prepared[-1]['wall_s']:.1f} s", flush=True)
    prepared.append(prepare(work, "byte_large_4096", corpora["large"], "byte", LONG_SEQ_LEN,
                            args.reuse_stores))
    print("\n## 1. prepare (kd-jax prepare, wall time of the process; again: a second prepare "
          "of the same store)\n")
    print(prepare_table(prepared), flush=True)

    startup_rows = startup(work, tokenizers, corpora, repeats)
    print(f"\n## 2. start-up of kd-jax distill, train.steps=1, batch {BATCH} x {SEQ_LEN} "
          f"(best of {repeats}; median ratio: of the medians); goal: large within 10% and "
          "200 MB of small\n")
    print(startup_table(startup_rows, size_names), flush=True)
    print("\nthe data's part of it, alone in a fresh process (kd_jax.train.builder.load_data, "
          "the first batch, one held-out batch):\n")
    print(parts_table(startup_rows, size_names), flush=True)

    reader_rows = reader(work, corpora, steps=2 if args.quick else 5,
                         read_batches=100 if args.quick else 300)
    print(f"\n## 3. reader (StoreRows.take, {BATCH} random rows a batch, warm page cache) against "
          "the demo models' distill step (median of steps 2..); goal: read / step >= 10\n")
    print(reader_table(reader_rows), flush=True)

    format_rows = formats(work, work / "stores" / "byte_small",
                          batches=100 if args.quick else 300)
    print(f"\n## 4. formats: the {size_names['small']} byte store's training rows, "
          f"{BATCH} random rows a batch, each opened in a fresh process\n")
    print(formats_table(format_rows), flush=True)

    results = {
        "benchmark": "token_store", "quick": args.quick, "machine": machine(),
        "versions": versions(), "work": str(work), "reused_stores": args.reuse_stores,
        "sizes": {"corpora_bytes": sizes, "seq_len": SEQ_LEN, "long_seq_len": LONG_SEQ_LEN,
                  "batch": BATCH, "bpe_vocab": BPE_VOCAB, "bpe_train_bytes": BPE_TRAIN_BYTES,
                  "startup_repeats": repeats},
        "corpora": corpus_info, "bpe_tokenizer": bpe, "prepare": prepared,
        "startup": startup_rows, "reader": reader_rows, "formats": format_rows,
        "seconds": round(time.perf_counter() - started, 1)}
    out = REPO / "benchmarks" / "results" / f"token_store{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out} ({results['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
