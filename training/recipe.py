"""Recipes: a YAML file (shipped name or path) plus ``--set section.key=value`` overrides.

A recipe has the sections ``model``, ``lora``, ``data``, ``train``, ``eval`` and ``output`` (each
optional; missing keys keep the defaults of ``training.config``). Overrides are applied after
the recipe is read, and every value is coerced to its field's type. Unknown sections or keys are
errors, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nli.errors import ConfigError
from training.config import (
    DataConfig,
    EvalConfig,
    LoopConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    TrainingConfig,
)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "train": LoopConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}
TOP_LEVEL = ("name", "description")


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe's name, or a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(recipe_names())} "
        "(or give a path to a .yaml file)"
    )


def load_config(
    recipe: str | None = None, overrides: list[str] | None = None, *, output: str | None = None
) -> TrainingConfig:
    """Build a config from a recipe (name or path), ``section.key=value`` overrides and ``output``.

    Every problem (unreadable YAML, unknown key, bad value) is a ``ConfigError``.
    """
    raw: dict[str, Any] = {}
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
        raw = loaded or {}
        raw.setdefault("name", path.stem)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}: expected section.key=value")
        _set_dotted(raw, key.strip(), value)
    if output is not None:
        _set_dotted(raw, "output.dir", output)
    return build_config(raw)


def _set_dotted(raw: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in TOP_LEVEL:
        raw[parts[0]] = value
        return
    if len(parts) != 2:
        raise ConfigError(
            f"bad override key {key!r}: expected section.key with a section among "
            f"{', '.join(SECTIONS)}"
        )
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"recipe section {parts[0]!r} must be a mapping")
    section[parts[1]] = value


def build_config(raw: dict[str, Any]) -> TrainingConfig:
    """Validate a nested mapping (recipe plus overrides) into a ``TrainingConfig``."""
    known = set(SECTIONS) | set(TOP_LEVEL)
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown recipe section {key!r}{_suggest(key, known)}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"recipe section {name!r} must be a mapping")
        sections[name] = _build_section(name, cls, values)
    top = {key: str(raw[key]) for key in TOP_LEVEL if raw.get(key) is not None}
    return TrainingConfig(**top, **sections)  # type: ignore[arg-type]


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}{_suggest(key, fields)}")
        kwargs[key] = coerce(value, hints[key], name=f"{name}.{key}")
    return cls(**kwargs)


def _suggest(key: str, options: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(options))}"


_NULL = ("null", "none", "~", "")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def coerce(value: Any, hint: Any, *, name: str) -> Any:
    """Convert a YAML value or override text to the field type ``hint`` (or raise ConfigError)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            if type(None) in options:
                return None
        errors = []
        # Try the non-text types first so "3" becomes 3 for `int | None`, but a list field
        # given as one name stays text when text is allowed.
        ordered = sorted((o for o in options if o is not type(None)), key=lambda o: o is str)
        for option in ordered:
            try:
                return coerce(value, option, name=name)
            except ConfigError as exc:
                errors.append(exc.message)
        if all(o is bool or typing.get_origin(o) is Literal for o in ordered):  # e.g. Switch
            words = [
                word
                for o in ordered
                for word in (("true", "false") if o is bool else map(str, typing.get_args(o)))
            ]
            raise ConfigError(f"{name} must be one of {', '.join(words)}, got {value!r}")
        raise ConfigError(errors[-1] if errors else f"{name}: invalid value {value!r}")
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(hint), name=name)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            if "," not in value:
                raise ConfigError(f"{name}: expected a comma-separated list, got {value!r}")
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [coerce(v, item, name=name) for v in value]
    if hint is bool:
        return _coerce_bool(value, name=name)
    if hint in (int, float):
        return _coerce_number(value, hint, name=name)
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected text, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {hint}")  # pragma: no cover


def _coerce_literal(value: Any, options: tuple[Any, ...], *, name: str) -> Any:
    for option in options:
        if value == option or (isinstance(value, str) and str(option) == value.strip()):
            return option
    raise ConfigError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")


def _coerce_bool(value: Any, *, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _coerce_number(value: Any, kind: type, *, name: str) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        return float(str(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name}: expected {what}, got {value!r}") from None
