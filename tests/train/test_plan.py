"""kd-jax plan: the step compiled from shapes alone, on placeholder devices; per-device figures
that follow the mesh, the chunked loss and the attention, and a verdict on the memory given."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_env

SHAPES = Path(__file__).parents[2] / "configs" / "shapes"
TINY = """
model: {vocab_size: 4096, d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 128,
        max_seq_len: 4096}
data: {seq_len: 512}
train: {batch_size: 8, microbatches: 2}
"""


def plan(config: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "kd_jax.cli", "plan", str(config), *args],
                            env=cli_env(1, fast_compile=True), capture_output=True, text=True,
                            timeout=600)
    return result.returncode, result.stdout + result.stderr


def figure(output: str, label: str) -> float:
    """A per-device figure of the table, in MiB."""
    match = re.search(rf"^  {label}\s+([\d.]+) (GiB|MiB)", output, re.M)
    assert match, (label, output)
    return float(match.group(1)) * (1024 if match.group(2) == "GiB" else 1)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_parameters_and_optimizer_state_follow_the_mesh(config):
    code, one = plan(config, "--devices", "1", "--device-memory", "1")
    assert code == 0, one
    code, eight = plan(config, "--devices", "8", "mesh.data=1", "mesh.fsdp=8",
                       "mesh.student_layout=fsdp")
    assert code == 0, eight
    assert "8 devices" in eight and "fits" in one
    # Every matrix splits its embed dimension over fsdp = 8; only the norm scales do not.
    assert figure(eight, "student parameters") == pytest.approx(
        figure(one, "student parameters") / 8, rel=0.02)
    assert figure(one, "optimizer state") == pytest.approx(
        2 * figure(one, "student parameters"), rel=0.02)  # AdamW: m and v
    # Activations and logits are split over the batch too: every microbatch has rows on every
    # device, and the residual stream stays split between layers.
    assert figure(eight, "temporaries") < 0.3 * figure(one, "temporaries")
    assert "largest temporaries:" in one and "f32[" in one


def test_the_chunked_loss_and_blockwise_attention_shrink_the_temporaries(config):
    """A vocabulary of 32,768 and 2,048 tokens a row, 4 rows a microbatch: the logits (1 GiB an
    array) and the attention scores dominate the dense, unchunked step. What does not shrink
    (the head's and the embedding's gradients, AdamW's updates) stays; benchmarks/memory.py
    measures the loss alone."""
    sizes = ["model.vocab_size=32768", "data.seq_len=2048"]
    code, plain = plan(config, *sizes, "loss.chunk_tokens=-1", "model.attention=dense",
                       "--device-memory", "2")
    assert code == 0 and "does NOT fit" in plain
    code, lean = plan(config, *sizes, "loss.chunk_tokens=512", "model.attention=blockwise",
                      "model.attention_block=256", "--device-memory", "2")
    assert code == 0 and ": fits" in lean
    assert figure(lean, "temporaries") < 0.1 * figure(plain, "temporaries")


def test_a_hf_teacher_and_student_from_config_json_alone(tmp_path):
    """Shapes only: the folders hold a config.json, no weights, no tokenizer."""
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
    published = json.loads((SHAPES / "Llama-3.2-1B" / "config.json").read_text())
    small = dict(published, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024)
    (tmp_path / "student" / "config.json").write_text(json.dumps(small))
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(dict(
        small, hidden_size=128, num_hidden_layers=3, head_dim=32, tie_word_embeddings=False)))
    config = tmp_path / "hf.yaml"
    config.write_text(f"""
teacher: {{source: hf, path: {tmp_path / 'teacher'}, dtype: bfloat16}}
model: {{init: hf, path: {tmp_path / 'student'}}}
data: {{seq_len: 256}}
train: {{batch_size: 4}}
""")
    # With white-box terms too: a projection between the two widths, each model's attention.
    code, output = plan(config, "--devices", "4", "mesh.data=1", "mesh.fsdp=4",
                        "mesh.student_layout=fsdp", "mesh.teacher_layout=fsdp",
                        "loss.hidden_weight=1", "loss.attention_weight=1")
    assert code == 0, output
    teacher_params = 1024 * 128 * 2 + 3 * (128 * 4 * 32 + 2 * 128 * 2 * 32 + 4 * 32 * 128
                                           + 3 * 128 * 128 + 2 * 128) + 128
    assert figure(output, "teacher parameters") == pytest.approx(
        teacher_params * 2 / 4 / 2**20, rel=0.05)  # bfloat16, a quarter per device


def test_bad_input_is_one_line(config, tmp_path):
    code, output = plan(config, "--devices", "0")
    assert code == 2 and output.strip().splitlines()[-1].startswith("kd-jax: error:")
    code, output = plan(config, "--devices", "3", "mesh.data=2")
    assert code == 2 and "kd-jax: error:" in output and "Traceback" not in output


def test_a_teacher_of_another_tokenizer_is_planned_on_its_own_rows(teacher_run, tmp_path):
    """The session's byte-level teacher for a student of a byte-level BPE, in rows of 32 tokens:
    the planned batch carries the teacher's rows of data.teacher_seq_len (48) and, per student
    position, teacher_index (and for loss.cross_vocab bytes the back-off fields), as a real
    run's batch does; with `teachers:`, each member's. White-box terms, which the run refuses
    with such a teacher, and a row length that only the data would size are refused."""
    from kd_jax import config as config_lib
    from kd_jax.config import ConfigError
    from kd_jax.teacher.cross import CrossTokenizerTeacher
    from kd_jax.train.builder import build
    from kd_jax.train.plan import plan as plan_of
    from kd_jax.train.plan import plan_table
    from tests.data.test_tokenizers import write_byte_level_bpe
    from tests.helpers import distill_config

    root, corpus = teacher_run
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = write_byte_level_bpe(tmp_path / "tokenizer.json", vocab_size=300, corpus=lines)
    config = distill_config(tmp_path / "distill.yaml", corpus, root / "teacher",
                            tmp_path / "run")
    overrides = [f"data.tokenizer={tokenizer}", "model.vocab_size=320",
                 "data.teacher_seq_len=48"]
    # 8 rows of int32: the student's 5 fields of 32 tokens; a teacher's 3 of 48 and, per student
    # position, teacher_index (mapped) or teacher_index and 4 back-off fields (bytes).
    rows, seq_len, teacher_seq_len = 8, 32, 48
    student_row = 5 * seq_len
    teacher_row = {"mapped": 3 * teacher_seq_len + seq_len,
                   "bytes": 3 * teacher_seq_len + 5 * seq_len}

    cfg = config_lib.load(config, overrides)
    figures = plan_of(cfg)
    assert figures["batch"] == rows * 4 * (student_row + teacher_row["mapped"])
    assert "batch 8 x 32 tokens (and the teacher's rows of 48 tokens)" in plan_table(figures)
    run = build(cfg, "distill")
    assert isinstance(run.teacher, CrossTokenizerTeacher)
    assert figures["batch"] == sum(value.nbytes for value in run.host_batch(0).values())

    # Two such teachers with loss.cross_vocab bytes: each member's fields, back-off included.
    bytes_run = build(config_lib.load(config, [*overrides, "loss.cross_vocab=bytes"]), "distill")
    assert sum(value.nbytes for value in bytes_run.host_batch(0).values()) == rows * 4 * (
        student_row + teacher_row["bytes"])
    teachers = (f"teachers=[{{source: checkpoint, path: {root / 'teacher'}, weight: 1}}, "
                f"{{source: checkpoint, path: {root / 'teacher'}, weight: 2}}]")
    several = plan_of(config_lib.load(config, [*overrides, "loss.cross_vocab=bytes",
                                               "teacher.source=none", "teacher.path=",
                                               teachers]))
    assert several["batch"] == rows * 4 * (student_row + 2 * teacher_row["bytes"])
    assert several["teacher_params"] == 2 * figures["teacher_params"]

    for more, message in [(["loss.hidden_weight=1"], "loss.hidden_weight needs a teacher with "
                                                     "the student's tokenizer"),
                          (["data.teacher_seq_len=0"], "kd-jax plan needs data.teacher_seq_len"),
                          (["data.teacher_seq_len=128"], r"data.teacher_seq_len \(128\) exceeds "
                                                         r"the teacher's max_seq_len \(64\)")]:
        with pytest.raises(ConfigError, match=message):
            plan_of(config_lib.load(config, [*overrides, *more]))


def test_a_lora_students_optimizer_state_is_under_5_percent_of_the_full_students(tmp_path):
    """Llama 3.2 1B's shapes (config.json alone), bfloat16: rank-16 adapters on all seven
    projections of its 16 layers are 11,272,192 parameters, 0.91% of its 1,235,814,400, and
    AdamW keeps two moments of each; the full student's keeps two of every parameter."""
    config = tmp_path / "llama-1b.yaml"
    config.write_text(f"""
model: {{init: hf, path: {SHAPES / 'Llama-3.2-1B'}, dtype: bfloat16, param_dtype: bfloat16}}
data: {{seq_len: 128}}
train: {{batch_size: 1}}
""")
    code, full = plan(config, "--devices", "1")
    assert code == 0, full
    code, adapted = plan(config, "--devices", "1", "model.lora_rank=16")
    assert code == 0, adapted
    assert "trained: 11,272,192 of the student's 1,247,086,592 parameters" in adapted
    assert figure(adapted, "optimizer state") <= 0.05 * figure(full, "optimizer state")
    assert figure(adapted, "optimizer state") == pytest.approx(
        2 * 11_272_192 * 2 / 2**20, rel=0.01)  # m and v in bfloat16
    assert figure(adapted, "student parameters") == pytest.approx(
        figure(full, "student parameters") * (1 + 11_272_192 / 1_235_814_400), rel=0.01)
