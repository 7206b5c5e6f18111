"""Hugging Face models end to end: `kd-jax distill` from a Hugging Face teacher into a Hugging
Face student, `kd-jax export`, and transformers loading and scoring the result; bad checkpoints
and mismatched tokenizers as one-line errors that write nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kd_jax import cli  # noqa: E402
from kd_jax.config import ConfigError  # noqa: E402
from kd_jax.parallel.cpu import bfloat16_matmul_units  # noqa: E402
from kd_jax.models import load_pretrained  # noqa: E402
from tests.helpers import write_tokenizer  # noqa: E402
from tests.hf_checkpoints import hf_distill_config  # noqa: E402


@contextlib.contextmanager
def flipped(path: Path, offset: int):
    """`path` with one bit flipped at `offset`, restored afterwards (the file is shared)."""
    data = path.read_bytes()
    path.write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:])
    try:
        yield
    finally:
        path.write_bytes(data)


def test_distill_hf_to_hf_export_and_score_in_transformers(hf_pair, tmp_path, capsys):
    import torch
    import transformers
    from tokenizers import Tokenizer

    root, corpus, teacher, student = hf_pair
    run_dir = tmp_path / "run"
    cfg = hf_distill_config(tmp_path / "distill.yaml", corpus, teacher, student, run_dir)
    assert cli.main(["distill", str(cfg), "teacher.license=apache-2.0",
                     "teacher.source_url=https://example.org/teacher"]) == 0
    saved = (run_dir / "config.yaml").read_text()
    assert "family: qwen2" in saved and "qkv_bias: true" in saved
    # teacher.dtype auto, on this CPU: bfloat16 if it has bfloat16 matrix instructions, else
    # float32; the run records it, and the start-up line says which and why.
    expected = "bfloat16" if bfloat16_matmul_units() else "float32"
    assert f"dtype: {expected}" in saved.split("teacher:")[1]
    assert f"teacher {expected}: auto on a CPU" in capsys.readouterr().out
    assert f"tokenizer: {student / 'tokenizer.json'}" in saved
    report = json.loads((run_dir / "report.json").read_text())
    assert report["teacher"]["params"] > report["student"]["params"]
    assert cli.main(["eval", str(run_dir)]) == 0  # the Hugging Face teacher evaluated beside
    again = json.loads((run_dir / "report.json").read_text())
    assert again["teacher"]["bits_per_token"] == pytest.approx(
        report["teacher"]["bits_per_token"], rel=1e-5)

    # The run recorded its plain-directory teacher's digests; a flipped byte there is named.
    weights = teacher / "model.safetensors"
    recorded = json.loads((run_dir / "run.json").read_text())["teacher_files"]
    assert recorded == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    with flipped(weights, weights.stat().st_size - 3):
        capsys.readouterr()
        assert cli.main(["eval", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kd-jax: error: teacher.path") and "\n" not in err, err
        assert "model.safetensors is not the file this run started with" in err

    out = tmp_path / "exported"
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # SHA256SUMS lists every file; a damaged copy of the export is refused when loaded.
    sums = dict(reversed(line.split("  ")) for line in
                (out / "SHA256SUMS").read_text().splitlines())
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in out.iterdir() if p.name != "SHA256SUMS"}
    with flipped(out / "model.safetensors", (out / "model.safetensors").stat().st_size // 2):
        with pytest.raises(ConfigError, match="do not match the SHA-256 recorded for it in "
                                              "SHA256SUMS"):
            load_pretrained(out)
    card = (out / "README.md").read_text()
    assert "apache-2.0" in card and "https://example.org/teacher" in card
    assert "No teacher licence" not in card and "forward_kl" in card and "bits/byte" in card

    # transformers loads the export and scores text; its logits are kd_jax's.
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    auto_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = corpus.read_text()[:400]
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids[:32]
    assert auto_tokenizer(text, add_special_tokens=False)["input_ids"][:32] == ids
    with torch.no_grad():
        result = model(torch.tensor([ids]), labels=torch.tensor([ids]))
    ours = np.asarray(load_pretrained(out)(np.array([ids])))
    np.testing.assert_allclose(ours, result.logits.numpy(), rtol=0, atol=1e-4)
    # transformers' score of the text is the next-token cross-entropy of kd_jax's logits.
    log_probs = ours[0, :-1] - np.log(np.exp(ours[0, :-1]).sum(-1, keepdims=True))
    cross_entropy = -log_probs[np.arange(len(ids) - 1), ids[1:]].mean()
    assert result.loss.item() == pytest.approx(cross_entropy, rel=1e-4)
    # Training moved the student away from its initial checkpoint.
    initial = np.asarray(load_pretrained(student)(np.array([ids])))
    assert np.abs(initial - ours).max() > 1e-3


def test_export_card_says_when_no_licence_was_declared(teacher_run, tmp_path):
    root, _ = teacher_run
    assert cli.main(["export", str(root / "teacher"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "byte tokenizer" in card
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*")}


@pytest.mark.parametrize("case", ["teacher_tokenizer_loses_text", "pickle_teacher", "unsupported_student",
                                  "teacher_missing_tensor", "student_missing_tensor",
                                  "no_tokenizer_json"])
def test_bad_checkpoints_are_one_line_exit_2_and_write_nothing(case, hf_pair, tmp_path, capsys):
    root, corpus, teacher, student = hf_pair
    bad = tmp_path / "bad"
    shutil.copytree(student if "student" in case else teacher, bad)
    if case == "teacher_tokenizer_loses_text":
        other = write_tokenizer(tmp_path / "other.json", Path(__file__))  # another corpus
        shutil.copy(other, bad / "tokenizer.json")
        teacher = bad
    elif case == "pickle_teacher":
        (bad / "model.safetensors").unlink()
        (bad / "pytorch_model.bin").write_bytes(b"never unpickled")
        teacher = bad
    elif case == "unsupported_student":
        hf = json.loads((bad / "config.json").read_text())
        hf["architectures"] = ["MixtralForCausalLM"]
        (bad / "config.json").write_text(json.dumps(hf))
        student = bad
    elif case in ("teacher_missing_tensor", "student_missing_tensor"):
        from kd_jax.models.safetensors_files import read_block, read_header, write_file

        header, start = read_header(bad / "model.safetensors")
        tensors = {name: read_block(bad / "model.safetensors", entry, start,
                                    tuple(slice(None) for _ in entry["shape"]))
                   for name, entry in header.items() if name != "model.norm.weight"}
        write_file(bad / "model.safetensors", tensors)
        if case == "student_missing_tensor":
            student = bad
        else:
            teacher = bad
    elif case == "no_tokenizer_json":
        (bad / "tokenizer.json").unlink()
        teacher = bad
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("kept")
    before = snapshot(run_dir)
    cfg = hf_distill_config(tmp_path / "distill.yaml", corpus, teacher, student, run_dir)
    capsys.readouterr()
    assert cli.main(["distill", str(cfg)]) == 2
    # The error is one line, the last; before it only the datasets library's progress, when it
    # reads the corpus for the first time in this session.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kd-jax: error:"), err
    expected = {"teacher_tokenizer_loses_text": "tokenizer", "pickle_teacher": "pickle",
                "unsupported_student": "MixtralForCausalLM", "teacher_missing_tensor":
                "model.norm.weight", "student_missing_tensor": "model.norm.weight",
                "no_tokenizer_json": "tokenizer.json"}[case]
    assert expected in err
    assert snapshot(run_dir) == before


def test_export_refuses_a_non_empty_target(teacher_run, tmp_path, capsys):
    root, _ = teacher_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["export", str(root / "teacher"), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_a_qlora_student_exports_merged_and_loads_as_its_forward_pass(hf_pair, tmp_path):
    """LoRA on an int8 base, distilled from a Hugging Face student: the export is a plain
    checkpoint whose projections are q(W) + (alpha / r) A B; kd_jax's loader and transformers
    compute from it the logits the run's adapted student computes."""
    import torch
    import transformers

    from kd_jax import checkpoint
    from kd_jax.models.pure import abstract_model
    from kd_jax.run_dir import read_run
    from tests.helpers import assert_trees_close

    root, corpus, teacher, student = hf_pair
    run_dir = tmp_path / "run"
    cfg = hf_distill_config(tmp_path / "distill.yaml", corpus, teacher, student, run_dir)
    assert cli.main(["distill", str(cfg), "model.lora_rank=4", "model.lora_alpha=8",
                     "model.lora_targets=[q, v, o, down]", "model.quantize=int8",
                     "model.quantize_embedding=none", "model.quantize_head=none"]) == 0
    out = tmp_path / "exported"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    assert "LoRA: adapters of rank 4" in (out / "README.md").read_text()

    run_cfg, _ = read_run(run_dir)
    model, abstract = abstract_model(run_cfg.model)
    params = checkpoint.restore_params(run_dir, abstract)
    assert np.any(np.asarray(params["lora"]["b_wq"]))  # trained
    ids = np.arange(3, 35, dtype=np.int32)[None]
    batch = {"tokens": ids, "positions": np.arange(32, dtype=np.int32)[None],
             "segment_ids": np.ones_like(ids)}
    adapted = np.asarray(model.logits(params, batch))
    ours = np.asarray(load_pretrained(out)(ids))
    assert_trees_close(ours, adapted)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, adapted, rtol=0, atol=1e-4)
    # The base as the run started: the student checkpoint's logits differ.
    assert np.abs(np.asarray(load_pretrained(student)(ids)) - adapted).max() > 1e-3
