"""Loading a sharded Hugging Face checkpoint straight into fsdp shardings on 8 CPU devices.

A Llama checkpoint of 315 MB (float32, two safetensors files and their index) is written with
numpy, then loaded in a subprocess (tests/models/sharded_load_worker.py) that starts JAX with 8
host-platform devices on a mesh of fsdp = 8. Each device must hold only its slice of the `embed`
dimension, equal to that slice of the tensor written, and the process's peak resident memory
must stay below the model plus two copies of its largest tensor: the shards themselves, the
pages of one tensor mapped while a block is read (a block of `embed` columns touches every page
of it), and one parameter's blocks gathered before they are placed (no stacked layer parameter
here is larger than the embedding). A loader that built the whole model on the host first would
need about twice the model; one that put a full copy on every device, about eight times.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli_env
from tests.models import sharded_load_worker as worker

WORKER = Path(worker.__file__)
# The dimension each checked parameter keeps its `embed` axis in (the one fsdp splits).
EMBED_DIM = {"embedding": 1, "layers/wq": 1, "layers/wo": 3, "layers/w_down": 2}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("llama_sharded")
    free = shutil.disk_usage(checkpoint).free
    if free < 2 * worker.model_bytes():
        pytest.skip(f"{checkpoint} has {free / 1e6:.0f} MB free; the checkpoint needs "
                    f"{worker.model_bytes() / 1e6:.0f} MB and a margin")
    worker.write_checkpoint(checkpoint)
    out = tmp_path_factory.mktemp("sharded_load")
    result = subprocess.run([sys.executable, str(WORKER), str(checkpoint), str(out)],
                            env=cli_env(worker.FSDP), capture_output=True, text=True,
                            timeout=300)
    shutil.rmtree(checkpoint)  # 315 MB that pytest would otherwise keep for three runs
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_the_checkpoint_is_read_from_its_shards(report):
    assert report["devices"] == worker.FSDP
    assert report["files"] == len(worker.SHARD_FILES)


@pytest.mark.parametrize("path", EMBED_DIM)
def test_each_device_holds_only_its_slice(report, path):
    checked = report["checked"][path]
    shape, dim = checked["shape"], EMBED_DIM[path]
    block = shape[dim] // worker.FSDP
    assert checked["spec"][dim] == "fsdp" and shape[dim] == worker.D_MODEL
    shards = sorted(checked["shards"], key=lambda shard: shard["index"][dim])
    assert sorted(shard["device"] for shard in shards) == list(range(worker.FSDP))
    for position, shard in enumerate(shards):
        assert shard["shape"] == shape[:dim] + [block] + shape[dim + 1:], shard
        whole = [[0, size] for size in shape]
        assert shard["index"] == whole[:dim] + [[position * block, (position + 1) * block]] + \
            whole[dim + 1:], shard
        assert shard["equal"], f"{path} on device {shard['device']} differs from the tensor"


def test_each_device_holds_an_eighth_of_the_model(report):
    # Only the norm scales, [d] vectors (two a layer and the final one), are replicated.
    norm_bytes = (2 * worker.N_LAYERS + 1) * worker.D_MODEL * 4
    expected = (report["model_bytes"] - norm_bytes) // worker.FSDP + norm_bytes
    assert set(report["per_device_bytes"].values()) == {expected}, report["per_device_bytes"]


def test_peak_memory_stays_below_the_model_plus_two_tensors(report):
    baseline, peak = report["baseline_kb"] * 1024, report["peak_kb"] * 1024
    model, largest = report["model_bytes"], report["largest_tensor_bytes"]
    bound = model + 2 * largest
    naive = worker.FSDP * model  # a full copy of every tensor on each device
    figures = (f"baseline {baseline / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB, growth "
               f"{(peak - baseline) / 1e6:.0f} MB; model {model / 1e6:.0f} MB, largest tensor "
               f"{largest / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB, a copy per device "
               f"{naive / 1e6:.0f} MB")
    print(figures)
    assert naive > 2 * model > bound, "too small a model for the bound to tell loaders apart"
    assert peak - baseline < bound, figures
