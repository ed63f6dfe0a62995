"""Any vlmo_ds checkpoint -> one whole model (vlmo_ds.ckpt.consolidated.Consolidated).

A DeepSpeed checkpoint is read one model-parallel rank at a time (vlmo_ds.ckpt.ds_files: whole across its ZeRO
partitions), then its pipeline stages are joined (pipeline_convert.merge_stage_state_dicts) for each tensor rank and
the tensor ranks merged (tp_convert.merge_state_dicts). AdamW's moments have their parameter's shape and are merged
the same way; slicing and concatenation only, so the result is bit-exact. Accepted inputs (`load`):
    RUN_DIR                      its newest checkpoint (checkpoints/latest)
    RUN_DIR/checkpoints/step_N   a DeepSpeed checkpoint folder (trainer.json, DeepSpeed's files, rank_<r>.pt)
    a consolidated folder, a stage record folder (stages/<name>), a weights .safetensors file
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from vlmo_ds.ckpt import consolidated
from vlmo_ds.ckpt.consolidated import Consolidated
from vlmo_ds.ckpt.ds_files import DsCheckpoint, RankState, open_checkpoint, read_rank
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import (Layout, check_preset, check_shapes, config_from_dict, config_from_preset,
                                 layout_from_dict)
from vlmo_ds.ckpt.safe_read import read_json
from vlmo_ds.ckpt.safe_write import check_name
from vlmo_ds.config.groups import expand, group_of
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.pipeline_convert import merge_stage_state_dicts
from vlmo_ds.parallel.tp_convert import merge_state_dicts
from vlmo_ds.train.checkpoint import STEP_DIR, TRAINER_FILE

log = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")


def resolve(path: str | Path) -> Path:
    """A run folder -> its newest checkpoint (the `latest` pointer, checked to be a plain step_N name)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder, a run folder or a weights file")
    pointer = path / "checkpoints" / "latest"
    if path.is_dir() and pointer.is_file():
        name = check_name(pointer.read_text().strip(), str(pointer))
        if not STEP_DIR.match(name):
            raise CheckpointError(f"{pointer} names {name!r}, not a step_NNNNNNNN checkpoint; fix or remove it")
        return path / "checkpoints" / name
    return path


def load(path: str | Path, preset: str | None = None, overrides: dict[str, Any] | None = None,
         trainable_groups: list[str] | None = None) -> Consolidated:
    """Whatever `path` is (see the module docstring), consolidated. preset: check against (or, where the
    checkpoint names no model, build the config from) this preset; trainable_groups: a ZeRO 0 stage's trainable
    list when it froze parameters."""
    path = resolve(path)
    if consolidated.is_consolidated(path):
        state = consolidated.read(path, preset, overrides)
        if preset is not None:
            check_preset(state.cfg, preset, str(path))
        return state
    if (path / TRAINER_FILE).is_file() or any(path.glob("*model_states.pt")):
        return from_deepspeed(path, preset, overrides, trainable_groups)
    raise CheckpointError(f"{path} is neither a checkpoint folder (trainer.json + DeepSpeed's files), a run folder "
                          "(checkpoints/latest), a consolidated or stage folder (weights.safetensors) nor a "
                          ".safetensors file")


def source_layout(trainer: dict[str, Any], ds: DsCheckpoint, source: str) -> Layout:
    """trainer.json's layout checked against DeepSpeed's files; TP = PP = 1 when trainer.json names none."""
    found = (ds.mp_size, ds.dp_size, ds.zero_stage)
    if not trainer.get("layout"):
        if ds.mp_size != 1:
            raise CheckpointError(f"{source} names no layout but DeepSpeed's files hold {ds.mp_size} model-parallel "
                                  "ranks; without the tensor x pipeline split they cannot be merged (the trainer "
                                  "that wrote them predates layouts in trainer.json)")
        return Layout(1, 1, ds.dp_size, ds.zero_stage)
    layout = layout_from_dict(trainer["layout"], source)
    if (layout.model_parallel, layout.data, layout.zero_stage) != found:
        raise CheckpointError(f"{source} says {layout} but DeepSpeed's files hold {found[0]} model-parallel x "
                              f"{found[1]} data-parallel ranks at ZeRO {found[2]}; the folder mixes two saves")
    return layout


def _trains(groups: str | list[str] | None) -> Callable[[str], bool] | None:
    """Whether a parameter name trains, from a stage's trainable group list or "all" (None: not given)."""
    if groups is None:
        return None
    if groups == "all":
        return lambda name: True
    wanted = expand(groups)
    return lambda name: group_of(name) in wanted


def from_deepspeed(folder: Path, preset: str | None = None, overrides: dict[str, Any] | None = None,
                   trainable_groups: list[str] | None = None) -> Consolidated:
    trainer_path = folder / TRAINER_FILE
    trainer = read_json(trainer_path) if trainer_path.is_file() else {}
    ds = open_checkpoint(folder)
    layout = source_layout(trainer, ds, str(trainer_path))
    ranks: dict[int, RankState] = {}
    trains = _trains(trainable_groups if trainable_groups is not None else trainer.get("trainable"))
    for mp in tqdm(range(ds.mp_size), desc="model-parallel ranks", disable=None):
        ranks[mp] = read_rank(ds, mp, trains)
    cfg = _config(trainer, ranks[0], layout, preset, overrides, str(folder))
    state = _merge(ranks, layout, cfg)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in state.weights.items()}, str(folder))
    state.trainer = trainer
    state.layout = layout
    state.precision = "bf16" if ds.bf16 else "fp32"
    state.ds_config = ds.meta.get("ds_config")
    state.counters = {k: ds.meta.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}
    state.rank_files = {int(m.group(1)): p for p in folder.iterdir() if (m := _RANK_FILE.match(p.name))}
    state.source = str(folder)
    return state


def _config(trainer: dict[str, Any], first: RankState, layout: Layout, preset: str | None,
            overrides: dict[str, Any] | None, source: str) -> ModelConfig:
    if trainer.get("model"):
        cfg = config_from_dict(trainer["model"], f"{source}/{TRAINER_FILE}")
        if preset is not None:
            check_preset(cfg, preset, source)
        return cfg.replace(**overrides) if overrides else cfg
    if preset is None:
        raise CheckpointError(f"{source}/{TRAINER_FILE} names no model config; pass --preset NAME (the run's "
                              "model.preset) and --set FIELD=VALUE for the recipe's model overrides")
    if layout.model_parallel > 1:
        raise CheckpointError(f"{source}: a tensor- or pipeline-parallel checkpoint must name its model in "
                              f"{TRAINER_FILE}; this one does not")
    return config_from_preset(preset, overrides or {}, {k: tuple(v.shape) for k, v in first.weights.items()})


def _merge(ranks: dict[int, RankState], layout: Layout, cfg: ModelConfig) -> Consolidated:
    """Join stages per tensor rank, then merge tensor ranks; weights and both moments alike."""
    def whole(part: str) -> dict[str, torch.Tensor]:
        shards = []
        for tp in range(layout.tensor):
            stages = [getattr(ranks[layout.mp_rank(tp, pp)], part) for pp in range(layout.pipeline)]
            shards.append(merge_stage_state_dicts(stages, cfg) if layout.pipeline > 1 else stages[0])
        return merge_state_dicts(shards, cfg) if layout.tensor > 1 else shards[0]

    weights = whole("weights")
    order = {k: i for i, k in enumerate(weights)}
    exp_avg, exp_avg_sq = whole("exp_avg"), whole("exp_avg_sq")
    steps = {s for r in ranks.values() for s in r.step.values()}
    if len(steps) > 1:
        log.warning("AdamW step counts differ between parameters (%s); the largest, %s, is kept", sorted(steps),
                    max(steps))
    groups: dict[str, dict[str, Any]] = {}
    for rank in ranks.values():
        for group in rank.groups:
            entry = groups.setdefault(group.get("name", str(len(groups))),
                                      {k: v for k, v in group.items() if k not in ("params", "flats")} | {
                                          "params": []})
            entry["params"] += [n for n in group["params"] if n not in entry["params"]]
    for entry in groups.values():
        entry["params"].sort(key=order.__getitem__)
    return Consolidated(cfg, weights, dict(sorted(exp_avg.items(), key=lambda kv: order[kv[0]])),
                        dict(sorted(exp_avg_sq.items(), key=lambda kv: order[kv[0]])),
                        max(steps) if steps else None, list(groups.values()))
