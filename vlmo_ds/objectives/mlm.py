"""Masked language modelling loss over the positions that carry a label (labels != -100).

The head runs on every position and the loss weighs each position by its label mask, divided by the count of
labelled positions on the device: no boolean gather, whose output size the host would have to wait for (a GPU
synchronisation per micro-step). The price is the vocabulary projection of the unlabelled positions too, about 1%
of a base pre-training step's FLOPs. A batch without labels gives a zero loss (the count is clamped at 1), with the
same graph and parameter set as any other batch, so every rank reduces the same gradients.

Under tensor parallelism the head's logits are vocabulary-parallel ([B, T, V / t] on each of t ranks): the
per-position losses are megatron-core's vocab_parallel_cross_entropy (which has no ignore_index: unlabelled
positions are masked afterwards) and the accuracy's argmax is taken across the group, so no rank ever holds
[B, T, V].
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
    labels = labels.reshape(-1)
    logits = head(text_hidden)
    logits = logits.reshape(-1, logits.shape[-1])  # [B*T, V] or [B*T, V / t]
    weights = (labels != -100).float()
    count = weights.sum().clamp(min=1.0)
    if tp_group is None or group_size(tp_group) == 1:
        losses = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
        predicted = logits.detach().argmax(-1)
    else:
        predicted = _vocab_parallel_argmax(logits.detach(), tp_group)
        losses = _vocab_parallel_cross_entropy(logits.float(), labels, tp_group)
    accuracy = ((predicted == labels).float() * weights).sum() / count
    return (losses * weights).sum() / count, accuracy


def _vocab_parallel_argmax(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """[M, V / t] rank-ordered vocabulary blocks -> [M] global argmax, the first maximum on ties (as torch)."""
    local_max, local_index = logits.max(-1)
    maxima = all_gather_nograd(local_max[None], tp_group)  # [t, M]
    indices = all_gather_nograd((local_index + group_rank(tp_group) * logits.shape[-1])[None], tp_group)
    best = maxima.argmax(0)  # first maximum: on ties the lowest rank, which holds the lowest vocabulary index
    return indices.gather(0, best[None])[0]


def _vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp_group) -> torch.Tensor:
    """[M] per-position losses (finite at -100 targets: no rank holds them, so their target logit counts as 0);
    megatron's function reduces over megatron's tensor-parallel group, which must be `tp_group`. It overwrites
    `logits` in place (its memory saving), so callers read logits before."""
    from megatron.core import parallel_state  # only tensor-parallel runs pay for importing megatron-core
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if (not parallel_state.model_parallel_is_initialized()
            or dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
            != dist.get_process_group_ranks(tp_group)):
        raise ValueError("the vocabulary-parallel MLM loss reduces over megatron-core's tensor-parallel group: "
                         "initialise megatron.core.parallel_state and pass its tensor-parallel group as tp_group")
    return vocab_parallel_cross_entropy(logits, targets)
