"""From YAML and ``key=value`` overrides to typed dataclasses: strict YAML (no key twice),
dotted keys checked against the fields, values converted to each field's type. Every error
is a ``ConfigError`` naming the key, or the file and line. Knows nothing of rlrelay's own
sections (``cluster/config.py``)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: PyYAML keeps the last one, so a
    second ``rollout:`` section would silently replace the first."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat what it merges
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping refuses it, with its own message
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """YAML (safe, no duplicate keys); errors name ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        line = f" at line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{line}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None


def check_key(root: type, key: str) -> None:
    """Fail on an override whose dotted key names no field of ``root``, naming the whole key."""
    cls: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
            known = sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r}"
                              + (f" (known: {', '.join(known)})" if known else ""))
        tp = typing.get_type_hints(cls)[part]
        dataclass_args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        cls = tp if dataclasses.is_dataclass(tp) else (dataclass_args[0] if dataclass_args else None)


def set_path(raw: dict, parts: list[str], value: Any, key: str) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """``cls(**raw)`` with every value converted to its field's type, nested sections too."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be numbers or booleans (`1:`, `on:`)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        hint = ""
        if isinstance(unknown[0], str) and unknown[0].split(".")[0] in names:
            # `run.name: x` in a file is one key with a dot in it, not a nested one.
            head, _, rest = unknown[0].partition(".")
            hint = f"; dotted keys work on the command line only: in YAML nest it, {head}: then {rest}: on the next line"
        raise ConfigError(f"unknown config key {key!r} (known keys here: {', '.join(sorted(names))}){hint}")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required in {prefix.rstrip('.') or 'the config'}, and not given")
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the section's own checks (__post_init__), which name the key
        raise ConfigError(str(e)) from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return build(tp, value, f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        items = [_convert_item(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _convert_item(tp: Any, value: Any, key: str) -> Any:
    # A list item with a ``name`` field may be written as just its name: `functions: [exact_match]`.
    if dataclasses.is_dataclass(tp) and isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
        return tp(name=value)
    return _convert(tp, value, key)
