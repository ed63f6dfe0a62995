"""Masked language modelling loss, computed only at the masked positions.

The head runs on the [M, D] rows that carry a label instead of all [B, T, D]: the same numbers for a fraction of
the vocabulary projection (15% of tokens), which dominates the head's cost at V = 30522.

Under tensor parallelism the head's logits are vocabulary-parallel ([M, V / t] on each of t ranks): the loss is
megatron-core's vocab_parallel_cross_entropy and the accuracy's argmax is taken across the group, so no rank ever
holds [M, V].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlmo_ds.parallel.collectives import all_gather_nograd, group_rank, group_size


def masked_lm_loss(text_hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                   tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) over positions with labels != -100. text_hidden [B, T, D], labels [B, T].

    tp_group: the tensor-parallel group when `head` returns this rank's vocabulary slice; None for whole logits.
    """
    picked = labels != -100
    targets = labels[picked]
    if targets.numel() == 0:  # keeps the graph (and the parameter set every rank reduces) the same as usual
        zero = head(text_hidden[:, :1]).sum() * 0.0
        return zero, zero.detach()
    logits = head(text_hidden[picked])  # [M, V] or [M, V / t]
    if tp_group is None or group_size(tp_group) == 1:
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.argmax(-1) == targets).float().mean().detach()
        return loss, accuracy
    accuracy = (_vocab_parallel_argmax(logits.detach(), tp_group) == targets).float().mean()
    return _vocab_parallel_cross_entropy(logits.float(), targets, tp_group).mean(), accuracy


def _vocab_parallel_argmax(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """[M, V / t] rank-ordered vocabulary blocks -> [M] global argmax, the first maximum on ties (as torch)."""
    local_max, local_index = logits.max(-1)
    maxima = all_gather_nograd(local_max[None], tp_group)  # [t, M]
    indices = all_gather_nograd((local_index + group_rank(tp_group) * logits.shape[-1])[None], tp_group)
    best = maxima.argmax(0)  # first maximum: on ties the lowest rank, which holds the lowest vocabulary index
    return indices.gather(0, best[None])[0]


def _vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp_group) -> torch.Tensor:
    """[M] per-position losses; megatron's function reduces over megatron's tensor-parallel group, which must be
    `tp_group`. It overwrites `logits` in place (its memory saving), so callers read logits before."""
    from megatron.core import parallel_state  # only tensor-parallel runs pay for importing megatron-core
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if (not parallel_state.model_parallel_is_initialized()
            or dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
            != dist.get_process_group_ranks(tp_group)):
        raise ValueError("the vocabulary-parallel MLM loss reduces over megatron-core's tensor-parallel group: "
                         "initialise megatron.core.parallel_state and pass its tensor-parallel group as tp_group")
    return vocab_parallel_cross_entropy(logits, targets)
