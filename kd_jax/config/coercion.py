"""Config values from YAML or the command line, converted to each field's type."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

from kd_jax.checks import closest
from kd_jax.config import ConfigError, RematPolicy, choices

_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# The values a choice had before it was named: `model.remat` was a boolean, and the configs and
# run directories written then must still load, and compare equal when a run resumes.
_FORMER_NAMES = {RematPolicy: {"true": "full", "false": "none"}}


def coerce(value: Any, kind: type, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if typing.get_origin(kind) is Literal:
        names = choices(kind)
        if kind in _FORMER_NAMES and isinstance(value, (bool, str)):
            value = _FORMER_NAMES[kind].get(str(value).lower(), value)
        if isinstance(value, str) and value in names:
            return value
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(names)}"
                          f"{closest(str(value), names)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif kind in (int, float):
        number = value
        if isinstance(value, str):
            try:  # "1e-3" is a float, "1_000" an int, "3.0" not an int
                number = float(value) if kind is float else int(value.replace("_", ""))
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool) and (
                kind is float or float(number).is_integer()):
            return kind(number)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == list[dict]:  # a list of mappings (a mixture's sources)
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, dict) and all(isinstance(k, str) for k in v) for v in value):
            return [dict(v) for v in value]
        raise ConfigError(f"{where}: expected a list of mappings, got {value!r}")
    elif kind == list[int | str]:  # token ids or token strings (generate.stop)
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected a list of token ids or strings, got {value!r}")
    elif kind == list[list[int]]:  # [student layer, teacher layer] pairs (loss.hidden_layers)
        if isinstance(value, (list, tuple)) and all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in pair)
                for pair in value):
            return [list(pair) for pair in value]
        raise ConfigError(f"{where}: expected a list of [student layer, teacher layer] pairs, "
                          f"got {value!r}")
    elif kind == list[str]:  # names (model.lora_targets)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    elif typing.get_origin(kind) is list:  # a list of integers
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
    elif kind is dict:
        if value is None:
            return {}
        if isinstance(value, dict) and all(
                isinstance(v, (str, type(None))) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{where}: expected a mapping of names to names or null, got {value!r}")
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def weighted_entry(entry: Any, where: str, keys: tuple[str, ...], required: tuple[str, ...],
                   needs: str, kind: str) -> float:
    """The weight of one entry of a weighted list (a mixture's sources, the teachers), after
    checking it is a mapping holding `required` and no key but `keys`; ConfigError otherwise.
    `needs` and `kind` name what an entry must hold and what its keys are, for the messages."""
    if not isinstance(entry, dict) or any(key not in entry for key in required):
        raise ConfigError(f"{where} must be a mapping with {needs}")
    unknown = sorted(set(entry) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: '{unknown[0]}' is not {kind} ({', '.join(keys)})")
    weight = coerce(entry["weight"], float, f"{where}.weight")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{where}.weight must be a finite number > 0, got {weight}")
    return weight

