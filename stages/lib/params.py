"""Reading ``params.yaml`` into typed sections.

Every section is declared once, as a frozen dataclass next to the code that
uses it (``TrainConfig`` in ``classifier.py``, ``PairsConfig`` in
``pairs.py``, ...), built with :func:`load_sections`: unknown keys, missing
keys and wrong types are refused with the key's dotted name
(``train.augment.scale_mn: unknown key``), then each class checks its ranges
and choices in ``__post_init__``. Code reads attributes, never
``.get(key, default)``: a typo cannot train with a default. ``bool`` is not an
``int`` here and ``"false"`` is not a ``bool``; an ``int`` is accepted where a
``float`` is declared. The YAML is read with ``safe_load`` semantics and a
key given twice in one mapping is an error (plain YAML keeps the last one).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params.yaml section that does not match its declaration."""


def _check(value: Any, tp: Any, name: str) -> Any:
    """``value`` converted to the declared type ``tp`` (tuple for sequences,
    nested dataclasses built), or ConfigError naming ``name``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{name}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is none of {[getattr(a, '__name__', str(a)) for a in args]}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name}: must be null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: must be a list, got {value!r}")
        return tuple(_check(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping, got {value!r}")
        return {_check(k, args[0], f"{name} key"): _check(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"{name}: unsupported declared type {tp!r}")


def check_value(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the declared type ``tp`` (converted as a section's field would be), or
    ConfigError naming ``name``: for a section whose field takes one of several forms and that names the
    error of the form a value takes, not 'none of' them (``decode.columns``)."""
    return _check(value, tp, name)


def _build(cls: type[T], data: Any, name: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    declared = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (known: {', '.join(declared)})")
    missing = [k for k in declared if k not in data]
    if missing:
        raise ConfigError(f"{name}.{missing[0]}: missing")
    values = {k: _check(data[k], hints[k], f"{name}.{k}") for k in declared}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as err:  # a range check in __post_init__
        raise ConfigError(f"{name}: {err}") from err


class Section:
    """Mixin: ``from_params`` and ``as_dict`` for a section dataclass."""

    @classmethod
    def from_params(cls: type[T], data: Any, name: str) -> T:
        return _build(cls, data, name)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (checkpoint fingerprints, JSON)."""
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


def in_range(name: str, value: float, low: float, high: float) -> None:
    """A range check for ``__post_init__``."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> dict[str, Any]:
    """YAML text as plain data (safe: no Python objects), duplicate keys refused; ``where`` names it in errors."""
    loader = _UniqueKeyLoader(text)  # a SafeLoader: plain data only
    try:
        data = loader.get_single_data() or {}
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from err
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must hold a mapping of sections")
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The params file as plain data (safe: no Python objects), duplicate keys refused."""
    return parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))


def load_params(*sections: str, path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The named top-level sections as plain data (for sections without a
    declaration); a missing section is an error, not an empty dict."""
    params = read_yaml(path)
    missing = [s for s in sections if s not in params]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {missing}")
    if len(sections) == 1:
        return params[sections[0]]
    return {s: params[s] for s in sections}


def load_sections(path: str | Path = PARAMS_FILE, **sections: type[T]) -> dict[str, Any]:
    """Every named section, validated whole before any work:
    ``load_sections(path, train=TrainConfig, model=ModelConfig)``."""
    params = read_yaml(path)
    out = {}
    for name, cls in sections.items():
        if name not in params:
            raise ConfigError(f"{path}: missing section {name!r}")
        try:
            out[name] = cls.from_params(params[name], name)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
    return out
