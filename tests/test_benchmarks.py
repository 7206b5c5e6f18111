"""benchmarks/gpu.sh end to end at tiny sizes, on a bare image; the useful-FLOPs formula; the
minimal JAX step of vs_pytorch.py against kd_jax's.

The bare image is simulated: a sitecustomize.py on PYTHONPATH refuses the packages a GPU
machine without kd_jax's data stack lacks. flax itself imports yaml (flax.linen.summary) and
depends on PyYAML, so yaml stays importable by flax, and by nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests.helpers import STUDENT, TEACHER

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("datasets", "grain", "tokenizers", "transformers", "torch", "tqdm", "yaml", "orbax")

SITECUSTOMIZE = '''
import builtins
import sys

BLOCKED = {blocked!r}
# package -> the only packages that may import it (besides itself)
ALLOWED_IMPORTERS = {{"yaml": ("flax",)}}


def _refused(name, importer):
    top, importer_top = name.partition(".")[0], importer.partition(".")[0]
    return (top in BLOCKED and importer_top != top
            and importer_top not in ALLOWED_IMPORTERS.get(top, ()))


def _importer():
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


class _Refuse:
    """First imports, by any route (import statements, importlib.import_module)."""

    def find_spec(self, name, path=None, target=None):
        if _refused(name, _importer()):
            raise ModuleNotFoundError(f"{{name}} is blocked (bare image)", name=name)
        return None


_import = builtins.__import__


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    # Import statements of a module already loaded (yaml, by flax) never reach the finder.
    importer = (globals or {{}}).get("__name__", "")
    if level == 0 and _refused(name, importer):
        raise ModuleNotFoundError(f"{{name}} is blocked (bare image)", name=name)
    return _import(name, globals, locals, fromlist, level)


sys.meta_path.insert(0, _Refuse())
builtins.__import__ = _guarded_import
'''


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory):
    """The environment of a subprocess that cannot import BLOCKED (flax may import yaml)."""
    site = tmp_path_factory.mktemp("bare_image")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=set(BLOCKED)))
    return {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable,
            # Compile fast: the figures are checked for sense here, not measured.
            "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, text=True,
                          capture_output=True)


def test_the_bare_image_blocks_what_it_should(bare_env):
    for name in ("tqdm", "orbax.checkpoint", "transformers"):
        refused = python(f"import {name}", bare_env)
        assert refused.returncode != 0 and "blocked (bare image)" in refused.stderr, name
    refused = python("import importlib; importlib.import_module('torch')", bare_env)
    assert "blocked (bare image)" in refused.stderr
    # flax imports yaml; a script importing it after flax still may not.
    refused = python("import flax; import yaml", bare_env)
    assert "yaml is blocked (bare image)" in refused.stderr


def test_gpu_script_tiny_on_a_bare_image(bare_env, tmp_path):
    out = tmp_path / "throughput.json"
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", "--steps", "1", "--repeats",
                          "1", "--json", str(out)], env=bare_env, cwd=ROOT, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "blocked" not in run.stderr
    rows = {line.split("  ")[0] for line in run.stdout.splitlines()}
    assert {"fused (online)", "split (2 jits)", "cached (top-k)", "student only"} <= rows
    report = json.loads(out.read_text())
    assert report["isolated"] and report["workload"]["dtype"] == "bfloat16"
    assert set(report["machine"]) >= {"platform", "device_kind", "cpu_count"}
    assert set(report["versions"]) == {"python", "jax", "jaxlib", "flax", "optax", "numpy"}
    assert report["peak"]["best"] > 0 and report["peak"]["datasheet"] == "unknown"
    assert list(report["results"]) == ["fused", "split", "cached", "student"]
    for kind, result in report["results"].items():
        assert "error" not in result, (kind, result)
        assert math.isfinite(result["tokens_per_second"]) and result["tokens_per_second"] > 0
        assert 0 < result["mfu"] <= 1, (kind, result["mfu"])
        assert result["estimated_peak_bytes"] > 0 and math.isfinite(result["last_loss"])
    with_teacher = report["results"]["fused"]["flops_per_token"]
    assert report["results"]["split"]["flops_per_token"] == with_teacher
    assert report["results"]["student"]["flops_per_token"] < with_teacher

    # Then kd_jax's step against the minimal JAX step, without PyTorch, beside --json's file.
    minimal = json.loads((tmp_path / "throughput_vs_minimal.json").read_text())
    assert "torch" not in minimal["versions"]
    assert {row["variant"] for row in minimal["results"]} == {
        "kd_jax fused", "jax minimal fused", "kd_jax student", "jax minimal student"}
    agreement, bounds = minimal["minimal_step_agreement"], minimal["minimal_step_agreement"][
        "bounds"]
    for kind in ("fused", "student"):
        assert agreement[kind]["loss"] <= bounds["loss"] and agreement[kind]["params"] <= bounds[
            "params"]


def throughput_module():
    spec = importlib.util.spec_from_file_location("throughput",
                                                  ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_useful_flops_per_token_is_the_hand_count(tiny_models):
    throughput = throughput_module()
    _, student_params, _, teacher_params = tiny_models
    seq = 16

    def non_embedding(params):  # every parameter outside the embedding and the head
        return sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                   if path[0].key not in ("embedding", "head"))

    n_student, n_teacher = non_embedding(student_params), non_embedding(teacher_params)
    # Layers: q, k, v, o projections, the SwiGLU's three matrices and two norms; a final norm.
    for cfg, count in ((STUDENT, n_student), (TEACHER, n_teacher)):
        d, h = cfg.d_model, cfg.d_model // cfg.n_heads
        assert count == cfg.n_layers * (2 * d * cfg.n_heads * h + 2 * d * cfg.n_kv_heads * h
                                        + 3 * d * cfg.d_ff + 2 * d) + d
    student_only = (6 * n_student + 12 * STUDENT.n_layers * STUDENT.d_model * seq
                    + 6 * STUDENT.d_model * STUDENT.vocab_size)
    with_teacher = student_only + (2 * n_teacher + 4 * TEACHER.n_layers * TEACHER.d_model * seq
                                   + 2 * TEACHER.d_model * TEACHER.vocab_size)
    student = throughput.model_shape(STUDENT, student_params)
    teacher = throughput.model_shape(TEACHER, teacher_params)
    assert throughput.useful_flops_per_token(seq, student) == student_only
    assert throughput.useful_flops_per_token(seq, student, teacher) == with_teacher
