"""The consolidated form of a checkpoint: one whole model with its Adam state, and the folder it is written to.

    OUT/weights.safetensors    every parameter whole, float32: the stage-record format (vlmo_ds.train.stage_record:
                               metadata format vlmo_ds.weights/1 + the ModelConfig), so init_from, a stage's start
                               weights and every tool read it
    OUT/config.json            the ModelConfig, for people
    OUT/optimizer.safetensors  (when the source had Adam state) exp_avg/<name>, exp_avg_sq/<name>; metadata: format
                               vlmo_ds.adam/1, step, groups (the AdamW groups' lr, betas, eps, weight_decay, members)
    OUT/source.json            where it came from: trainer.json, layout, precision, DeepSpeed's config and counters
    OUT/ranks/rank_<r>.pt      the source's per-rank files (loader position, RNG states), copied as they are
A stage record folder (stages/<name>: weights.safetensors + stage.json) and a bare weights.safetensors read as a
consolidated form without optimizer state.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import (Layout, check_shapes, config_from_dict, config_from_preset, layout_from_dict)
from vlmo_ds.ckpt.safe_read import read_json, read_safetensors
from vlmo_ds.ckpt.safe_write import OutDir
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.train.stage_record import WEIGHTS_FILE, WEIGHTS_FORMAT

OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_FORMAT = "vlmo_ds.adam/1"
CONFIG_FILE = "config.json"
SOURCE_FILE = "source.json"
RANKS_DIR = "ranks"
RANK_FILE = re.compile(r"^rank_(\d+)\.pt$")


@dataclass
class Consolidated:
    """A whole model, its AdamW state and its provenance."""

    cfg: ModelConfig
    weights: dict[str, torch.Tensor]
    """Every parameter and persistent buffer, float32, consolidated keys."""
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    step: float | None = None
    """AdamW's step count (None: no optimizer state)."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """AdamW groups: name, lr, betas, eps, weight_decay, params (member names)."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """The source's trainer.json (step, stage, stage_step, ...)."""
    layout: Layout | None = None
    precision: str | None = None
    """"bf16" or "fp32" (None: unknown, e.g. a stage record)."""
    ds_config: dict[str, Any] | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed's global_steps, global_samples, skipped_steps."""
    rank_files: dict[int, Path] = field(default_factory=dict)
    """The source's per-rank files (loader, RNG), by global rank."""
    source: str = ""
    partial: str | None = None
    """Set when `weights` cover part of the model only (import-beit: "image")."""

    @property
    def trainable(self) -> list[str]:
        """Names with optimizer state, in weight order."""
        return [k for k in self.weights if k in self.exp_avg]

    @property
    def stage(self) -> str | None:
        return self.trainer.get("stage")


def weights_metadata(cfg: ModelConfig, stage: str | None, partial: str | None = None) -> dict[str, str]:
    """The stage-record metadata (vlmo_ds.train.stage_record.weights_config reads it), "partial" when set."""
    meta = {"format": WEIGHTS_FORMAT, "stage": stage or "", "model_config": json.dumps(dataclasses.asdict(cfg))}
    return meta | ({"partial": partial} if partial else {})


def write_tensors(state: Consolidated, out: OutDir, with_optimizer: bool = True) -> list[Path]:
    """optimizer.safetensors (when there is optimizer state), then weights.safetensors."""
    written = []
    if with_optimizer and state.exp_avg:
        tensors = {f"exp_avg/{k}": v for k, v in state.exp_avg.items()}
        tensors |= {f"exp_avg_sq/{k}": v for k, v in state.exp_avg_sq.items()}
        meta = {"format": OPTIMIZER_FORMAT, "step": json.dumps(state.step), "groups": json.dumps(state.groups)}
        written.append(out.save_safetensors(OPTIMIZER_FILE, tensors=tensors, metadata=meta))
    written.append(out.save_safetensors(WEIGHTS_FILE, tensors=state.weights,
                                        metadata=weights_metadata(state.cfg, state.stage, state.partial)))
    return written


def write(state: Consolidated, out: OutDir, with_optimizer: bool = True) -> list[Path]:
    """Write the consolidated folder; returns the files written."""
    written = []
    for rank, path in sorted(state.rank_files.items()):
        written.append(out.copy_file(path, RANKS_DIR, f"rank_{rank}.pt"))
    source = {"source": state.source, "trainer": state.trainer,
              "layout": state.layout.as_dict() if state.layout else None, "precision": state.precision,
              "ds_config": state.ds_config, "counters": state.counters}
    written.append(out.write_json(SOURCE_FILE, obj=source))
    written.append(out.write_json(CONFIG_FILE, obj=dataclasses.asdict(state.cfg)))
    return written + write_tensors(state, out, with_optimizer)


def is_consolidated(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".safetensors") or (path / WEIGHTS_FILE).is_file()


def read(path: str | Path, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Consolidated:
    """A consolidated folder, a stage record folder or a weights .safetensors file."""
    path = Path(path)
    weights_file = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    folder = weights_file.parent
    weights, meta = read_safetensors(weights_file)
    weights = {k: v.float() for k, v in weights.items()}
    if meta.get("format") == WEIGHTS_FORMAT:
        cfg = config_from_dict(json.loads(meta["model_config"]), str(weights_file))
    elif preset is not None:
        cfg = config_from_preset(preset, overrides or {}, {k: tuple(v.shape) for k, v in weights.items()})
    else:
        raise CheckpointError(f"{weights_file} names no model config (not written by vlmo_ds); pass --preset NAME "
                              "(and --set FIELD=VALUE for recipe settings)")
    partial = meta.get("partial") or None
    check_shapes(cfg, {k: tuple(v.shape) for k, v in weights.items()}, str(weights_file), partial=bool(partial))
    state = Consolidated(cfg, weights, source=str(path), partial=partial)
    if path.suffix != ".safetensors" and (folder / OPTIMIZER_FILE).is_file():
        _read_optimizer(state, folder / OPTIMIZER_FILE)
    if path.suffix != ".safetensors" and (folder / SOURCE_FILE).is_file():
        _read_source(state, folder)
    if meta.get("stage") and "stage" not in state.trainer:
        state.trainer["stage"] = meta["stage"]
    return state


def _read_optimizer(state: Consolidated, path: Path) -> None:
    tensors, meta = read_safetensors(path)
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise CheckpointError(f"{path} is not a vlmo_ds optimizer file (format {meta.get('format')!r})")
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in ("exp_avg", "exp_avg_sq") or name not in state.weights:
            raise CheckpointError(f"{path}: entry {key!r} names no parameter of the weights; the files belong "
                                  "to different models")
        getattr(state, kind)[name] = value.float()
    if set(state.exp_avg) != set(state.exp_avg_sq):
        raise CheckpointError(f"{path} holds exp_avg and exp_avg_sq for different parameters; it is corrupt")
    state.step = json.loads(meta["step"])
    state.groups = json.loads(meta["groups"])


def _read_source(state: Consolidated, folder: Path) -> None:
    source = read_json(folder / SOURCE_FILE)
    state.trainer = dict(source.get("trainer") or {})
    state.layout = layout_from_dict(source["layout"], str(folder / SOURCE_FILE)) if source.get("layout") else None
    state.precision = source.get("precision")
    state.ds_config = source.get("ds_config")
    state.counters = dict(source.get("counters") or {})
    ranks = folder / RANKS_DIR
    for file in ranks.iterdir() if ranks.is_dir() else []:
        if match := RANK_FILE.match(file.name):
            state.rank_files[int(match.group(1))] = file
