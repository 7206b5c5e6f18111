"""train.tensorboard: the event files hold metrics.jsonl's numbers, and a resumed run shows each
step once. The event files are read back here from their framing (TFRecord), not by the writer."""

import json
import shutil
import struct
from pathlib import Path

import pytest

from kd_jax import cli
from kd_jax.train.tensorboard import scalars
from tests.helpers import write_config


def read_events(path: Path) -> list:
    """The Event protos of one file: each record is length (8 bytes), its CRC (4), the data and
    its CRC (4)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    assert offset == len(data), path
    return events


def shown_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value as TensorBoard shows it: files in name order, and a SessionLog START
    at step S (a writer's purge_step) hides the scalars written before it at steps >= S. A
    (tag, step) written twice and not hidden fails."""
    from tensorboardX.proto.event_pb2 import SessionLog

    shown: dict[tuple[str, int], float] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {key: value for key, value in shown.items() if key[1] < event.step}
            for value in event.summary.value:
                key = (value.tag, event.step)
                assert key not in shown, f"{key} shown twice"
                shown[key] = value.simple_value
    return shown


def expected_scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from metrics.jsonl, as float32 (TensorBoard's simple_value)."""
    expected = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            expected[(tag, record["step"])] = struct.unpack("<f", struct.pack("<f", value))[0]
    return expected


def test_scalars_name_train_and_eval_metrics_and_keep_finite_numbers_only():
    assert scalars({"step": 4, "loss": 2.5, "ce": 2.5, "skipped": 0, "lr": 1e-3,
                    "tokens_per_second": float("nan")}) == {
        "train/loss": 2.5, "train/ce": 2.5, "train/skipped": 0.0, "train/lr": 1e-3}
    assert scalars({"step": 6, "eval": {"student": {"bits_per_byte": 3.0, "agreement": None},
                                        "teacher": {"accuracy": 0.5}}}) == {
        "eval/bits_per_byte": 3.0, "eval/teacher/accuracy": 0.5}


def test_event_files_hold_the_metrics_and_a_resume_shows_each_step_once(teacher_run, tmp_path):
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    options = ["train.tensorboard=true", "train.eval_every=2"]
    assert cli.main(["train", str(config), *options]) == 0
    log_dir = tmp_path / "run" / "tensorboard"
    first = shown_scalars(log_dir)
    assert first == expected_scalars(tmp_path / "run")
    assert {step for tag, step in first if tag == "eval/bits_per_byte"} == {2, 4, 6}
    assert {step for tag, step in first if tag == "train/loss"} == set(range(1, 7))

    # As if killed after logging step 6 but before its checkpoint: resumed from step 3, steps 4
    # to 6 are logged again (their throughput differs), and only the new values show.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    assert cli.main(["train", str(config), *options]) == 0
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    second = shown_scalars(log_dir)
    assert second == expected_scalars(tmp_path / "run")
    assert second.keys() == first.keys()
    assert second[("train/loss", 2)] == first[("train/loss", 2)]
    assert second[("train/loss", 5)] == pytest.approx(first[("train/loss", 5)], rel=1e-6)


def test_a_run_stopped_by_an_error_still_writes_what_it_logged(teacher_run, tmp_path):
    """A learning rate of 1e30: step 2's gradients overflow and the run stops with an error
    after logging step 1; the board is closed on the way out, step 1 written."""
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    assert cli.main(["train", str(config), "train.tensorboard=true", "optimizer.lr=1e30",
                     "optimizer.clip_norm=0", "optimizer.warmup_steps=0"]) == 1
    shown = shown_scalars(tmp_path / "run" / "tensorboard")
    assert shown == expected_scalars(tmp_path / "run")
    assert {step for _, step in shown} == {1}


def test_no_event_files_unless_asked(teacher_run):
    root, _ = teacher_run
    assert not (root / "teacher" / "tensorboard").exists()
