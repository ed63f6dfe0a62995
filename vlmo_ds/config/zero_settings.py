"""DeepSpeed's communication settings derived from the model: ZeRO bucket sizes, ZeRO-3 prefetch and reuse, the
gradient reduction path and the gradient data types. deepspeed_config() writes them under the keys a DeepSpeed JSON
leaves unset (a key the JSON sets wins); the capacity planner (vlmo_ds.plan) reads the same numbers by calling
zero_settings(model_cfg, zero_stage, model_parallel, precision, gathered_budget_bytes) itself.

Sizes are in elements, from P = this rank's parameters (the model's / (tensor x pipeline)):
    reduce_bucket_size     P / 8 within [1e6, 5e7]: about 8 buckets per backward, so each bucket's reduction
                           overlaps the rest of the backward (one bucket for the whole model overlaps nothing); the
                           floor keeps a collective large enough to run at link bandwidth, the cap keeps DeepSpeed's
                           two staging buffers (overlap_comm double-buffers) at <= 2 x 5e7 x 4 B = 400 MB
    allgather_bucket_size  the same (ZeRO-1/2: the parameter all-gather after the optimizer step, in chunks)
    use_multi_rank_bucket_allreduce  false: each gradient slice is reduced to the rank that owns its partition,
                           (N-1)/N of the bytes per rank, the reduce-scatter minimum. DeepSpeed 0.19.8's default
                           (true) all-reduces every bucket and keeps the owner's slice: twice the traffic.
    overlap_comm           true (turned off again under pipeline parallelism: vlmo_ds.train.layout.engine_config)
ZeRO-3:
    stage3_prefetch_bucket_size       two blocks' parameters (2 P / depth) within [1e6, 1e8], gathered ahead
    stage3_param_persistence_threshold  mlp_dim: vectors (norms, biases, layer scales; <= 4 D) stay whole on every
                           rank, matrices are partitioned
    stage3_max_live_parameters, stage3_max_reuse_distance
                           keep for the step: when this rank's gathered parameters fit gathered_budget_bytes (default
                           16 GiB, a fifth of an 80 GB GPU; huge2b in bf16 is 8.8 GB), both cover the whole step's
                           trace, so a parameter gathered for the image pass is not gathered again for the text, VL
                           and fused passes or for backward: one all-gather per micro-batch. Otherwise parameters are
                           released after each use (reuse within one block) and at most the budget is live.
Data types (precision bf16), by what DeepSpeed 0.19.8 supports at each stage:
    communication_data_type "fp32" at every stage: gradients are summed across ranks in fp32
    data_types.grad_accum_dtype "fp32" at ZeRO 2 and 3 (micro-batch gradients accumulate in an fp32 partition).
                           ZeRO 0 refuses it (DeepSpeed has no bf16-model / fp32-accumulation mix without ZeRO);
                           ZeRO 1 with it switches DeepSpeed to its BF16_Optimizer, which all-reduces all gradients
                           after backward (2x traffic, no overlap), so at ZeRO 0-1 gradients accumulate in bf16
                           between micro-batches and are reduced in fp32. A JSON that sets data_types wins.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.pipeline_passes import image_text_passes

BUCKET_FRACTION = 8
"""Reduce buckets per backward pass (before the floor and cap)."""
BUCKET_FLOOR, BUCKET_CAP = 1_000_000, 50_000_000
PREFETCH_BLOCKS = 2
PREFETCH_FLOOR, PREFETCH_CAP = 1_000_000, 100_000_000
GATHERED_BUDGET_BYTES = 16 * 2**30
"""Default bound on the gathered parameters ZeRO-3 keeps for a whole step, per rank."""


@functools.lru_cache(maxsize=None)
def parameter_count(model_cfg: ModelConfig) -> int:
    """The whole model's parameters, counted on the meta device (no memory, no initialisation cost)."""
    from vlmo_ds.model.vlmo import VLMo

    with torch.device("meta"):
        model = VLMo(model_cfg)
    return sum(p.numel() for p in model.parameters())


def _clamp(value: float, low: int, high: int) -> int:
    """value within [low, high], in whole millions (an even count, as DeepSpeed's all-gather alignment needs)."""
    return int(min(max(round(value / 1e6), low // 10**6), high // 10**6) * 10**6)


def zero_settings(model_cfg: ModelConfig, zero_stage: int, model_parallel: int = 1, precision: str = "bf16",
                  gathered_budget_bytes: int = GATHERED_BUDGET_BYTES) -> dict[str, Any]:
    """The DeepSpeed settings of the module docstring for this model and ZeRO stage, as a partial DeepSpeed config
    ({"zero_optimization": {...}, "communication_data_type": ..., "data_types": {...}}).

    model_parallel: tensor x pipeline ranks sharing one replica (a rank holds about 1/model_parallel of it);
    precision: "bf16" or "fp32"; gathered_budget_bytes: how much of a GPU the parameters ZeRO-3 keeps gathered for
    a whole step may take (the planner passes its GPU's figure).
    """
    out: dict[str, Any] = {}
    if precision == "bf16":
        out["communication_data_type"] = "fp32"
        if zero_stage >= 2:
            out["data_types"] = {"grad_accum_dtype": "fp32"}
    if zero_stage == 0:
        return out
    params = parameter_count(model_cfg) / model_parallel
    bucket = _clamp(params / BUCKET_FRACTION, BUCKET_FLOOR, BUCKET_CAP)
    zero: dict[str, Any] = {"overlap_comm": True, "reduce_bucket_size": bucket}
    if zero_stage < 3:
        zero |= {"allgather_bucket_size": bucket, "use_multi_rank_bucket_allreduce": False}
    else:
        block = params / model_cfg.depth
        gathered = params * (2 if precision == "bf16" else 4)
        if gathered <= gathered_budget_bytes:
            # a step walks the parameters forward and backward once per pass: at most 2 x ceil(passes) x P
            trace = 2 * math.ceil(image_text_passes(model_cfg.depth, model_cfg.vlffn_start)) * params
            live = reuse = _clamp(trace, BUCKET_FLOOR, 10**15)
        else:
            live = _clamp(gathered_budget_bytes / (gathered / params), BUCKET_FLOOR, 10**15)
            reuse = _clamp(block, BUCKET_FLOOR, 10**15)
        zero |= {"stage3_prefetch_bucket_size": _clamp(PREFETCH_BLOCKS * block, PREFETCH_FLOOR, PREFETCH_CAP),
                 "stage3_param_persistence_threshold": model_cfg.mlp_dim,
                 "stage3_max_live_parameters": live, "stage3_max_reuse_distance": reuse}
    out["zero_optimization"] = zero
    return out


def with_zero_settings(tree: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config with `settings` filled in wherever `tree` leaves a key unset (one level deep inside
    zero_optimization and data_types: a JSON that sets reduce_bucket_size keeps it and gets the rest)."""
    out = dict(tree)
    for key, value in settings.items():
        if isinstance(value, dict):
            out[key] = {**value, **tree.get(key, {})}
        else:
            out.setdefault(key, value)
    return out
