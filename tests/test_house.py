"""The shape of the package: imports point one way, the core stays bare, modules stay small, and
the packaging metadata is true.

Read from the source with `ast` (nothing is imported), so a violation is named by file and line.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kd_jax"
MAX_LINES = 400

# A stage may import itself and the stages listed; `kd_jax/<folder>/` is a stage, and so is each
# top-level module. This is the pipeline, lowest first (docs/design.md).
ALLOWED = {
    "checks": set(),
    "config": {"checks"},
    "data": {"config", "checks"},
    "align": {"config", "checks", "data"},
    "models": {"config", "checks"},
    "losses": {"config", "checks"},
    "parallel": {"config", "checks"},
    "run_dir": {"config", "checks"},
    "checkpoint": {"config"},
    "cache": {"config", "checks", "data", "align", "checkpoint"},
    "eval": {"config", "checks", "data", "models", "losses"},
    "teacher": {"config", "checks", "data", "align", "models", "losses", "parallel", "cache",
                "checkpoint", "run_dir"},
    "train": {"config", "checks", "data", "align", "models", "losses", "parallel", "cache",
              "teacher", "eval", "checkpoint", "run_dir"},
    "export": {"config", "checks", "models", "eval", "checkpoint", "run_dir"},
    "export_gguf": {"config", "checks", "models", "eval", "checkpoint", "run_dir", "export"},
    "compare": {"config", "run_dir"},
    "demo": {"config", "eval", "train", "compare"},
    "cli": {"config", "cache", "data", "parallel", "eval", "train", "demo", "export", "export_gguf",
            "compare"},
}
# The core runs on a bare accelerator image: these import only jax, flax, optax, numpy, the
# standard library, and other core modules.
CORE = ("models", "losses", "parallel", "train/step.py", "train/onpolicy.py")
CORE_THIRD_PARTY = {"jax", "flax", "optax", "numpy"}
CORE_KD_JAX = {"config", "checks", "models", "losses", "parallel"}
CORE_MODULES = {"kd_jax.train.onpolicy"}  # core modules of a stage that is not all core


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def stage(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, at any depth (lazy ones included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from kd_jax import cli` imports the module kd_jax.cli.
            found += [(node.lineno, f"{node.module}.{alias.name}") if node.module == "kd_jax"
                      else (node.lineno, node.module) for alias in node.names]
    return found


def kd_jax_stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "kd_jax" and len(parts) > 1 else None


def test_every_module_belongs_to_a_known_stage():
    assert {stage(path) for path in modules()} - {"__init__"} == set(ALLOWED)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_pipeline(path):
    own = stage(path)
    for line, module in imports(path):
        other = kd_jax_stage(module)
        if other is None or other == own or own == "__init__":
            continue
        assert other in ALLOWED[own], f"{path.relative_to(ROOT)}:{line}: {own} imports {module}"


def test_nothing_imports_the_cli():
    for path in modules():
        for line, module in imports(path):
            assert module != "kd_jax.cli", f"{path.relative_to(ROOT)}:{line} imports the CLI"


def test_the_core_imports_only_jax_flax_optax_numpy():
    core = [path for path in modules() if str(path.relative_to(PACKAGE)).startswith(CORE)]
    assert any(path.name == "step.py" for path in core) and len(core) > 8
    for path in core:
        for line, module in imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if top == "kd_jax":
                assert kd_jax_stage(module) in CORE_KD_JAX or module in CORE_MODULES, where
            else:
                assert top in CORE_THIRD_PARTY or top in sys.stdlib_module_names, where


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_packaging_metadata_is_true():
    """Every folder of the package is a package setuptools finds; declared data exists."""
    from setuptools import find_packages

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(ROOT), include=include))
    folders = {".".join(path.parent.relative_to(ROOT).parts) for path in modules()}
    assert found == folders
    for package, patterns in project["tool"]["setuptools"].get("package-data", {}).items():
        for pattern in patterns:
            assert list((ROOT / package.replace(".", "/")).glob(pattern)), (package, pattern)
    module, _, function = project["project"]["scripts"]["kd-jax"].partition(":")
    assert f"def {function}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
