"""Small pieces of one training step: batches to the device, the gradient norm. (When to
stop early is vlmo_ds.train.preemption's; the trainer keeps each step's values on the device, vlmo_ds.train.scalars.)"""
from __future__ import annotations

import torch
import torch.distributed as dist


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors moved to `device`; floating-point ones (images) cast to the compute dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def grad_norm_before_step(engine, mp_group=None, tp_rank: int = 0) -> torch.Tensor | None:
    """ZeRO 0 keeps no gradient norm: take it from the (already averaged) gradients before the step clips them, as a
    0-dim device tensor (nothing read on the host). ZeRO 1-3 report theirs after the step (get_global_grad_norm).

    Under tensor / pipeline parallelism (mp_group: the replica's TP x PP ranks) every rank must call it: a
    tensor-parallel shard counts on every rank, a replicated tensor on tensor rank 0 only, summed over the group.
    """
    if engine.zero_optimization_stage() != 0:
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters()
             if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    if mp_group is None:
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else None
    square = torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=engine.device)
    dist.all_reduce(square, group=mp_group)
    return square.sqrt()
