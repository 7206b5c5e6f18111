"""kd_jax.checkpoint: every array saved has a digest, and a checkpoint whose data was damaged
(one flipped byte anywhere in its data files) is named and never used: a resumed run goes back
to the checkpoint before it, `kd-jax eval` refuses it, a teacher run refuses to load from it."""

import re
import shutil

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, cli
from kd_jax.models.pure import abstract_model
from kd_jax.run_dir import read_run
from tests.helpers import losses_by_step


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _data_files(run_dir, step, item="params"):
    """The files holding the arrays of `item` at checkpoint `step`, largest first."""
    root = checkpoint.checkpoint_dir(run_dir) / str(step) / item
    files = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 64
             and "metadata" not in p.name and p.suffix != ".json"]
    return sorted(files, key=lambda p: -p.stat().st_size)


@pytest.fixture
def run_copy(teacher_run, tmp_path):
    root, _ = teacher_run
    shutil.copytree(root / "teacher", tmp_path / "run")
    return tmp_path / "run"


def test_digests_see_every_bit_and_not_the_mesh():
    x = jax.numpy.arange(24, dtype=jax.numpy.float32).reshape(2, 3, 4)
    base = checkpoint.digests({"x": x})
    for index in ((0, 0, 0), (1, 2, 3), (0, 1, 2)):
        for bit in (0, 13, 31):
            words = np.asarray(x).view(np.uint32).copy()
            words[index] ^= np.uint32(1 << bit)
            assert checkpoint.digests({"x": jax.numpy.asarray(words.view(np.float32))}) != base
    swapped = np.asarray(x).copy()
    swapped[0, 0, 0], swapped[0, 0, 1] = swapped[0, 0, 1], swapped[0, 0, 0]
    assert checkpoint.digests({"x": jax.numpy.asarray(swapped)}) != base  # positions count
    halves = checkpoint.digests({"b": jax.numpy.ones(5, jax.numpy.bfloat16),
                                 "i": jax.numpy.int32(7), "k": jax.numpy.bool_(True)})
    assert set(halves) == {"['b']", "['i']", "['k']"}


def test_a_flipped_byte_in_the_student_is_named_at_every_offset(run_copy):
    cfg, _ = read_run(run_copy)
    _, abstract = abstract_model(cfg.model)
    step = checkpoint.latest_step(run_copy)
    checkpoint.restore_params(run_copy, abstract, step)  # sound before
    clean = run_copy.with_name("clean")
    shutil.copytree(run_copy, clean)
    step_dir = checkpoint.checkpoint_dir(run_copy) / str(step)
    for data, pristine in zip(_data_files(run_copy, step)[:3], _data_files(clean, step)[:3]):
        size = data.stat().st_size
        for offset in (0, size // 7, size // 3, size // 2, 2 * size // 3, size - 1):
            shutil.copyfile(pristine, data)
            _flip(data, offset)
            name = data.relative_to(step_dir).as_posix()
            with pytest.raises(checkpoint.DamagedCheckpoint, match=(
                    f"^checkpoint {step} in .* is damaged: file {name} does not match its "
                    "recorded digest$")):
                checkpoint.restore_params(run_copy, abstract, step)
        shutil.copyfile(pristine, data)
    # A save killed before its files were recorded: the arrays' digests still catch every byte
    # that a restore decodes (the offsets here all change a weight).
    (step_dir / checkpoint.FILE_DIGESTS).unlink()
    data, pristine = _data_files(run_copy, step)[0], _data_files(clean, step)[0]
    size = data.stat().st_size
    for offset in (0, size // 7, size // 3, size // 2, 2 * size // 3):
        shutil.copyfile(pristine, data)
        _flip(data, offset)
        with pytest.raises(checkpoint.DamagedCheckpoint,
                           match=f"^checkpoint {step} in .* (is damaged: array|cannot be read)"):
            checkpoint.restore_params(run_copy, abstract, step)
    # A truncated file: the reason is TensorStore's, whole (the array, the byte range it
    # misses), without the array spec orbax wraps it in.
    shutil.copyfile(pristine, data)
    data.write_bytes(pristine.read_bytes()[: size // 2])
    with pytest.raises(checkpoint.DamagedCheckpoint) as caught:
        checkpoint.restore_params(run_copy, abstract, step)
    message = str(caught.value)
    assert re.fullmatch(rf"checkpoint {step} in .* cannot be read \(\w+: Error reading \S+ "
                        r".*byte range .* is not valid for value of size \d+\)", message), message


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(run_copy, teacher_run, capsys):
    """The teacher fixture saved steps 3 and 6; step 6 damaged, a run to step 9 goes back to 3
    and trains as a run resumed from 3 does."""
    root, corpus = teacher_run
    config = root / "teacher.yaml"
    clean = run_copy.with_name("clean")
    shutil.copytree(run_copy, clean)
    shutil.rmtree(checkpoint.checkpoint_dir(clean) / "6")
    _flip(_data_files(run_copy, 6, "opt_state")[0], 5)
    assert cli.main(["eval", str(run_copy)]) == 0  # eval reads the parameters only: sound
    _flip(_data_files(run_copy, 6)[0], 5)
    assert cli.main(["eval", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kd-jax: error: checkpoint 6 in ") and "damaged" in err[-1] or \
        "cannot be read" in err[-1]

    for run_dir in (run_copy, clean):
        assert cli.main(["train", str(config), f"train.run_dir={run_dir}", "train.steps=9"]) == 0
    out = capsys.readouterr()
    assert "resuming from checkpoint 3 instead; damaged checkpoint(s) 6 moved to " \
           "damaged_checkpoints/" in out.out + out.err
    assert (run_copy / "damaged_checkpoints" / "6").is_dir()
    got, expected = losses_by_step(run_copy), losses_by_step(clean)
    assert got[9] == expected[9] and got[7] == expected[7]
    assert checkpoint.latest_step(run_copy) == 9


def test_every_checkpoint_damaged_is_one_line(run_copy, teacher_run, capsys):
    root, _ = teacher_run
    for step in (3, 6):
        _flip(_data_files(run_copy, step)[0], 7)
    code = cli.main(["train", str(root / "teacher.yaml"), f"train.run_dir={run_copy}",
                     "train.steps=9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"kd-jax: error: every checkpoint in {run_copy} is damaged (steps 3, 6); "
                       "nothing sound to resume from")


def test_run_files_are_strict_json(tmp_path):
    from kd_jax import run_dir

    record = {"step": 3, "loss": float("nan"), "eval": {"kl": float("inf"), "ok": [1.5, -np.inf]}}
    run_dir.append_metrics(tmp_path, record)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert line == '{"step": 3, "loss": null, "eval": {"kl": null, "ok": [1.5, null]}}\n'
    for step in (1, 2, 4, 5):
        run_dir.append_metrics(tmp_path, {"step": step})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "lo')  # a line cut short by a kill
    run_dir.drop_metrics_after(tmp_path, 4)
    import json

    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 1, 2, 4]


def test_plain_progress_lines_when_stderr_is_not_a_terminal(capsys):
    from kd_jax.train.progress import PlainProgress

    bar = PlainProgress(total=10, initial=2, unit="step", every_s=0.0)
    bar.set_postfix({"loss": "1.25"})
    bar.update(3)
    line = capsys.readouterr().err.strip()
    assert line.startswith("step 5/10 (50%), ") and "ETA " in line and line.endswith(
        ", loss 1.25")
