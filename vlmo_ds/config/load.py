"""load_config: recipe file or shipped name + `key=value` overrides -> a validated RunConfig; and the file checks.

    cfg = load_config("tiny", ["optim.lr=1e-4", "stages.0.steps=50"], world_size=8)

A recipe is a YAML file path or the name of one in vlmo_ds/recipes/ ("tiny", "base", "large"). Everything is
checked here, before any model, data or process group is built; files that the quick start creates after loading
(tokenizer, shards) are checked later by check_files.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmo_ds.config.build import build_section
from vlmo_ds.config.ds_json import json_precision, json_zero_stage, read_ds_json, resolve_path
from vlmo_ds.config.errors import ConfigError, MissingFileError
from vlmo_ds.config.plan import start_stage
from vlmo_ds.config.schema import ModelSection, RunConfig
from vlmo_ds.config.validate import validate
from vlmo_ds.config.yaml_tree import apply_override, parse_override, read_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes in vlmo_ds/recipes/."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(path_or_name: str | os.PathLike) -> Path:
    """The recipe file: an existing path, else a shipped recipe called that ("tiny" or "tiny.yaml")."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.parent == Path(".") and (RECIPES / path.with_suffix(".yaml").name).is_file():
        return RECIPES / path.with_suffix(".yaml").name
    raise MissingFileError(f"recipe: '{path_or_name}' is neither a file nor a shipped recipe "
                           f"({', '.join(shipped_recipes())}); give a YAML path or a shipped name")


def load_config(path_or_name: str | os.PathLike, overrides: Sequence[str] = (),
                world_size: int | None = None) -> RunConfig:
    """Read, override, type and validate a recipe.

    overrides: 'dotted.key=value' strings, values read as YAML. world_size: total ranks, when known; with it the
    batch sizes are checked against the data-parallel size (world / (tensor x pipeline)), without it only against
    one rank. After loading, parallel.zero_stage and precision are set (from the DeepSpeed JSON when the recipe
    leaves them null) and deepspeed is an absolute path.
    """
    path = find_recipe(path_or_name)
    tree = read_recipe(path)
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    cfg = build_section(RunConfig, tree, "", defaults={"run_dir": f"runs/{path.stem}"})
    ds_path = resolve_path(cfg.deepspeed)
    ds = read_ds_json(ds_path)
    zero = cfg.parallel.zero_stage if cfg.parallel.zero_stage is not None else json_zero_stage(ds)
    cfg = dataclasses.replace(
        cfg,
        deepspeed=str(ds_path),
        precision=cfg.precision if cfg.precision is not None else json_precision(ds),
        parallel=dataclasses.replace(cfg.parallel, zero_stage=zero),
    )
    validate(cfg, ds, world_size)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, ModelSection):
        return {"preset": value.preset, **value.overrides}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a recipe tree (YAML-safe: dicts, lists, scalars); load_config of its YAML gives cfg back."""
    return _plain(cfg)


def check_files(cfg: RunConfig) -> None:
    """Raise MissingFileError (a ConfigError) naming the key of the first missing tokenizer or shard source; a
    ConfigError when log.wandb is set and wandb is not installed.

    The trainer calls it after the quick start has made its data; remote shard URLs are not checked.
    """
    from vlmo_ds.data.shards import resolve_shards  # webdataset import: only when files are checked

    if not Path(cfg.tokenizer).exists():
        raise MissingFileError(f"tokenizer: {cfg.tokenizer} does not exist; train one with tools/train_tokenizer.py "
                               "(the quick start makes data/synthetic/tok.model) or point to a BERT vocab.txt")
    sources = [(f"stages.{i}.data.{j}.shards", src.shards)
               for i, stage in enumerate(cfg.stages) for j, src in enumerate(stage.data)]
    sources += [(f"stages.{i}.eval_data", stage.eval_data) for i, stage in enumerate(cfg.stages) if stage.eval_data]
    for key in ("retrieval", "text_mlm"):
        if getattr(cfg.eval, key) is not None:
            sources.append((f"eval.{key}", getattr(cfg.eval, key)))
    for key, shards in sources:
        with _named(key):
            resolve_shards(shards)
    _check_start_files(cfg)
    _check_answer_tables(cfg)
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.log.wandb}: the wandb package is not installed; pip install wandb "
                          "(or leave log.wandb out)")


def _check_start_files(cfg: RunConfig) -> None:
    """A stage's init_from names an earlier stage or a weights file (which a pre-training run may still have to
    write when its recipe is loaded: the quick start's fine-tuning)."""
    for index, stage in enumerate(cfg.stages):
        if stage.init_from is None or start_stage(cfg, index) is not None or Path(stage.init_from).is_file():
            continue
        earlier = [s.name for s in cfg.stages[:index]]
        raise MissingFileError(f"stages.{index}.init_from: {stage.init_from} is neither an earlier stage of this "
                               f"recipe ({', '.join(earlier) or 'none'}) nor a file; give a stage name or a "
                               ".safetensors / weights-only .pt state dict (RUN_DIR/stages/NAME/weights.safetensors)")


def _check_answer_tables(cfg: RunConfig) -> None:
    """Every vqa stage finds its answer table (stages.N.answers, else beside its training shards)."""
    from vlmo_ds.tasks.answers import stage_answers  # reads the synthetic generator's table: only when needed

    for i, stage in enumerate(cfg.stages):
        with _named(f"stages.{i}.answers"):
            stage_answers(stage)


@contextmanager
def _named(key: str) -> Iterator[None]:
    """A missing file (MissingFileError) or an unusable one (ConfigError) as one line led by the recipe key."""
    try:
        yield
    except OSError as err:
        raise MissingFileError(f"{key}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
