"""Configs from YAML files and `section.key=value` overrides, each value typed and checked."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from kd_jax.checks import closest
from kd_jax.config import SECTIONS, Config, ConfigError, section_types
from kd_jax.config.coercion import coerce
from kd_jax.config.validation import check as validate


def _set(config: Config, section: str, key: str, value: Any) -> None:
    if section not in SECTIONS:
        if section == "teachers":
            raise ConfigError("teachers is a list of teachers, set as a whole (teachers=[{source: "
                              "checkpoint, path: ..., weight: 1}, ...]), not teachers.<key>")
        raise ConfigError(f"unknown config section '{section}'"
                          f"{closest(section, [*SECTIONS, 'teachers'])}")
    target = getattr(config, section)
    types = section_types(type(target))
    if key not in types:
        valid = [f"{section}.{k}" for k in types]
        raise ConfigError(
            f"unknown config key '{section}.{key}'{closest(f'{section}.{key}', valid)}")
    setattr(target, key, coerce(value, types[key], f"{section}.{key}"))


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    config = base if base is not None else Config()
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a mapping of sections")
    for section, values in raw.items():
        if values is None:
            continue
        if section == "teachers":  # a list, not a section
            config.teachers = coerce(values, list[dict], "teachers")
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            _set(config, str(section), str(key), value)
    return config


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply `section.key=value` strings (and `teachers=[...]`); values are parsed as YAML,
    then typed."""
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if sep and section == "teachers" and not dot:  # the whole list, in YAML's flow style
            config.teachers = coerce(_yaml_value(text), list[dict], "teachers")
            continue
        if not sep or not dot or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        _set(config, section, key, _yaml_value(text))
    return config


def _yaml_value(text: str) -> Any:
    """An override's value parsed as YAML (a string where it is not YAML)."""
    import yaml  # here, not at the top: the core (step, model) imports this module's types

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (or start from defaults), apply overrides, and validate."""
    import yaml

    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections (model:, data:, "
                              f"...), got a {type(raw).__name__}")
        from_dict(raw, config)
    apply_overrides(config, overrides)
    validate(config)
    return config


def dump(config: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
