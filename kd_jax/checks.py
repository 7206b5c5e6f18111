"""Small checks shared by every stage: closest-name suggestions and static argument checks.

Standard library only, so the config, the cache format and the jitted code use the same
messages. The argument checks run on Python values at trace time, once per compilation.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from pathlib import Path


def closest(name: str, options: Iterable[str]) -> str:
    """" (did you mean 'x'?)" naming the option closest to `name`, or "" when there is none."""
    match = difflib.get_close_matches(str(name), [str(option) for option in options], n=1,
                                      cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def not_a_directory(path: str | Path) -> str:
    """Why `path` is not a directory, for a message: "does not exist", or what it is."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    return "is a file, not a directory" if path.is_file() else "is not a directory"


def static_number(name: str, value, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """`value` as a Python float, or ValueError naming `name`.

    The value must be a plain number (a traced value cannot choose the computation), not NaN,
    and within [low, high] (`low_open`: strictly above low). Infinity passes only where a bound
    leaves room for it.
    """
    try:
        number = float(value)
    except TypeError:  # includes jax tracers: these hyperparameters must be static
        raise ValueError(f"{name} must be a Python number, got {value!r}") from None
    if math.isnan(number) or (low is not None and (number <= low if low_open else number < low)) \
            or (high is not None and number > high):
        raise ValueError(f"{name} must be {_range(low, high, low_open)}, got {value}")
    return number


def static_count(name: str, value, high: int | None = None) -> int:
    """`value` as a Python int in [1, high] (or >= 1), or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) and not _is_numpy_integer(value):
        raise ValueError(f"{name} must be a Python int, got {value!r}")
    if value < 1 or (high is not None and value > high):
        raise ValueError(f"{name} must be in {_range(1, high, False)}, got {value}")
    return int(value)


def _is_numpy_integer(value) -> bool:
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return kind in ("i", "u") and getattr(value, "ndim", None) == 0


def _range(low, high, low_open: bool) -> str:
    if high is None:
        return f"> {_show(low)}" if low_open else f">= {_show(low)}"
    if low is None:
        return f"<= {_show(high)}"
    return f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}]"


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)
