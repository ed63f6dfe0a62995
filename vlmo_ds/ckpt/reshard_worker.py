"""One rank of the target layout of a reshard: a spawned CPU process (gloo) that builds its model shard as the trainer
does, fills it from the consolidated files and saves the checkpoint through DeepSpeed (vlmo_ds.ckpt.reshard).

Each rank reads only the entries of its pipeline stage from the safetensors files, cuts its tensor-parallel shard
(tp_convert.shard_state_dict, then pipeline_convert.stage_state_dict) from the weights and from both AdamW moments,
and builds the AdamW groups with vlmo_ds.train.optim.param_groups (the trainer's rule, so DeepSpeed flattens the same
groups in the same order) carrying the saved hyper-parameters.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vlmo_ds.ckpt.consolidated import OPTIMIZER_FILE
from vlmo_ds.ckpt.engine_state import ADAM_KEYS, load_into_engine
from vlmo_ds.ckpt.layout import Layout
from vlmo_ds.ckpt.safe_read import load_torch
from vlmo_ds.config.schema import OptimSection
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.layers import Layers
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.parallel.launch import DistEnv, init_distributed, leave_spawned_rank
from vlmo_ds.parallel.pipeline_convert import stage_of_key, stage_state_dict
from vlmo_ds.parallel.tp_convert import shard_state_dict
from vlmo_ds.train import checkpoint
from vlmo_ds.train.optim import param_groups
from vlmo_ds.train.stage_record import WEIGHTS_FILE


def write_rank(rank: int, job: dict[str, Any]) -> None:
    """torch.multiprocessing entry point: rank `rank` of job["target"]."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # this process only computes on the CPU, whatever the machine has
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    target = Layout(**job["target"])
    env = DistEnv(rank=rank, world_size=target.world, local_rank=rank, local_world_size=target.world, node_rank=0,
                  master_addr="127.0.0.1", master_port=job["port"], launcher="torchrun")
    init_distributed(env, backend="gloo", use_deepspeed=True)
    _write(rank, job, target)  # an exception ends this process with a traceback, which reshard reports
    leave_spawned_rank()


def _cut(full: dict[str, torch.Tensor], cfg: ModelConfig, target: Layout, tp: int, pp: int) -> dict:
    shard = shard_state_dict(full, tp, target.tensor, cfg) if target.tensor > 1 else full
    return stage_state_dict(shard, cfg, pp, target.pipeline) if target.pipeline > 1 else shard


def _read(path: Path, wanted) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).float() for key in handle.keys() if wanted(key)}


def _shard(job: dict[str, Any], cfg: ModelConfig, target: Layout, tp: int, pp: int):
    """This rank's weights and {exp_avg: ..., exp_avg_sq: ...} (empty without optimizer state)."""
    def mine(key: str) -> bool:
        return target.pipeline == 1 or stage_of_key(key, cfg, target.pipeline) in (pp, None)

    work = Path(job["work"])
    weights = _cut(_read(work / WEIGHTS_FILE, mine), cfg, target, tp, pp)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    if (work / OPTIMIZER_FILE).is_file():
        for key in ADAM_KEYS:
            prefix = f"{key}/"
            found = _read(work / OPTIMIZER_FILE, lambda k: k.startswith(prefix) and mine(k[len(prefix):]))
            moments[key] = _cut({k[len(prefix):]: v for k, v in found.items()}, cfg, target, tp, pp)
    return weights, moments


def _adamw(model: torch.nn.Module, saved: list[dict[str, Any]]) -> torch.optim.AdamW:
    """The trainer's groups (vlmo_ds.train.optim) with the saved hyper-parameters (recipe defaults without)."""
    defaults, hyper = OptimSection(), {g.get("name"): g for g in saved}
    groups = param_groups(model, defaults.weight_decay)
    for group in groups:
        found = hyper.get(group["name"], {})
        group.update(lr=found.get("lr", defaults.lr), betas=tuple(found.get("betas", defaults.betas)),
                     eps=found.get("eps", defaults.eps), weight_decay=found.get("weight_decay", group["weight_decay"]))
    return torch.optim.AdamW(groups, lr=defaults.lr, betas=defaults.betas, eps=defaults.eps)


def _write(rank: int, job: dict[str, Any], target: Layout) -> None:
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    cfg = ModelConfig(**job["model"])
    tp, dp, pp = target.coords(rank)
    mpu, layers = None, Layers()
    if target.model_parallel > 1:
        from vlmo_ds.parallel.mpu import init_model_parallel
        from vlmo_ds.parallel.tensor_layers import TensorParallelLayers

        mpu = init_model_parallel(target.tensor, target.pipeline, cfg, zero_stage=target.zero_stage)
        found = (mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank(),
                 mpu.get_pipeline_model_parallel_rank())
        assert found == (tp, dp, pp), f"megatron placed rank {rank} at {found}, the layout says {(tp, dp, pp)}"
        if target.tensor > 1:
            layers = TensorParallelLayers(mpu.get_tensor_model_parallel_group())
    torch.manual_seed(job["seed"])  # initial values are overwritten below
    model = VLMo(cfg, layers)
    if target.pipeline > 1:
        from vlmo_ds.parallel.pipeline_stage import PipelineStage

        model = PipelineStage(model, pp, target.pipeline)
    weights, moments = _shard(job, cfg, target, tp, pp)
    model.load_state_dict(weights, strict=True)
    trainable = set(job["trainable"])
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    engine = deepspeed.initialize(model=model, optimizer=_adamw(model, job["groups"]), config=job["ds_config"],
                                  mpu=mpu)[0]
    load_into_engine(engine, weights, moments, job["adam_step"] if moments else None)
    for name, value in (job.get("counters") or {}).items():
        if value is not None:
            setattr(engine, name, value)
    loader = None
    if job["rank_files"][rank] is not None:
        saved = load_torch(job["rank_files"][rank])
        checkpoint.set_rng_state(saved["rng"])
        loader = json.loads(saved["loader"]) if job["keep_loader"] else None
    checkpoint.save(engine, job["out"], job["step"], job["trainer"], {"loader": loader}, rank, keep_last=0)
