"""What `inspect` prints about any checkpoint: its kind, training position, layout, precision, parameter count and
model config, read without loading more than it must (tensors are memory-mapped or only their headers read).

The parameter count of a DeepSpeed checkpoint is that of the whole model: summed over the model-parallel ranks, a
tensor-parallel shard and the relative table's stage columns counted on every rank, a replicated tensor on tensor
rank 0 only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open

from vlmo_ds.ckpt import consolidated
from vlmo_ds.ckpt.consolidate import resolve, source_layout
from vlmo_ds.ckpt.ds_files import open_checkpoint
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import config_from_dict, preset_of
from vlmo_ds.ckpt.official import read_tensors
from vlmo_ds.ckpt.safe_read import load_torch, read_json, safetensors_metadata
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.tp_convert import TABLE, partition_dim
from vlmo_ds.train.checkpoint import TRAINER_FILE
from vlmo_ds.train.stage_record import RECORD_FILE, WEIGHTS_FILE


def _row(label: str, value: Any) -> str:
    return f"{label:<12}{value}"


def _model_rows(cfg: ModelConfig | None, missing: str) -> list[str]:
    if cfg is None:
        return [_row("model", missing)]
    found = preset_of(cfg)
    return [_row("model", f"{'preset ' + found if found else 'custom'}: dim {cfg.dim}, depth {cfg.depth}, heads "
                          f"{cfg.heads}, image {cfg.image_size}, text {cfg.max_text_len}, vocab {cfg.vocab_size}"),
            _row("config", json.dumps(dataclasses.asdict(cfg)))]


def describe(path: str | Path) -> list[str]:
    """Lines describing a checkpoint folder, run folder, consolidated / stage folder, or weights file."""
    path = resolve(path)
    if consolidated.is_consolidated(path):
        return _weights(path)
    if (path / TRAINER_FILE).is_file() or any(path.glob("*model_states.pt")):
        return _deepspeed(path)
    if path.is_file():
        return _plain_file(path)
    raise CheckpointError(f"{path} is no checkpoint vlmo_ds knows (checkpoint, run, consolidated or stage folder, "
                          "weights file)")


def _deepspeed(folder: Path) -> list[str]:
    trainer = read_json(folder / TRAINER_FILE) if (folder / TRAINER_FILE).is_file() else {}
    ds = open_checkpoint(folder)
    layout = source_layout(trainer, ds, str(folder / TRAINER_FILE))
    count, dtypes = 0, set()
    for mp in range(ds.mp_size):
        tp = mp % layout.tensor
        model = load_torch(ds.model_file(mp), mmap=True)
        shapes = {k: tuple(v.shape) for k, v in model["module"].items()}
        if ds.zero_stage == 3:  # the module holds empty placeholders; the shapes are listed beside it
            shapes |= {k: tuple(s) for group in model["param_shapes"] for k, s in group.items()}
            shapes |= {k: tuple(s) for k, s in (model.get("frozen_param_shapes") or {}).items()}
        dtypes |= {str(v.dtype).removeprefix("torch.") for v in model["module"].values()}
        count += sum(math.prod(s) for k, s in shapes.items() if tp == 0 or k == TABLE or partition_dim(k) is not None)
    cfg = config_from_dict(trainer["model"], str(folder / TRAINER_FILE)) if trainer.get("model") else None
    position = f"{trainer.get('step', '?')} (stage {trainer.get('stage', '?')}" + (
        f", its step {trainer['stage_step']})" if "stage_step" in trainer else ")")
    rows = [_row("kind", "DeepSpeed checkpoint (vlmo_ds trainer)" if trainer else "DeepSpeed checkpoint"),
            _row("path", folder), _row("step", position),
            _row("layout", f"{layout}{'' if trainer.get('layout') else ' (trainer.json names none: TP = PP = 1)'}"),
            _row("precision", "bf16 module, fp32 master weights" if ds.bf16 else "fp32"),
            _row("dtype", ", ".join(sorted(dtypes))), _row("parameters", f"{count:,}")]
    rows += _model_rows(cfg, "not named in trainer.json (consolidate / reshard with --preset NAME)")
    if trainer.get("trainable"):
        rows.append(_row("trainable", ", ".join(trainer["trainable"])))
    if trainer.get("resharded"):
        rows.append(_row("resharded", json.dumps(trainer["resharded"])))
    rows.append(_row("deepspeed", f"{ds.meta.get('ds_version')}, global step {ds.meta.get('global_steps')}"))
    rows.append(_row("rank files", len(list(folder.glob("rank_*.pt")))))
    return rows


def _weights(path: Path) -> list[str]:
    file = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    meta = safetensors_metadata(file)
    with safe_open(str(file), framework="pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    cfg = config_from_dict(json.loads(meta["model_config"]), str(file)) if meta.get("model_config") else None
    folder = file.parent
    kind = ("stage record" if (folder / RECORD_FILE).is_file() else "consolidated weights"
            if meta.get("format") else "safetensors weights (not vlmo_ds)")
    rows = [_row("kind", kind + (f", partial ({meta['partial']})" if meta.get("partial") else "")), _row("path", file),
            _row("stage", meta.get("stage") or "-"), _row("dtype", ", ".join(sorted(dtypes))),
            _row("parameters", f"{sum(math.prod(s) for s in shapes.values()):,} in {len(shapes)} tensors")]
    rows += _model_rows(cfg, "not named (pass --preset NAME to tools that read it)")
    if path.is_dir() and (folder / consolidated.OPTIMIZER_FILE).is_file():
        optimizer = safetensors_metadata(folder / consolidated.OPTIMIZER_FILE)
        rows.append(_row("optimizer", f"AdamW state, step {optimizer.get('step')}"))
    if path.is_dir() and (folder / consolidated.SOURCE_FILE).is_file():
        source = read_json(folder / consolidated.SOURCE_FILE)
        trainer = source.get("trainer") or {}
        rows.append(_row("source", f"{source.get('source')}: step {trainer.get('step', '-')}, layout "
                                   f"{source.get('layout')}, {source.get('precision')}"))
    if (folder / RECORD_FILE).is_file():
        record = read_json(folder / RECORD_FILE)
        rows.append(_row("record", f"{record.get('kind')} stage, {record.get('steps')} steps, ended at global step "
                                   f"{record.get('global_step')}, final {record.get('final')}"))
    return rows


def _plain_file(path: Path) -> list[str]:
    tensors = read_tensors(path)
    if "transformer.blocks.0.attn.qkv.weight" in tensors:
        kind = "published VLMo layout"
    elif "blocks.0.attn.qkv.weight" in tensors:
        kind = "BEiT (unilm / timm keys)"
    else:
        kind = "state dict of unknown layout"
    return [_row("kind", kind), _row("path", path),
            _row("dtype", ", ".join(sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()}))),
            _row("parameters", f"{sum(v.numel() for v in tensors.values()):,} in {len(tensors)} tensors")]
