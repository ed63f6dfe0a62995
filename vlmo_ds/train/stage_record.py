"""Stage checkpoints: the consolidated weights a finished stage hands to the next, and the run folder's record of
which stages are finished.

Layout under RUN_DIR/stages/:
    <name>/weights.safetensors   every parameter of the stage's model, full (unpartitioned) and float32; the
                                 safetensors metadata holds the ModelConfig it was made with (format vlmo_ds.weights/1)
    <name>/stage.json            written last: the stage's name, kind, steps, global step, last losses, evaluations
    <name>.tmp/                  a record being written (or killed mid-way): never read, replaced on the next try
A stage is finished when <name>/stage.json exists. Rank 0 writes under the .tmp name and renames the folder, so a
record is complete or absent. The weights are the optimizer's float32 master weights where DeepSpeed keeps them
(bf16 runs), gathered from the ZeRO partitions; frozen parameters are taken from the module as they are. Under
tensor / pipeline parallelism the record holds the consolidated model (the one-process layout): the TP shards and
pipeline stages of data-parallel replica 0 are gathered to rank 0 and merged (tp_convert, pipeline_convert), so
the next stage and every tool see one layout whatever the run's was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vlmo_ds.ckpt.safe_read import safetensors_metadata
from vlmo_ds.model.config import ModelConfig

STAGES_DIR = "stages"
WEIGHTS_FILE = "weights.safetensors"
RECORD_FILE = "stage.json"
WEIGHTS_FORMAT = "vlmo_ds.weights/1"


def stage_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / STAGES_DIR / name


def is_finished(run_dir: str | Path, name: str) -> bool:
    return (stage_dir(run_dir, name) / RECORD_FILE).is_file()


def read_record(run_dir: str | Path, name: str) -> dict[str, Any]:
    return json.loads((stage_dir(run_dir, name) / RECORD_FILE).read_text())


def remove_record(run_dir: str | Path, name: str) -> bool:
    """Delete a stage's record (and a half-written one); True if there was one."""
    found = False
    for path in (stage_dir(run_dir, name), stage_dir(run_dir, name).with_name(f"{name}.tmp")):
        if path.exists():
            shutil.rmtree(path)
            found = True
    return found


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of the engine's module, whole, float32, on the CPU.

    Every rank must call it (ZeRO gathers are collective), in the same order; all ranks get the tensors.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    masters = _unfused_masters(engine.optimizer)
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        full = masters.get(id(param)) if full is None else full
        if full is None:
            with deepspeed.zero.GatheredParameters([param], enabled=zero3):
                full = param.detach().clone()
        out[name] = full.float().cpu()
    names = {name for name, _ in module.named_parameters()}
    for name, value in module.state_dict().items():
        if name not in names:
            out[name] = value.detach().cpu().clone()
    return out


def consolidated_state_dict(engine, cfg: ModelConfig, mp_group=None, tp_rank: int = 0, pp_rank: int = 0,
                            tp_size: int = 1, dp_rank: int = 0) -> dict[str, torch.Tensor] | None:
    """The whole model's weights (full_state_dict's, in the one-process layout) on global rank 0, None elsewhere.

    mp_group: this replica's TP x PP ranks (None: every rank holds the whole model). Every rank must call it.
    Data-parallel replica 0 sends each rank's (ZeRO-gathered) part to the group's first rank, global rank 0 in
    megatron's rank order, which merges the pipeline stages of each tensor rank, then the tensor ranks.
    """
    local = full_state_dict(engine)
    if mp_group is None:
        return local if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dp_rank != 0:
        return None
    owner = dist.get_process_group_ranks(mp_group)[0]
    parts = [None] * dist.get_world_size(mp_group) if dist.get_rank() == owner else None
    dist.gather_object((tp_rank, pp_rank, local), parts, dst=owner, group=mp_group)
    if parts is None:
        return None
    from vlmo_ds.parallel.pipeline_convert import merge_stage_state_dicts
    from vlmo_ds.parallel.tp_convert import merge_state_dicts

    shards = []
    for t in range(tp_size):
        stages = sorted((p for p in parts if p[0] == t), key=lambda p: p[1])
        shards.append(merge_stage_state_dicts([state for _, _, state in stages], cfg))
    return merge_state_dicts(shards, cfg) if tp_size > 1 else shards[0]


def _unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO 0 in bf16: DeepSpeed's unfused optimizer keeps float32 masters (fp32_groups beside fp16_groups) without
    the fragment links safe_get_full_fp32_param follows. id(module parameter) -> its master."""
    pairs = zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []))
    return {id(low): high for lows, highs in pairs for low, high in zip(lows, highs)}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_record(run_dir: str | Path, name: str, state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                 record: dict[str, Any], rank: int, files: dict[str, str] | None = None) -> Path:
    """Every rank calls; rank 0 writes the weights, stage.json and `files` (name -> text: a VQA stage's answer
    table) under <name>.tmp, then renames the folder."""
    final = stage_dir(run_dir, name)
    if rank == 0:
        tmp = final.with_name(f"{name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        metadata = {"format": WEIGHTS_FORMAT, "stage": name,
                    "model_config": json.dumps(dataclasses.asdict(model_cfg))}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1, default=str))
        for file_name, text in (files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def weights_config(path: str | Path) -> ModelConfig | None:
    """The ModelConfig stored in a vlmo_ds weights file's metadata; None for other files (published, BEiT, .pt)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    metadata = safetensors_metadata(path)
    if metadata.get("format") != WEIGHTS_FORMAT:
        return None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in json.loads(metadata["model_config"]).items() if k in known})
