"""Documents: where the text comes from, and which documents are held out.

A source yields `Document`s: plain text, or a (prompt, response) pair whose loss covers only the
response. Sources are the running interpreter's standard library (`stdlib`, no download), local
text/JSON/Parquet/CSV files and Hugging Face Hub datasets (both through `datasets`, imported only
when used). Adding a source touches this module only.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.config import ConfigError, DataConfig

_FILE_BUILDERS = ("text", "json", "parquet", "csv")
# Folders whose modules are test suites or third-party code, not the standard library proper.
_STDLIB_EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages"})
# Second seed word for the held-out document draw, so it never coincides with the epoch
# permutations, which use [seed, epoch].
_HELDOUT_STREAM = 0x4D1D


@dataclasses.dataclass(frozen=True)
class Document:
    """Plain text, or a (prompt, response) pair whose loss covers only the response."""

    text: str  # the whole document, or the response when `prompt` is set
    prompt: str | None = None
    name: str = ""  # where it came from: a file's relative path, or "row 17"


def load_documents(cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """Return (train, heldout) documents for `cfg`; raises ConfigError for a user mistake."""
    if cfg.source == "stdlib":
        if cfg.heldout_split:
            raise ConfigError("data.heldout_split applies to source 'hub' only; the stdlib "
                              "source holds out files by data.heldout_fraction")
        documents = _stdlib_documents()
        train, heldout = _hold_out(documents, cfg)
    elif cfg.source in _FILE_BUILDERS:
        if cfg.heldout_split:
            raise ConfigError(f"data.heldout_split applies to source 'hub' only; for local "
                              f"'{cfg.source}' files, documents are held out by "
                              f"data.heldout_fraction")
        documents = _dataset_documents(cfg, cfg.split)
        train, heldout = _hold_out(documents, cfg)
    elif cfg.source == "hub":
        if not cfg.path:
            raise ConfigError("data.path must name a Hugging Face dataset for source 'hub'")
        documents = _dataset_documents(cfg, cfg.split)
        if cfg.heldout_split:
            train, heldout = documents, _dataset_documents(cfg, cfg.heldout_split)
        else:
            train, heldout = _hold_out(documents, cfg)
    else:
        raise ConfigError(f"data.source: unknown source '{cfg.source}'")
    if cfg.max_documents > 0:
        train = train[: cfg.max_documents]
    return train, heldout


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return "the stdlib source"
    return f"data source {cfg.source} '{cfg.path}' (split '{cfg.split}')"


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    relative_paths = sorted(
        path.relative_to(root) for path in root.rglob("*.py")
        if not _STDLIB_EXCLUDED_FOLDERS.intersection(path.relative_to(root).parts[:-1]))
    documents = []
    for relative in relative_paths:
        text = (root / relative).read_bytes().decode("utf-8", errors="replace")
        if text:
            documents.append(Document(text=text, name=relative.as_posix()))
    if not documents:
        raise ConfigError(f"the stdlib source is empty: no .py files under {root}")
    return documents


def _data_files(cfg: DataConfig) -> list[str]:
    patterns = [pattern.strip() for pattern in cfg.path.split(",") if pattern.strip()]
    if not patterns:
        raise ConfigError(f"data.path must list the {cfg.source} files to read")
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [match for match in matches if os.path.isfile(match)]
        if not matches:
            raise ConfigError(f"data.path: no file matches '{pattern}'")
        files.extend(matches)
    return files


def _dataset_documents(cfg: DataConfig, split: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.source '{cfg.source}' needs the 'datasets' package") from None
    if cfg.source != "hub":
        files = _data_files(cfg)
        if all(os.path.getsize(file) == 0 for file in files):
            raise ConfigError(f"{_describe(cfg)} is empty: every file matched has 0 bytes")
    try:
        if cfg.source == "hub":
            dataset = datasets.load_dataset(cfg.path, cfg.name or None, split=split)
        else:
            dataset = datasets.load_dataset(cfg.source, data_files=files, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the CLI wants one line
        # DatasetGenerationError wraps the parser's error (a malformed json line, say).
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) \
            and err.__cause__ is not None else err
        reason = (str(cause).strip().splitlines() or [""])[0] or type(cause).__name__
        raise ConfigError(f"could not load {_describe(cfg)}: {reason}") from None
    if len(dataset) == 0:
        raise ConfigError(f"{_describe(cfg)} is empty: 0 rows")

    chat = bool(cfg.prompt_column)
    keys = ("prompt_column", "response_column") if chat else ("text_column",)
    wanted = [getattr(cfg, key) for key in keys]
    available = list(dataset.column_names)
    for key, column in zip(keys, wanted):
        if column not in available:
            raise ConfigError(f"data.{key}: column '{column}' is not in {_describe(cfg)}; "
                              f"available columns: {', '.join(available) or '(none)'}")
    columns = {column: list(dataset[column]) for column in wanted}

    documents = []
    if chat:
        rows = zip(columns[cfg.prompt_column], columns[cfg.response_column])
        for index, (prompt, response) in enumerate(rows):
            prompt, response = _as_text(prompt), _as_text(response)
            if prompt or response:
                documents.append(Document(text=response, prompt=prompt, name=f"row {index}"))
    else:
        for index, text in enumerate(columns[cfg.text_column]):
            text = _as_text(text)
            if text:
                documents.append(Document(text=text, name=f"row {index}"))
    if not documents:
        raise ConfigError(f"{_describe(cfg)} is empty: no non-empty documents")
    return documents


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _hold_out(documents: list[Document], cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """A seeded draw of whole documents (files, for stdlib); both parts keep the source order."""
    if len(documents) < 2:
        raise ConfigError(f"{_describe(cfg)} has {len(documents)} document; at least 2 are "
                          "needed to hold some out (data.heldout_fraction)")
    n_heldout = min(len(documents) - 1, max(1, round(cfg.heldout_fraction * len(documents))))
    order = np.random.default_rng([cfg.seed, _HELDOUT_STREAM]).permutation(len(documents))
    heldout_indices = set(order[:n_heldout].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in heldout_indices]
    heldout = [doc for i, doc in enumerate(documents) if i in heldout_indices]
    return train, heldout
