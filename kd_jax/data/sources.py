"""Documents: where the text comes from, and which documents are held out.

A source yields `Document`s: plain text, a (prompt, response) pair whose loss covers only the
response, or a chat conversation rendered with the tokenizer's chat template whose loss covers
the assistant turns (`kd_jax.data.chat`). Sources are the running interpreter's standard library
(`stdlib`, no download), local text/JSON/Parquet/CSV files and Hugging Face Hub datasets (both
through `datasets`, imported only when used). `load_documents` returns them all, for packing in
memory; `iter_documents` streams them, for a token store. Adding a source touches this module
only.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator

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
    """Plain text, a (prompt, response) pair whose loss covers only the response, or a
    rendered chat: (text, trained) pieces whose loss covers the trained ones."""

    text: str  # the whole document, or the response when `prompt` is set
    prompt: str | None = None
    name: str = ""  # where it came from: a file's relative path, or "row 17"
    pieces: tuple[tuple[str, bool], ...] = ()  # a chat rendered by its template


def load_documents(cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """Return (train, heldout) documents for `cfg`; raises ConfigError for a user mistake."""
    check_source(cfg)
    if cfg.source == "stdlib":
        train, heldout = _hold_out(_stdlib_documents(), cfg)
    elif cfg.source in _FILE_BUILDERS and cfg.heldout_path:
        train = _dataset_documents(cfg, cfg.split)
        heldout = _dataset_documents(heldout_source(cfg), cfg.split)
    elif cfg.source in _FILE_BUILDERS:
        train, heldout = _hold_out(_dataset_documents(cfg, cfg.split), cfg)
    else:
        documents = _dataset_documents(cfg, cfg.split)
        if cfg.heldout_split:
            train, heldout = documents, _dataset_documents(cfg, cfg.heldout_split)
        else:
            train, heldout = _hold_out(documents, cfg)
    if cfg.max_documents > 0:
        train = train[: cfg.max_documents]
    return train, heldout


def check_source(cfg: DataConfig) -> None:
    """Refuse settings that do not fit the source, before anything is read."""
    if cfg.source not in ("stdlib", "hub", *_FILE_BUILDERS):
        raise ConfigError(f"data.source: unknown source '{cfg.source}'")
    if cfg.source == "hub" and not cfg.path:
        raise ConfigError("data.path must name a Hugging Face dataset for source 'hub'")
    if cfg.heldout_split and cfg.source == "stdlib":
        raise ConfigError("data.heldout_split applies to source 'hub' only; the stdlib "
                          "source holds out files by data.heldout_fraction")
    if cfg.heldout_split and cfg.source != "hub":
        raise ConfigError(f"data.heldout_split applies to source 'hub' only; for local "
                          f"'{cfg.source}' files, name the held-out files in "
                          f"data.heldout_path (or hold documents out by data.heldout_fraction)")
    if cfg.heldout_path and cfg.source not in _FILE_BUILDERS:
        raise ConfigError(f"data.heldout_path names held-out files for a source of files "
                          f"({', '.join(_FILE_BUILDERS)}); source '{cfg.source}' "
                          + ("holds out a split: data.heldout_split" if cfg.source == "hub"
                             else "holds out files by data.heldout_fraction"))
    if cfg.heldout_path:
        overlap = ({os.path.realpath(file) for file in data_files(cfg)}
                   & {os.path.realpath(file) for file in data_files(cfg, heldout=True)})
        if overlap:
            raise ConfigError(f"data.heldout_path: {sorted(overlap)[0]} is in data.path too; "
                              "held-out files must not be trained on")


def heldout_source(cfg: DataConfig) -> DataConfig:
    """The config that reads `data.heldout_path`'s files as `data.path`'s are read."""
    return dataclasses.replace(cfg, path=cfg.heldout_path, heldout_path="", max_documents=0)


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


def data_files(cfg: DataConfig, heldout: bool = False) -> list[str]:
    """The files `data.path` (or with `heldout`, `data.heldout_path`) matches, in order."""
    key = "data.heldout_path" if heldout else "data.path"
    path = cfg.heldout_path if heldout else cfg.path
    patterns = [pattern.strip() for pattern in path.split(",") if pattern.strip()]
    if not patterns:
        raise ConfigError(f"{key} must list the {cfg.source} files to read")
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [match for match in matches if os.path.isfile(match)]
        if not matches:
            raise ConfigError(f"{key}: no file matches '{pattern}'")
        files.extend(matches)
    return files


def _load_dataset(cfg: DataConfig, split: str, streaming: bool) -> Any:
    """The `datasets` dataset of `cfg` (an IterableDataset when `streaming`).

    `datasets` is made quiet for the whole process: its progress bars ("Generating train
    split") and its log lines (a parser's "Failed to load JSON ...") would come before the one
    line a refusal is, and what they say is in that line; progress is kd-jax's own."""
    try:
        import datasets
        import datasets.utils.logging
    except ImportError:
        raise ConfigError(f"data.source '{cfg.source}' needs the 'datasets' package") from None
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    if cfg.source != "hub":
        files = data_files(cfg)
        if all(os.path.getsize(file) == 0 for file in files):
            raise ConfigError(f"{_describe(cfg)} is empty: every file matched has 0 bytes")
    try:
        if cfg.source == "hub":
            return datasets.load_dataset(cfg.path, cfg.name or None, split=split,
                                         streaming=streaming)
        return datasets.load_dataset(cfg.source, data_files=files, split=split,
                                     streaming=streaming)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the CLI wants one line
        raise ConfigError(f"could not load {_describe(cfg)}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    import datasets

    # DatasetGenerationError wraps the parser's error (a malformed json line, say).
    cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) \
        and err.__cause__ is not None else err
    return (str(cause).strip().splitlines() or [""])[0] or type(cause).__name__


def _columns(cfg: DataConfig) -> tuple[tuple[str, ...], list[str]]:
    """The config keys naming the columns read, and those columns."""
    if cfg.messages_column:
        keys = ("messages_column",)
    elif cfg.prompt_column:
        keys = ("prompt_column", "response_column")
    else:
        keys = ("text_column",)
    return keys, [getattr(cfg, key) for key in keys]


def _check_columns(cfg: DataConfig, available: list[str]) -> None:
    for key, column in zip(*_columns(cfg)):
        if column not in available:
            raise ConfigError(f"data.{key}: column '{column}' is not in {_describe(cfg)}; "
                              f"available columns: {', '.join(available) or '(none)'}")


def _row_document(cfg: DataConfig, row: dict[str, Any], index: int, chat: Any
                  ) -> Document | None:
    """The document of one dataset row, or None for an empty one."""
    name = f"row {index}"
    if cfg.messages_column:
        try:
            pieces = chat.pieces(row[cfg.messages_column])
        except ValueError as err:
            raise ConfigError(f"{_describe(cfg)}, {name}: {err}") from None
        return Document(text="", name=name, pieces=tuple(pieces)) if pieces else None
    if cfg.prompt_column:
        prompt, response = _as_text(row[cfg.prompt_column]), _as_text(row[cfg.response_column])
        return Document(text=response, prompt=prompt, name=name) if prompt or response else None
    text = _as_text(row[cfg.text_column])
    return Document(text=text, name=name) if text else None


def _chat_template(cfg: DataConfig) -> Any:
    if not cfg.messages_column:
        return None
    if cfg.tokenizer == "byte":
        raise ConfigError("data.messages_column needs a Hugging Face tokenizer with a chat "
                          "template (data.tokenizer is 'byte')")
    from kd_jax.data.chat import load_chat_template

    return load_chat_template(cfg.tokenizer)


def _dataset_documents(cfg: DataConfig, split: str) -> list[Document]:
    dataset = _load_dataset(cfg, split, streaming=False)
    if len(dataset) == 0:
        raise ConfigError(f"{_describe(cfg)} is empty: 0 rows")
    _check_columns(cfg, list(dataset.column_names))
    chat = _chat_template(cfg)
    dataset = dataset.select_columns(_columns(cfg)[1])
    documents = [doc for index, row in enumerate(dataset)
                 if (doc := _row_document(cfg, row, index, chat)) is not None]
    if not documents:
        raise ConfigError(f"{_describe(cfg)} is empty: no non-empty documents")
    return documents


def iter_documents(cfg: DataConfig, split: str) -> Iterator[Document]:
    """The documents of one split, one at a time, never all in memory: what a token store is
    prepared from. Local files are read as a stream; a hub dataset too with `data.streaming`.

    The documents and their order are `load_documents`' before holding any out."""
    if cfg.source == "stdlib":
        yield from _stdlib_documents()
        return
    chat = _chat_template(cfg)
    dataset = _load_dataset(cfg, split, streaming=cfg.source != "hub" or cfg.streaming)
    count = 0
    try:
        for index, row in enumerate(dataset):
            if index == 0:
                _check_columns(cfg, list(row))
            doc = _row_document(cfg, row, index, chat)
            if doc is not None:
                count += 1
                yield doc
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a parser error met while streaming: one line
        raise ConfigError(f"could not read {_describe(cfg)}: {_first_line(err)}") from None
    if not count:
        raise ConfigError(f"{_describe(cfg)} is empty: no non-empty documents")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _hold_out(documents: list[Document], cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """A seeded draw of whole documents (files, for stdlib); both parts keep the source order."""
    heldout = heldout_mask(len(documents), cfg)
    return ([doc for doc, out in zip(documents, heldout) if not out],
            [doc for doc, out in zip(documents, heldout) if out])


def heldout_mask(n_documents: int, cfg: DataConfig) -> np.ndarray:
    """bool [n_documents]: which documents `data.heldout_fraction` holds out, by seeded draw."""
    if n_documents < 2:
        raise ConfigError(f"{_describe(cfg)} has {n_documents} document; at least 2 are "
                          "needed to hold some out (data.heldout_fraction)")
    n_heldout = min(n_documents - 1, max(1, round(cfg.heldout_fraction * n_documents)))
    order = np.random.default_rng([cfg.seed, _HELDOUT_STREAM]).permutation(n_documents)
    mask = np.zeros(n_documents, dtype=bool)
    mask[order[:n_heldout]] = True
    return mask
