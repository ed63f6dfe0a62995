"""The DeepSpeed engine around a VLMo model: AdamW with the published defaults, ZeRO stage, precision and batch sizes
from the recipe. DeepSpeed owns the optimizer step, ZeRO partitioning, gradient accumulation and clipping; the
learning rate is set by the trainer before each optimizer step from the schedule (a function of the step, so there
is no scheduler state to checkpoint)."""
from __future__ import annotations

import logging

import deepspeed
import torch

from vlmo_ds.tasks.optim import split_head_groups
from vlmo_ds.train.divergence import steps_unwrapped
from vlmo_ds.train.optim import param_groups

log = logging.getLogger(__name__)


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether the config keeps the optimizer state in CPU memory (or on NVMe): DeepSpeed then steps it on the CPU
    and refuses a torch optimizer."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, mpu=None, head_lr_mult: float | None = None):
    """deepspeed.initialize with a torch AdamW (DeepSpeed's own fused Adam would compile a C++ op first), or with
    DeepSpeed's CPU Adam (AdamW mode, a C++ op built on first use: about a minute, cached in
    ~/.cache/torch_extensions) when the config offloads the optimizer.

    mpu: vlmo_ds.parallel.mpu.MegatronMPU under tensor / pipeline parallelism (ZeRO partitions and averages over its
    data-parallel group, counts gradient norms over its model-parallel group, names checkpoint files mp_rank_XX by
    its model-parallel rank); None when every rank holds the whole model. head_lr_mult: a fine-tuning stage's task
    head learns at lr x head_lr_mult (vlmo_ds.tasks.optim); None: one learning rate.
    """
    groups = param_groups(model, weight_decay)
    if head_lr_mult is not None:
        groups = split_head_groups(groups, model, head_lr_mult)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                     adamw_mode=True)
    else:
        # fused where DeepSpeed steps it as it is: it skips a non-finite step on the device (vlmo_ds.train.divergence)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      fused=steps_unwrapped(ds_config) or None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    return engine


def set_lr(engine, lr: float) -> None:
    """The schedule's learning rate for every group; a group tagged lr_scale (the fine-tuning heads' multiplier,
    vlmo_ds.tasks.optim) gets lr x lr_scale."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def compute_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
