"""Collectives over a process group (the data-parallel group for the objectives) that degrade to identities when
torch.distributed is not running, so the same objective code serves one process and a cluster."""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_gather_nograd(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate x from every rank of the group in rank order along dim 0 (equal shapes on every rank)."""
    if group_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: every rank's gradient for this rank's slice, summed.

    Summing is right because data parallelism averages gradients over the group afterwards: a loss that every rank
    computes over the whole gathered batch sends world * dL/dx here, and the average takes it back to dL/dx.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, x.shape[0]
        return all_gather_nograd(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = group_rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """all_gather_nograd with gradients flowing back to every rank's own rows."""
    if group_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)
