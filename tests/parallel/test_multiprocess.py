"""Two processes with 4 CPU devices each run `kd-jax distill` as one 8-device job.

The processes join through `jax.distributed` (coordinator on 127.0.0.1), each reads from a token
store only the rows of each global batch that its devices hold, and orbax writes and reads the
checkpoints with both. The run stops at step 3, resumes in two processes again, and must match
the same mesh driven by one process with 8 devices and the data packed in memory. A SIGTERM that
reaches one host makes both save the same step; mesh mistakes on 8 devices are one-line errors.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, cli
from kd_jax.models.pure import abstract_model
from kd_jax.run_dir import read_run
from tests.helpers import (
    MESH,
    cli_env,
    distill_config,
    free_port,
    losses_by_step,
    start_two_processes,
    write_config,
    write_corpus,
)

STORE_READS_WORKER = Path(__file__).with_name("store_reads_worker.py")
TIMEOUT_S = 600  # generous: two processes compile and run on a machine that may be shared


def communicate_all(processes: list[subprocess.Popen]) -> list[str]:
    """Each process's output once it ends; all are killed if one does not end in time."""
    outputs = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        outputs.append(output)
    return outputs


def run_two_processes(config: Path, overrides: list[str]) -> list[str]:
    """Run `kd-jax distill` in 2 processes of 4 devices; returns each process's output."""
    # Compared only with one process run the same way (fast_compile: half the compile time).
    processes = start_two_processes("distill", config, overrides, fast_compile=True)
    outputs = communicate_all(processes)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    cfg, _ = read_run(run_dir)
    _, abstract = abstract_model(cfg.model)
    params = checkpoint.restore_params(run_dir, abstract)
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def runs(teacher_run, tmp_path_factory):
    teacher_root, corpus = teacher_run
    root = tmp_path_factory.mktemp("multiprocess")
    config = distill_config(root / "distill.yaml", corpus, teacher_root / "teacher",
                            root / "unused")

    one = subprocess.run(
        [sys.executable, "-m", "kd_jax.cli", "distill", str(config), *MESH,
         f"train.run_dir={root / 'one'}"],
        env=cli_env(8, fast_compile=True), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-4000:]

    multi, store = root / "multi", f"data.store={root / 'store'}"
    assert cli.main(["prepare", str(config), store]) == 0  # the store needs no devices
    first = run_two_processes(config, [f"train.run_dir={multi}", "train.stop_at=3", store])
    second = run_two_processes(config, [f"train.run_dir={multi}", store])
    return root, first, second


def test_two_processes_join_one_mesh(runs):
    _, first, second = runs
    for outputs in (first, second):
        # Process 0 logs; process 1 stays quiet.
        assert "compiled distill step on 8 devices (2 processes" in outputs[0]
        assert "compiled distill step" not in outputs[1]
    assert "resuming from checkpoint 3: first step 4" in second[0]


def test_two_processes_match_one_process(runs):
    root, _, _ = runs
    expected = losses_by_step(root / "one")
    got = losses_by_step(root / "multi")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    # One writer: a line per logged step, not one per process.
    records = (root / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in records if "loss" in json.loads(r)]) == 6

    one, multi = final_params(root / "one"), final_params(root / "multi")
    assert one.keys() == multi.keys() and len(one) >= 10
    for key in one:
        # The same mesh and the same collectives: on CPU the weights come out bit for bit equal
        # (measured); the tolerance only leaves room for another reduction order.
        np.testing.assert_allclose(multi[key], one[key], rtol=1e-5,
                                   atol=1e-6 * np.abs(one[key]).max(), err_msg=key)
    report_one = json.loads((root / "one" / "report.json").read_text())
    report_multi = json.loads((root / "multi" / "report.json").read_text())
    assert report_multi["student"]["bits_per_byte"] == pytest.approx(
        report_one["student"]["bits_per_byte"], rel=1e-4)


def test_each_process_reads_only_its_rows_of_the_store(runs):
    """Each process asks the store for the rows its devices hold and reads nothing else; the
    two halves make the global batch, row for row equal to one process's."""
    root, _, _ = runs
    config, steps = root / "distill.yaml", 3
    overrides = [*MESH, f"data.store={root / 'store'}", "teacher.source=none"]
    port = free_port()
    workers = [subprocess.Popen(
        [sys.executable, str(STORE_READS_WORKER), str(config), str(steps), *overrides,
         "distributed.enabled=true", f"distributed.coordinator=127.0.0.1:{port}",
         "distributed.num_processes=2", f"distributed.process_id={index}",
         "distributed.timeout_s=120"],
        env=cli_env(4, fast_compile=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
        for index in range(2)]
    reports = [json.loads(output.strip().splitlines()[-1])
               for output in communicate_all(workers)]
    one = subprocess.run([sys.executable, str(STORE_READS_WORKER), str(config), str(steps),
                          *overrides], env=cli_env(8, fast_compile=True),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-4000:]
    whole = json.loads(one.stdout.strip().splitlines()[-1])

    batch = 8  # train.batch_size of the config
    for report in reports:
        assert report["rows_read"] == steps * batch // 2  # its half of each batch, no more
    assert whole["rows_read"] == steps * batch
    for step in range(steps):
        halves = reports[0]["rows"][step] + reports[1]["rows"][step]
        assert sorted(halves) == sorted(whole["rows"][step])
        by_row = dict(zip(whole["rows"][step], whole["hashes"][step]))
        for report in reports:
            assert [by_row[row] for row in report["rows"][step]] == report["hashes"][step]


def test_sigterm_on_one_host_saves_the_same_step_everywhere(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    processes = start_two_processes(
        "train", config, ["train.steps=400", "train.checkpoint_every=1000",
                          "train.microbatches=1"], fast_compile=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and processes[0].poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    steps = []
    for process, output in zip(processes, communicate_all(processes)):
        assert process.returncode == 143, output[-4000:]
        line = next(x for x in output.splitlines() if "preempted after step" in x)
        steps.append(int(line.split("preempted after step ")[1].split(":")[0]))

    assert steps[0] == steps[1] == checkpoint.latest_step(tmp_path / "run") < 400


MESH_ERRORS = {
    # case -> (overrides, the one-line error)
    "product": (["mesh.data=3", "mesh.fsdp=2"],
                "mesh mesh.data=3, mesh.fsdp=2, mesh.tensor=1 has 6 devices, but there are 8"),
    "model_dim": (["mesh.data=1", "mesh.fsdp=8", "mesh.student_layout=fsdp", "model.d_model=36",
                   "model.n_heads=2", "model.n_kv_heads=2", "train.microbatches=1"],
                  "embedding: dimension 1 ('embed', size 36) is not divisible by mesh axis "
                  "'fsdp' (size 8)"),
    "batch": (["mesh.data=8", "train.batch_size=12", "train.microbatches=1"],
              "train.batch_size (12) is not divisible by mesh data x fsdp (8 x 1 = 8)"),
    "microbatch": (["mesh.data=8", "train.batch_size=8", "train.microbatches=2"],
                   "train.batch_size / train.microbatches (4) is not divisible by mesh data x "
                   "fsdp (8 x 1 = 8)"),
    "logical_axis": (["mesh.student_rules={mpl: tensor}"],
                     "mesh.student_rules: unknown logical axis 'mpl' (did you mean 'mlp'?); "
                     "logical axes are layers, vocab, embed, heads, kv_heads, head_dim, mlp, "
                     "norm, lora_rank"),
}

_CHECK_ERRORS = """
import contextlib, io, json, sys
from kd_jax import cli
cases = json.loads(sys.argv[1])
out = {}
for name, args in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(args)
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


def test_mesh_mistakes_are_one_line_errors_on_8_devices(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "t.yaml", corpus, run_dir)
    cases = {name: ["train", str(config), *overrides]
             for name, (overrides, _) in MESH_ERRORS.items()}
    result = subprocess.run([sys.executable, "-c", _CHECK_ERRORS, json.dumps(cases)],
                            env=cli_env(8), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (_, message) in MESH_ERRORS.items():
        code, err = got[name]
        assert code == 2, (name, err)
        # (the lines before it, if any, are the datasets library's progress bars)
        assert err.splitlines()[-1] == f"kd-jax: error: {message}", (name, err)
        assert err.count("kd-jax") == 1 and "Traceback" not in err
    assert not run_dir.exists()
