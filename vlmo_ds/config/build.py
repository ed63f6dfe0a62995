"""Raw recipe tree -> typed RunConfig: unknown keys refused, types checked, lists made tuples, kind defaults filled.

Types come from the dataclass annotations, so a field added to the schema is parsed and type-checked with no code
here. Ranges and relations between fields are checked afterwards (vlmo_ds.config.validate).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from vlmo_ds.config.errors import ConfigError, did_you_mean, show, suggest
from vlmo_ds.config.schema import (
    KIND_DEFAULTS,
    STAGE_KINDS,
    ModelSection,
    RunConfig,
    StageConfig,
)
from vlmo_ds.model.config import ModelConfig

_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list"
        return f"a list of {len(args)} {'numbers' if args[0] is float else 'values'}"
    if origin is dict:
        return "a mapping"
    return _WORDS.get(tp, f"a {getattr(tp, '__name__', tp)} mapping")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` checked against the annotation `tp` (YAML types; an integer passes as a float; a bool never as int)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        exact = [arg for arg in args if type(value) is arg]  # keep an int warm-up an int, a float a float
        for arg in exact + [arg for arg in args if arg not in exact and arg is not type(None)]:
            try:
                return coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: must be {_describe(tp)}, got {show(value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be {_describe(tp)}, got {show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(item, args[0], _join(path, i)) for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: must be {_describe(tp)}, got {show(value)}")
        return tuple(coerce(item, arg, _join(path, i)) for i, (item, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping, got {show(value)}")
        _, value_type = typing.get_args(tp)
        return {str(k): coerce(v, value_type, _join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"config schema uses an unsupported annotation {tp!r} at {path}")
    if not ok:
        raise ConfigError(f"{path}: must be {_describe(tp)}, got {show(value)}")
    return float(value) if tp is float else value


def schema_keys(cls: type, path: str, stage_index: int = 0) -> list[str]:
    """Every key path of a section (stage keys for one stage index), for 'did you mean' suggestions."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        keys.append(key)
        if cls is RunConfig and f.name == "stages":
            keys += schema_keys(StageConfig, _join(key, stage_index))
        elif cls is RunConfig and f.name == "model":
            keys += [_join(key, m.name) for m in dataclasses.fields(ModelConfig)]
        elif dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], key)
    return keys


def _unknown(path: str, siblings: list[str]) -> ConfigError:
    """Unknown key error; a key of the same section is preferred, then any key of the schema (wrong section)."""
    parts = path.split(".")
    index = int(parts[1]) if len(parts) > 2 and parts[0] == "stages" and parts[1].isdigit() else 0
    section = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = suggest(path, [section + name for name in siblings]) or suggest(path, schema_keys(RunConfig, "", index))
    return ConfigError(f"unknown key '{path}'" + (f" (did you mean '{hint}'?)" if hint else "; remove it"))


def build_section(cls: type, raw: Any, path: str, defaults: dict[str, Any] | None = None) -> Any:
    """One dataclass from a raw mapping; `defaults` override the dataclass defaults (kind defaults, run_dir)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'recipe'}: must be a mapping of keys, got {show(raw)}")
    if cls is ModelSection:
        return _model_section(raw, path)
    if cls is StageConfig and defaults is None:  # _stage comes back here with the kind's defaults
        return _stage(raw, path)
    if cls is RunConfig:
        _check_stage_list(raw.get("stages"))
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown(_join(path, key), sorted(names))
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        if f.name in raw:
            values[f.name] = coerce(raw[f.name], hints[f.name], key)
        elif defaults and f.name in defaults:
            values[f.name] = defaults[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required; add it to the recipe or pass {key}=...")
    return cls(**values)


def _check_stage_list(raw: Any) -> None:
    if raw is None:
        return  # reported as a missing required key
    if not isinstance(raw, list):
        raise ConfigError(f"stages: must be a list of stages (each a mapping with name, kind, data, steps), "
                          f"got {show(raw)}")
    if not raw:
        raise ConfigError("stages: at least one stage is required (name, kind, data, steps)")


def _stage(raw: dict[str, Any], path: str) -> StageConfig:
    """A stage, with the defaults of its kind (loss weights merge into the kind's, so {mlm: 0.5} keeps itc, itm)."""
    kind = raw.get("kind")
    if kind not in STAGE_KINDS:
        if kind is None:
            raise ConfigError(f"{path}.kind: required; one of {', '.join(STAGE_KINDS)}")
        shown = f"'{kind}'" if isinstance(kind, str) else show(kind)
        raise ConfigError(f"{path}.kind: unknown stage kind {shown}{did_you_mean(str(kind), STAGE_KINDS)}; "
                          f"kinds: {', '.join(STAGE_KINDS)}")
    raw = dict(raw)
    data = raw.get("data")
    if isinstance(data, str):
        data = [data]
    if isinstance(data, list):  # a plain path in the list is a source of weight 1
        raw["data"] = [{"shards": item} if isinstance(item, str) else item for item in data]
    defaults = dict(KIND_DEFAULTS[kind])
    weights = dict(defaults["loss_weights"])
    if raw.get("loss_weights") is not None:
        weights.update(coerce(raw["loss_weights"], dict[str, float], f"{path}.loss_weights"))
    raw["loss_weights"] = weights
    return build_section(StageConfig, raw, path, defaults)


def _model_section(raw: dict[str, Any], path: str) -> ModelSection:
    if "preset" not in raw:
        raise ConfigError(f"{path}.preset: required; a model preset such as tiny, base or large")
    preset = coerce(raw["preset"], str, f"{path}.preset")
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for key, value in raw.items():
        if key == "preset":
            continue
        if key not in hints:
            raise _unknown(_join(path, key), ["preset", *hints])
        if key == "vocab_size" and isinstance(value, str):
            if value != "auto":
                raise ConfigError(f"{path}.vocab_size: must be an integer or 'auto' (the tokenizer's size), "
                                  f"got {show(value)}")
            overrides[key] = "auto"
        else:
            overrides[key] = coerce(value, hints[key], _join(path, key))
    return ModelSection(preset=preset, overrides=overrides)
