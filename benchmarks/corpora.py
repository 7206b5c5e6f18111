"""Text and tokenizers the benchmarks make for themselves: the running interpreter's standard
library source (always there, no download), and byte-level BPE tokenizers trained on it."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterable


def stdlib_source(size: int) -> str:
    """About `size` characters of the standard library's modules, read in a fixed order (whole
    modules: at least `size`)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for file in sorted(stdlib.glob("*.py")):
        text = file.read_text(errors="replace")
        parts.append(text)
        total += len(text)
        if total >= size:
            break
    return "".join(parts)


def byte_level_bpe(path: Path, texts: Iterable[str], vocab_size: int,
                   split_digits: bool = False):
    """A byte-level BPE (GPT-2 style) of `vocab_size` ids trained on `texts`, saved as the
    tokenizer.json `path`; `split_digits` makes every digit a token of its own. Returns the
    `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(path))
    return tokenizer
