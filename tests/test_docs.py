"""The documentation against the code: docs/config.md is what the config dataclasses generate,
and every relative link of the README, docs/ and benchmarks/README.md reaches a file (and a
heading, where it names one)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from kd_jax.config import reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").rglob("*.md"))]


def test_config_reference_is_current():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == reference.markdown(), (
        f"docs/config.md is stale: regenerate it with `{reference.COMMAND}` and commit it")


QuantMode = Literal["int8", "fp8"]  # how weights are stored


@dataclasses.dataclass
class QuantizeSection:
    """Weights in fewer bits."""

    mode: QuantMode = "int8"
    # layers kept in full precision,
    # by name
    skip: list[str] = dataclasses.field(default_factory=list)
    scale: float = 1e-3  # a | in a comment


@dataclasses.dataclass
class ModelSection:
    d_model: int = 128
    quantize: QuantizeSection = dataclasses.field(default_factory=QuantizeSection)


@dataclasses.dataclass
class RootConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    extra: list[dict] = dataclasses.field(default_factory=list)  # a top-level list


def test_a_section_nested_in_a_section_gets_its_own_table():
    text = reference.markdown(RootConfig)
    assert "Sections: [`model`](#model)." in text
    assert "| `extra` | `list[dict]` | `[]` | a top-level list |" in text
    assert "| `quantize` | section | | [`model.quantize`](#modelquantize) below |" in text
    quantize = text[text.index("## `model.quantize`"):]
    assert quantize.startswith("## `model.quantize`\n\nWeights in fewer bits.\n")
    # A Literal by its names, with its type's comment; comment lines above a field joined; a
    # default as written; a | escaped in a table cell.
    assert "| `mode` | `int8` \\| `fp8` | `\"int8\"` | how weights are stored |" in quantize
    assert "| `skip` | `list[str]` | `[]` | layers kept in full precision, by name |" in quantize
    assert "| `scale` | `float` | `1e-3` | a \\| in a comment |" in quantize


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_their_target(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: ({target})"
        assert resolved.exists(), f"{where}: no such file"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{where}: no such heading"
